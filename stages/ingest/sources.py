"""Input listing of ingest: globs, folders, s3:// and http(s):// URLs -> (file, size), balanced over tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.config import resolve_path
from stages.core.runner import StageError

if TYPE_CHECKING:
    from stages.core.runner import StageContext


def balance(files: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Split (path, size) into n shards of similar total size (largest first, to the lightest shard)."""
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for path, size in sorted(files, key=lambda x: (-x[1], x[0])):
        i = load.index(min(load))
        shards[i].append(path)
        load[i] += size
    return [sorted(s) for s in shards]


def input_files(cfg, ctx: StageContext) -> list[tuple[str, int]]:
    from fsspec.core import url_to_fs

    from stages.core.storage import _s3_options, expand_inputs

    if not cfg.inputs:
        raise StageError("ingest.inputs is empty: list at least one WARC file or glob")
    out = []
    for pattern in cfg.inputs:
        resolved = resolve_path(ctx.cfg, pattern)
        try:
            matches = expand_inputs([resolved])
        except Exception as e:
            raise StageError(f"ingest.inputs: cannot list '{resolved}': {type(e).__name__}: {e}") from None
        if not matches:
            raise StageError(f"ingest.inputs: '{pattern}' matches no file (resolved to {resolved})")
        for m in matches:
            fs, p = url_to_fs(m, **(_s3_options() if m.startswith("s3://") else {}))
            out.append((m, int(fs.size(p) or 0)))
    return list(dict.fromkeys(out))


