"""What each input file of ingest is, by content as far as that is cheap: part of ingest's fingerprint
(``external_inputs``: a crawl file replaced or edited under the same path re-runs ingest) and recorded in its
manifest (``metrics.input_files``, one entry per file in the order of ``metrics.inputs``).

One entry per file, ``{"path": <URL or path>, "bytes": <size>, ...}`` and how it was identified:
- local files: ``sha256`` of the whole file (like a manifest's outputs), smallest files first, while the bytes
  hashed stay within ``hash_budget`` (``ingest.hash_budget_mb``, default 1 GiB); files past the budget:
  ``mtime_ns`` and ``head_tail_sha256`` (sha256 of the first and last 64 KiB: a swapped file shows at once).
  Measured here (2 cores, SHA-NI, files in the page cache): the 16.5 MB sample crawl (6 files) in 15 ms
  (1.1 GB/s), one 194 MB file in 124 ms (1.57 GB/s; 1.8 GB/s from memory); a file past the budget 0.3 ms.
  So the budget costs at most ~0.7 s per fingerprint when cached (from a cold disk: its read speed), and a TB
  crawl ~0.7 s + 128 KiB read per file past the budget, instead of ~11 min to hash it all. A hashed file
  is identified by content only (a copy or ``touch`` keeps the fingerprint); a file past the budget by size,
  mtime and its two ends: an edit in its middle that keeps its size and mtime goes unseen (the make/rsync
  assumption). No cache of hashes across calls: a write within the same clock tick as an earlier hash would
  keep size, mtime and ctime (git's "racy" case); ingest hashes twice per run (fingerprint, then manifest).
- S3 (and other object stores): ``etag`` from the listing (one request per folder or glob; no download);
  ``last_modified`` where a store gives no ETag. The listing is read afresh (``sources.expand``): without that,
  s3fs's listing cache (per process) kept a replaced object's old entry and the reader, opening it against that,
  lost the new object's pages (test_s3_object_replaced_under_the_same_key_reruns_ingest then fails).
- http(s): ``etag``, ``last_modified`` (and ``content_md5`` / ``digest`` if sent) from the HEAD request that
  sizes the file; a server that sends none of them gets ``"unverified": ...`` saying so (the URL and
  Content-Length are all there is: a change under the same URL and size goes unseen), never an error.
- Common Crawl files (``ingest.common_crawl``): in the fingerprint, by the list the crawl's paths listing
  resolves to (``listed_in``: no request per file; a crawl's files never change); in the manifest also what
  the HEAD that sized each file said (ETag, ...).
A file that cannot be read while identifying it gets ``"unreadable": <error>`` (the reader counts it).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

SAMPLE = 64 << 10  # bytes at each end of a file past the hash budget
# fsspec info keys -> manifest keys: content tags; dates too for http, for object stores only without a tag
_TAGS = (("ETag", "etag"), ("etag", "etag"), ("Content-MD5", "content_md5"), ("Digest", "digest"),
         ("md5Hash", "md5"))
_DATES = (("Last-Modified", "last_modified"), ("LastModified", "last_modified"), ("last_modified", "last_modified"),
          ("updated", "last_modified"))
UNVERIFIED = "server sent no ETag, Last-Modified or digest: identified by URL and size only"


def _local(url: str) -> str | None:
    """The local path of ``url``, or None if it is remote."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _sha256(path: str, sample: bool) -> str:
    """sha256 of the whole file, or (``sample``) of its first and last ``SAMPLE`` bytes."""
    with open(path, "rb") as f:
        if not sample:
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256(f.read(SAMPLE))
        size = os.fstat(f.fileno()).st_size
        if size > SAMPLE:
            f.seek(max(SAMPLE, size - SAMPLE))
            h.update(f.read(SAMPLE))
        return h.hexdigest()


def _remote(url: str, info: dict) -> dict:
    out: dict = {"path": url} | ({"bytes": int(info["size"])} if info.get("size") is not None else {})
    said: dict = {}
    for key, name in _TAGS:
        if info.get(key) and name not in said:
            said[name] = str(info[key]).strip('"')
    http = url.startswith(("http://", "https://"))
    if http or not said:  # http: every validator the server sent; object stores: a date where no ETag
        for key, name in _DATES:
            if info.get(key) and name not in said:
                v = info[key]
                said[name] = v.isoformat() if isinstance(v, datetime) else str(v)
    out |= said
    if "listed_in" in info:
        out["listed_in"] = info["listed_in"]
    elif not said:
        out["unverified"] = UNVERIFIED if http else "no ETag or modification date listed: identified by size only"
    return out


def identities(files: list[tuple[str, dict]], hash_budget: int) -> list[dict]:
    """One identity per (URL or path, info) of ``sources.listing``, in the same order (see the module doc)."""
    out: dict[str, dict] = {}
    local: list[tuple[int, str, str, os.stat_result]] = []
    for url, info in files:
        path = _local(url)
        if path is None:
            out[url] = _remote(url, info)
            continue
        try:
            st = os.stat(path)
            local.append((st.st_size, url, path, st))
        except OSError as e:
            out[url] = {"path": url, "bytes": None, "unreadable": type(e).__name__}
    spent, jobs = 0, []
    for size, url, path, st in sorted(local, key=lambda x: (x[0], x[1])):  # smallest first, within the budget
        whole = spent + size <= hash_budget
        spent += size if whole else 0
        out[url] = {"path": url, "bytes": size} if whole else {"path": url, "bytes": size, "mtime_ns": st.st_mtime_ns}
        jobs.append((url, path, not whole))

    def digest(job):
        url, path, sample = job
        try:
            return url, ("head_tail_sha256" if sample else "sha256"), _sha256(path, sample)
        except OSError as e:
            return url, "unreadable", type(e).__name__

    with ThreadPoolExecutor(2) as pool:  # hashlib releases the GIL: two files at once on 2 cores
        for url, key, value in pool.map(digest, jobs):
            out[url][key] = value
    return [out[url] for url, _ in files]
