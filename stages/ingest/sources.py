"""Input listing of ingest: paths, folders, globs, s3:// prefixes, http(s):// URLs and Common Crawl crawl ids
-> (file URL, size in bytes), balanced over tasks by size.

- a folder (local or an s3:// prefix) contributes every file below it whose name ``file_kind`` knows; other files
  there (indexes, READMEs) are ignored with one log line;
- a path, glob match or URL named directly must have a known extension, else one StageError line;
- ``common_crawl`` fetches ``{base_url}crawl-data/{crawl}/{kind}.paths.gz`` (the listing Common Crawl publishes,
  one path per line: crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc/CC-MAIN-...-00000.warc.gz),
  takes the segments ``[start, stop)`` of the sorted unique segment ids and the first ``files_per_segment``
  files of each, and reads them from ``{base_url}{path}`` (https://data.commoncrawl.org/ or s3://commoncrawl/).
Sizes come from the filesystem (a HEAD request for http); an http file whose size is unknown counts as 0.
``listing`` is the one resolution of the inputs: ingest reads what it lists and its fingerprint identifies the
same files (``identity.py``).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from stages.core.config import Strict, resolve_path
from stages.core.runner import StageError
from stages.ingest.readers import SUPPORTED, file_kind

if TYPE_CHECKING:
    from stages.core.runner import StageContext

log = logging.getLogger("kiln.ingest")
CRAWL_ID = re.compile(r"CC-MAIN-(\d{4})-(\d{2})")


class CommonCrawl(Strict):
    """``ingest.common_crawl``: files of one Common Crawl crawl, chosen by segment."""

    crawl: str  # crawl id, CC-MAIN-YYYY-WW (https://commoncrawl.org/overview lists them)
    segments: tuple[int, int] = (0, 1)  # [start, stop) indexes into the crawl's sorted segment ids
    files_per_segment: int = Field(1, ge=1)  # the first N files (by name) of each segment
    kind: Literal["warc", "wet"] = "warc"  # warc: HTML to extract; wet: Common Crawl's extracted text
    base_url: str = "https://data.commoncrawl.org/"  # or s3://commoncrawl/ (AWS credentials needed)

    @field_validator("crawl")
    @classmethod
    def _crawl_id(cls, v: str) -> str:
        m = CRAWL_ID.fullmatch(v.strip())
        if not m or not 2013 <= int(m.group(1)) <= 2100 or not 1 <= int(m.group(2)) <= 53:
            raise ValueError("crawl id must look like CC-MAIN-YYYY-WW (e.g. CC-MAIN-2024-22)")
        return v.strip()

    @field_validator("base_url")
    @classmethod
    def _slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "s3://", "file://", "/")):
            raise ValueError("base_url must be an http(s)://, s3:// or file URL")
        return v if v.endswith("/") else v + "/"

    @model_validator(mode="after")
    def _range(self):
        start, stop = self.segments
        if not 0 <= start < stop:
            raise ValueError(f"segments must be [start, stop) with 0 <= start < stop, got {list(self.segments)}")
        return self


def balance(files: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Split (path, size) into n shards of similar total size (largest first, to the lightest shard)."""
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for path, size in sorted(files, key=lambda x: (-x[1], x[0])):
        i = load.index(min(load))
        shards[i].append(path)
        load[i] += size
    return [sorted(s) for s in shards]


def _fs(url: str):
    from fsspec.core import url_to_fs

    from stages.core.storage import _s3_options

    return url_to_fs(url, **(_s3_options() if url.startswith("s3://") else {}))


def _with_proto(url: str, path: str) -> str:
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""
    return path if path.startswith(proto) else proto + path


