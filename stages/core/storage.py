"""Object storage for artifacts: a local folder (default) or s3://bucket/prefix, through fsspec.

Every artifact of a run lives under ``<root>/<run_id>/<stage>/``. S3 uses the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...), so the same code talks to AWS, MinIO or moto_server.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def _s3_options() -> dict:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


class Storage:
    """A folder in local or remote storage. Paths given to methods are relative to ``uri``."""

    def __init__(self, uri: str):
        uri = str(uri).rstrip("/")
        if "://" not in uri:
            uri = os.path.abspath(uri)
        self.uri = uri
        self.is_local = "://" not in uri or uri.startswith("file://")
        opts = _s3_options() if uri.startswith("s3://") else {}
        self.fs, self._root = url_to_fs(uri, **opts)

    # -- naming -------------------------------------------------------------------------------------
    def sub(self, *parts: str) -> "Storage":
        """Storage rooted at a sub-folder (shares the filesystem object)."""
        child = object.__new__(Storage)
        child.uri = posixpath.join(self.uri, *parts)
        child.is_local = self.is_local
        child.fs = self.fs
        child._root = posixpath.join(self._root, *parts)
        return child

    def url(self, rel: str = "") -> str:
        return posixpath.join(self.uri, rel) if rel else self.uri

    def _p(self, rel: str) -> str:
        return posixpath.join(self._root, rel) if rel else self._root

    def datafolder(self, rel: str = ""):
        """A datatrove DataFolder on the same filesystem (for readers and writers)."""
        from datatrove.io import DataFolder

        return DataFolder(self._p(rel), fs=self.fs, auto_mkdir=True)

    # -- queries ------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def list(self, rel: str = "", suffix: str = "") -> list[str]:
        """Relative paths of all files below ``rel`` (recursive, sorted)."""
        base = self._p(rel)
        if not self.fs.exists(base):
            return []
        out = []
        for path in self.fs.find(base):
            r = posixpath.relpath(path, self._root)
            if r.endswith(suffix):
                out.append(r)
        return sorted(out)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._p(rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    # -- reading / writing --------------------------------------------------------------------------
    def open(self, rel: str, mode: str = "rb", **kw):
        if "w" in mode and self.is_local:
            self.fs.makedirs(posixpath.dirname(self._p(rel)), exist_ok=True)
        return self.fs.open(self._p(rel), mode, **kw)

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Whole file, or the byte range [start, end) (a ranged GET on S3)."""
        if start is None:
            return self.fs.cat_file(self._p(rel))
        return self.fs.cat_file(self._p(rel), start=start, end=end)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: readers see the old file or the whole new one, never a part."""
        path = self._p(rel)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # a single PUT is atomic on S3
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def put_file(self, local_path: str, rel: str) -> None:
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(self._p(rel)), exist_ok=True)
        self.fs.put_file(local_path, self._p(rel))

    def get_file(self, rel: str, local_path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        self.fs.get_file(self._p(rel), local_path)
        return local_path

    def rm(self, rel: str = "") -> None:
        path = self._p(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        if not self.is_local:
            self.fs.invalidate_cache()

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"


def open_input(url: str, mode: str = "rb"):
    """Open any input path or URL (local, s3://, http(s)://) for reading."""
    opts = _s3_options() if url.startswith("s3://") else {}
    return fsspec.open(url, mode, **opts).open()


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs in local or remote input patterns, sorted and de-duplicated."""
    out: list[str] = []
    for pat in patterns:
        opts = _s3_options() if pat.startswith("s3://") else {}
        fs, _ = url_to_fs(pat, **opts)
        proto = pat.split("://", 1)[0] + "://" if "://" in pat else ""
        matches = fs.glob(pat) if any(c in pat for c in "*?[") else ([pat] if fs.exists(pat) else [])
        out.extend(m if m.startswith(proto) else proto + m for m in sorted(matches))
    return sorted(dict.fromkeys(out))
