"""Object storage for artifacts: a local folder (default) or s3://bucket/prefix, through fsspec.

Every artifact of a run lives under ``<root>/<run_id>/<stage>/``. S3 uses the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` ...), so the same code talks to AWS, MinIO or moto_server.

Outages. Stages also run without Prefect (``kiln stage``), so storage retries by itself, in two layers:
every S3 request (also datatrove's streams, which use the filesystem directly) goes through botocore's
"standard" retry mode, $KILN_S3_ATTEMPTS attempts (default 8, backoff rand x 2^n s capped at 20 s) on
connection errors, timeouts, throttling and 5xx, never on 4xx; and each remote ``Storage`` operation is retried whole
(idempotent: a PUT, a GET, a listing, a delete) with backoff 0.5 s doubling to 16 s while the same errors last,
for at most $KILN_STORAGE_RETRY_S seconds (default 120). Then ``StorageUnavailable`` names the endpoint and
bucket. Measured with moto_server behind a TCP proxy that is stopped and restarted (tests/test_faults.py): a
4 s outage in the middle of a stage is ridden out and the outputs equal an uninterrupted run's; an endpoint
down for good fails with that one-line cause and a later re-run resumes.

Reproducible bytes. ``datafolder`` writes gzip with a zero header mtime: datatrove's writers go through
fsspec's ``GzipFile``, which stamps the current time, so two identical runs gave different sha256 for every
``data/*.jsonl.gz`` (found by bench/bench_chaos.py comparing a re-run with a reference run).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import time
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("kiln")


def _s3_options() -> dict:
    opts: dict[str, Any] = {"config_kwargs": {
        "retries": {"mode": "standard", "max_attempts": int(os.environ.get("KILN_S3_ATTEMPTS", 8))},
        "connect_timeout": float(os.environ.get("KILN_S3_CONNECT_TIMEOUT_S", 10))}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


class StorageUnavailable(ConnectionError):
    """The storage endpoint stayed unreachable (or kept failing with 5xx/throttling) through every retry. A
    ConnectionError: flows.params.is_transient still lets Prefect retry the stage task later. ``endpoint``: the
    one that failed (``Storage.endpoint()``)."""

    def __init__(self, message: str, endpoint: str | None = None):
        super().__init__(message)
        self.endpoint = endpoint

    def __reduce__(self):  # raised in a worker process, re-raised in the stage's: keep the endpoint
        return type(self), (str(self), self.endpoint)


# S3 error codes and errnos worth a retry (s3fs turns SlowDown/503 into EBUSY, 500 into EREMOTEIO); also the rule of
# Prefect's stage-task retries (flows.params.is_transient)
_S3_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling",
             "ThrottlingException", "OperationAborted", "500", "502", "503", "504"}
_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH,
           errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EBUSY, getattr(errno, "EREMOTEIO", 121)}


def transient(exc: BaseException | None, _depth: int = 0) -> bool:
    """A storage error worth retrying: connection errors and timeouts (Python's, botocore's, aiohttp's), S3
    throttling and 5xx, also wrapped (``__cause__``/``__context__``). Not: 4xx (missing, forbidden, bad
    request), a full or read-only disk, anything else."""
    if exc is None or _depth > 5 or isinstance(exc, StorageUnavailable):
        return False
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    try:
        from aiohttp import ClientConnectionError
    except ImportError:  # pragma: no cover - pinned with s3fs
        ClientConnectionError = ConnectionError  # noqa: N806
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code")) in _S3_CODES
    if isinstance(exc, (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError, ClientConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
        return True
    nxt = exc.__cause__ or exc.__context__
    return nxt is not exc and transient(nxt, _depth + 1)


def _retrying(op):
    """Retry a whole remote Storage operation on transient errors with backoff, for at most $KILN_STORAGE_RETRY_S
    (local storage: no retry)."""

    @functools.wraps(op)
    def wrapper(self, *args, **kwargs):
        window = float(os.environ.get("KILN_STORAGE_RETRY_S", 120))
        t0, delay, attempt = time.monotonic(), 0.5, 0
        while True:
            attempt += 1
            try:
                return op(self, *args, **kwargs)
            except Exception as e:
                if self.is_local or not transient(e):  # a local EBUSY or EAGAIN is no network hiccup
                    raise
                waited = time.monotonic() - t0
                if waited + delay > window:
                    what = f"{op.__name__}({', '.join(map(repr, args))})"
                    raise StorageUnavailable(
                        f"storage {self.uri} unreachable: {self.endpoint()} failed {attempt} times over "
                        f"{waited:.0f} s ({what}; last error {type(e).__name__}: {e}). Nothing partial is made "
                        f"visible: re-run the same command once it is back (completed stages are skipped)",
                        self.endpoint()) from e
                log.warning("storage %s: %s failed (%s: %s), retry %d in %.1f s", self.uri, op.__name__,
                            type(e).__name__, e, attempt, delay)
                self.fs.invalidate_cache()
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 16.0)

    return wrapper


class _GzipWriter(gzip.GzipFile):
    """GzipFile that also closes the file it writes into (fsspec's gzip wrapper leaves it open)."""

    def close(self):
        raw = self.fileobj
        try:
            super().close()
        finally:
            if raw is not None:
                raw.close()


def _folder_cls():
    from datatrove.io import DataFolder
    from fsspec.core import get_compression

    class StableFolder(DataFolder):
        """A datatrove DataFolder whose gzip outputs are byte-reproducible (header mtime 0, no file name)."""

        def open(self, path, mode="rb", *args, **kwargs):
            comp = kwargs.get("compression")
            if comp is None or "r" in mode or get_compression(path, comp) != "gzip":
                return super().open(path, mode, *args, **kwargs)
            kwargs.pop("compression")
            text = {k: kwargs.pop(k) for k in ("encoding", "errors", "newline") if k in kwargs}
            f = _GzipWriter(filename="", fileobj=super().open(path, "wb", *args, **kwargs), mode="wb", mtime=0)
            return f if "b" in mode else io.TextIOWrapper(f, **text)

    StableFolder.__module__, StableFolder.__qualname__ = __name__, "StableFolder"
    return StableFolder


def __getattr__(name: str):  # StableFolder is created once, on first use (datatrove takes ~0.6 s to import); it
    if name == "StableFolder":  # pickles by reference: worker processes resolve it here again
        globals()[name] = _folder_cls()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    def endpoint(self) -> str:
        """Where this storage lives, for messages: the S3 endpoint and bucket, or the local folder."""
        if self.is_local:
            return f"local folder {self.uri}"
        client = getattr(self.fs, "client_kwargs", None) or {}
        bucket = self.uri.split("://", 1)[1].split("/", 1)[0]
        return f"S3 endpoint {client.get('endpoint_url') or 'AWS default'} (bucket {bucket})"

    def datafolder(self, rel: str = ""):
        """A datatrove DataFolder on the same filesystem (for readers and writers); its gzip output is
        byte-reproducible (``StableFolder``)."""
        cls = globals().get("StableFolder") or __getattr__("StableFolder")
        return cls(self._p(rel), fs=self.fs, auto_mkdir=True)

    # -- queries ------------------------------------------------------------------------------------
    @_retrying
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    @_retrying
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

    @_retrying
    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    @_retrying
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

    @_retrying
    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Whole file, or the byte range [start, end) (a ranged GET on S3)."""
        if start is None:
            return self.fs.cat_file(self._p(rel))
        return self.fs.cat_file(self._p(rel), start=start, end=end)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    @_retrying
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: readers see the old file or the whole new one, never a part."""
        path = self._p(rel)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # a full disk leaves neither the new file nor its temporary copy
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:  # a single PUT is atomic on S3
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    @_retrying
    def put_file(self, local_path: str, rel: str) -> None:
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(self._p(rel)), exist_ok=True)
        self.fs.put_file(local_path, self._p(rel))

    @_retrying
    def get_file(self, rel: str, local_path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        self.fs.get_file(self._p(rel), local_path)
        return local_path

    @_retrying
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