def infos(urls: list[str], strict: bool) -> list[tuple[str, dict]]:
    """(url, info) for each URL, asked in parallel (one HEAD each for http: size, ETag, Last-Modified, ...). A
    failure is a StageError when ``strict`` (files the user named), else ``{"size": 0}`` and a warning (files
    from a listing)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(url: str) -> tuple[str, dict]:
        try:
            fs, p = _fs(url)
            info = dict(fs.info(p))
            return url, {**info, "size": int(info.get("size") or 0)}
        except Exception as e:
            if strict:
                raise StageError(f"ingest.inputs: cannot reach '{url}': {type(e).__name__}: {e}") from None
            log.warning("ingest: size of %s unknown (%s: %s); read anyway", url, type(e).__name__, e)
            return url, {"size": 0}

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, urls))


def expand(pattern: str) -> list[tuple[str, dict | None]]:
    """Files of one input entry (a file, folder (recursive), glob or URL) as sorted (URL/path, info): the
    filesystem's entry (size; on S3 also ETag, LastModified), from the listing (one request per folder or glob
    on S3, read afresh: a cached listing would hide an object replaced since); None for http(s) URLs (no
    listing there)."""
    if pattern.startswith(("http://", "https://")):
        return [(pattern, None)]
    try:
        fs, p = _fs(pattern)
        fs.invalidate_cache()
        if any(c in pattern for c in "*?["):
            matches = fs.glob(p, detail=True)
        else:
            matches = {p: fs.info(p)} if fs.exists(p) else {}
        out, ignored = {}, []
        for m, info in sorted(matches.items()):
            if info.get("type") == "directory":
                for f, finfo in sorted(fs.find(m, detail=True).items()):
                    if file_kind(f):
                        out[f] = finfo
                    else:
                        ignored.append(f)
            else:
                out[m] = info
    except Exception as e:
        raise StageError(f"ingest.inputs: cannot list '{pattern}': {type(e).__name__}: {e}") from None
    if ignored:
        log.warning("ingest: %d files of unknown type ignored under %s (e.g. %s)", len(ignored), pattern, ignored[0])
    return [(_with_proto(pattern, m), {**info, "size": int(info.get("size") or 0)}) for m, info in out.items()]


def common_crawl_urls(cc: CommonCrawl) -> list[str]:
    """The file URLs ``cc`` selects from the crawl's published path listing."""
    import gzip

    from stages.ingest.readers import open_raw

    listing = f"{cc.base_url}crawl-data/{cc.crawl}/{cc.kind}.paths.gz"
    try:
        with open_raw(listing) as f:
            lines = gzip.decompress(f.read()).decode("utf-8").split()
    except Exception as e:
        raise StageError(f"ingest.common_crawl: cannot read the listing {listing}: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}") from None
    by_segment: dict[str, list[str]] = {}
    for line in lines:
        parts = line.split("/")
        if len(parts) >= 6 and parts[:3] == ["crawl-data", cc.crawl, "segments"] and parts[4] == cc.kind:
            by_segment.setdefault(parts[3], []).append(line)
    if not by_segment:
        raise StageError(f"ingest.common_crawl: {listing} lists no {cc.kind} file of {cc.crawl} "
                         f"({len(lines)} lines)")
    segs = sorted(by_segment)
    start, stop = cc.segments
    if stop > len(segs):
        raise StageError(f"ingest.common_crawl: segments [{start}, {stop}) but {cc.crawl} has {len(segs)} segments")
    return [cc.base_url + p for s in segs[start:stop] for p in sorted(by_segment[s])[: cc.files_per_segment]]


def listing(cfg, kiln_cfg, head_common_crawl: bool = True) -> list[tuple[str, dict]]:
    """All input files of ingest as (URL or path, info), de-duplicated, in a stable order: what ingest reads
    (``run``) and what its fingerprint identifies (``external_inputs``). ``info`` has ``size`` and what the
    filesystem said of the file (S3: ETag; http: ETag, Last-Modified, ...). Common Crawl files get one HEAD
    each (their sizes balance the tasks) unless not ``head_common_crawl``: then ``{"listed_in": <listing URL>}``
    (a crawl's files never change: the list identifies them)."""
    if not cfg.inputs and cfg.common_crawl is None:
        raise StageError("ingest.inputs is empty and no ingest.common_crawl is set: nothing to read")
    named: dict[str, dict | None] = {}
    for pattern in cfg.inputs:
        resolved = resolve_path(kiln_cfg, pattern)
        matches = expand(resolved)
        if not matches:
            raise StageError(f"ingest.inputs: '{pattern}' matches no file (resolved to {resolved})")
        named |= dict(matches)
    unknown = [m for m in named if not file_kind(m)]
    if unknown:
        raise StageError(f"ingest.inputs: unknown file type '{unknown[0]}' ({len(unknown)} such files); "
                         f"readable: {SUPPORTED}")
    out = [(u, info) for u, info in named.items() if info is not None]
    out += infos([u for u, info in named.items() if info is None], strict=True)
    if (cc := cfg.common_crawl) is not None:
        listed_in = f"{cc.base_url}crawl-data/{cc.crawl}/{cc.kind}.paths.gz"
        urls = common_crawl_urls(cc)
        found = infos(urls, strict=False) if head_common_crawl else [(u, {}) for u in urls]
        out += [(u, {**info, "listed_in": listed_in}) for u, info in found]
    return list(dict(out).items())


def sizes(listed: list[tuple[str, dict]]) -> list[tuple[str, int]]:
    """``listing``'s files as (URL or path, size in bytes; 0 if unknown): what ``balance`` spreads over tasks."""
    return [(u, int(info.get("size") or 0)) for u, info in listed]


def input_files(cfg, ctx: StageContext) -> list[tuple[str, int]]:
    """All input files of ingest as (URL or path, size in bytes; 0 if unknown), as ``listing`` orders them."""
    return sizes(listing(cfg, ctx.cfg))
