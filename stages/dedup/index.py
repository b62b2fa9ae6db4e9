"""Document tables (per-task scratch and persistent index segments) and the cross-snapshot dedup index.

A *document table* is a folder of three files, the same format for the per-task scratch of one run and for a
snapshot's segment in the persistent index:

- ``arrays.npz``: one row per document: ``content_hash`` (of the whitespace-collapsed text, ``blocks.py``),
  ``url_hash`` (xxh3-64 of the URL, 0 = no URL), ``date`` (crawl time, epoch seconds; ``NO_DATE`` if unknown),
  ``length`` (characters), ``quality`` (``metadata["quality_score"]``, NaN if absent), ``band_keys``
  ([n, bands] uint64) and ``offsets`` (int64 [n + 1] into the shingle file);
- ``shingles.u64``: every document's sorted unique shingle hashes, one flat little-endian uint64 array, so
  one document's set is the byte range ``[8 * offsets[i], 8 * offsets[i + 1])``: memory-mapped locally,
  a ranged GET on S3 (``Storage.read_bytes(path, start, end)``);
- ``docs.parquet``: ``id``, ``url``, ``date`` strings, read only for the rows a report needs (the per-task
  scratch keeps them as ``docs.json`` columns, so that worker processes need not import pyarrow).

The index (``DedupIndex``) is a folder in storage (local or s3://) with ``index.json`` (MinHash parameters and
the ordered list of snapshot segments) and ``segments/<snapshot>-<token>/`` document tables holding the
documents each snapshot *kept*. Updates are atomic: a run writes its new segment first (a fresh folder), and
only then replaces ``index.json`` in one write; a crash in between leaves the previous ``index.json`` and its
segments untouched (the orphaned folder is ignored, and removed by the snapshot's next successful run).

Writers: the commit (read ``index.json``, add or replace this snapshot's entry, write it back) and the orphan
cleanup run under the index's own lock (``DedupIndex.commit_locked``; runner's ``folder_lock`` on the index folder,
``<index>/.lock.json``, waiting up to $KILN_INDEX_LOCK_WAIT_S, default 300 s). Without it two runs with different
run ids sharing the index could both read the old ``index.json`` and the second write drop the first's snapshot
(tests/test_dedup.py: two processes committing in a loop lost entries). The rest of a run reads the index
unlocked: snapshots deduplicated at the same time do not see each other. Two runs of the *same* snapshot at once
are not supported (one's orphan cleanup can remove the other's uncommitted segment; its commit then fails).
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np

from stages.core.storage import Storage

ARRAYS, SHINGLES, DOCS = "arrays.npz", "shingles.u64", "docs.parquet"
INDEX_JSON = "index.json"
NO_DATE = np.iinfo(np.int64).max  # sorts after every real crawl date
ARRAY_KEYS = ("content_hash", "url_hash", "date", "length", "quality", "band_keys", "offsets")
FORMAT = 1


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def parquet_bytes(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()})
    pq.write_table(table, buf)
    return buf.getvalue()


def read_parquet_rows(data: bytes, rows: np.ndarray) -> list[dict]:
    """The given rows of a docs.parquet (all its string columns)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data)).take(np.asarray(rows, dtype=np.int64))
    return table.to_pylist()


def coalesced_ranges(starts: np.ndarray, ends: np.ndarray, gap: int = 1 << 16) -> list[tuple[int, int, list[int]]]:
    """Merge byte ranges (sorted by start) closer than ``gap`` into fewer reads: [(start, end, [member])]."""
    out: list[tuple[int, int, list[int]]] = []
    for k in np.argsort(starts, kind="stable").tolist():
        s, e = int(starts[k]), int(ends[k])
        if out and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], e), out[-1][2] + [k])
        else:
            out.append((s, e, [k]))
    return out


def index_storage(spec: str, storage_root: str) -> Storage:
    """The index folder: a URL or absolute path as given, else relative to the storage root."""
    if "://" in spec or spec.startswith("/"):
        return Storage(spec)
    return Storage(storage_root).sub(spec.strip("/"))


def _safe(snapshot: str) -> str:
    """A snapshot name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", snapshot)[:80]


class DedupIndex:
    """The persistent index: ``index.json`` plus one document-table segment per snapshot."""

    def __init__(self, uri: str):
        self.uri = uri
        self.storage = Storage(uri)

    def load(self) -> dict:
        if not self.storage.exists(INDEX_JSON):
            return {"format": FORMAT, "params": None, "segments": []}
        return self.storage.read_json(INDEX_JSON)

    def check_params(self, state: dict, params: dict) -> str | None:
        """Why this index cannot be used with ``params`` (None if it can)."""
        if state.get("format", FORMAT) != FORMAT:
            return f"dedup index {self.uri} has format {state.get('format')}, this code reads {FORMAT}"
        if state["params"] not in (None, params):
            return (f"dedup index {self.uri} was built with MinHash settings {state['params']}, not {params}: "
                    f"use the same dedup settings or another dedup.index")
        return None

    @staticmethod
    def prior_segments(state: dict, snapshot: str) -> list[dict]:
        """Segments of the snapshots before ``snapshot`` (all of them if it is new; a re-run of a snapshot
        sees only those listed before its own segment, never itself)."""
        segs = state["segments"]
        for i, seg in enumerate(segs):
            if seg["snapshot"] == snapshot:
                return segs[:i]
        return list(segs)

    @staticmethod
    def new_segment_path(snapshot: str) -> str:
        return f"segments/{_safe(snapshot)}-{uuid.uuid4().hex[:12]}"

    def orphaned_segments(self, snapshot: str, state: dict) -> list[str]:
        """Segment folders of ``snapshot`` that ``state`` (index.json) does not list: written by an attempt that
        died before its commit (tests/test_deploy_faults.py kills one there). Only this snapshot's names match
        (``<safe name>-<12 hex>``), so other snapshots' segments are never touched."""
        listed = {seg["path"] for seg in state["segments"]}
        name = re.compile(rf"segments/{re.escape(_safe(snapshot))}-[0-9a-f]{{12}}")
        found = {"/".join(p.split("/")[:2]) for p in self.storage.list("segments")}
        return sorted(f for f in found if name.fullmatch(f) and f not in listed)

    @contextmanager
    def locked(self, purpose: str = "", wait_s: float | None = None):
        """Hold the index's lock (``<index>/.lock.json``) around a read-modify-write of ``index.json``: other
        writers wait up to ``wait_s`` (default $KILN_INDEX_LOCK_WAIT_S, else 300 s; a commit takes well under a
        second, a dead holder on this host is taken over at once, on another host after $KILN_LOCK_STALE_S)."""
        from stages.core.runner import folder_lock

        wait_s = float(os.environ.get("KILN_INDEX_LOCK_WAIT_S", 300)) if wait_s is None else wait_s
        poll_s = 0.05 if self.storage.is_local else 1.0  # on S3 a poll is a conditional PUT and two GETs
        with folder_lock(self.storage, f"dedup index {self.uri}", purpose, wait_s=wait_s, poll_s=poll_s) as token:
            yield token

    def commit_locked(self, snapshot: str, entry: dict, params: dict, purpose: str = "") -> tuple[str | None, list]:
        """What a dedup run does once its segment is written, under the index lock: check the segment is still
        there, ``commit``, remove the segment it replaced and this snapshot's orphans. Returns (replaced, orphans
        removed)."""
        from stages.core.runner import StageError

        with self.locked(purpose):
            if not self.storage.exists(f"{entry['path']}/{ARRAYS}"):
                raise StageError(f"dedup: this run's index segment {self.storage.url(entry['path'])} is gone "
                                 f"(removed by a concurrent run of snapshot '{snapshot}'?): nothing committed; "
                                 f"run it again")
            replaced = self.commit(snapshot, entry, params)
            if replaced and replaced != entry["path"]:
                self.remove(replaced)
            orphans = self.orphaned_segments(snapshot, self.load())  # an earlier attempt killed before its commit
            for path in orphans:
                self.remove(path)
        return replaced, orphans

    def commit(self, snapshot: str, entry: dict, params: dict) -> str | None:
        """Point ``index.json`` at the (already written) segment ``entry["path"]`` for ``snapshot``, in one
        atomic write; returns the path of the segment it replaced (a re-run of the snapshot), if any. Unlocked:
        runs use ``commit_locked``."""
        state = self.load()
        segs = list(state["segments"])
        entry = {**entry, "snapshot": snapshot,
                 "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        replaced = None
        for i, seg in enumerate(segs):
            if seg["snapshot"] == snapshot:
                replaced, segs[i] = seg["path"], entry
                break
        else:
            segs.append(entry)
        self.storage.write_json(INDEX_JSON, {"format": FORMAT, "params": params, "segments": segs})
        return replaced

    def remove(self, path: str) -> None:
        self.storage.rm(path)


class PriorDocs:
    """The documents of earlier snapshots: small per-document arrays in memory (hashes, band keys, offsets);
    shingle sets fetched on demand with ranged reads; strings read only for reported rows."""

    def __init__(self, index: DedupIndex | None, segments: list[dict], bands: int):
        self.index, self.segments = index, segments
        parts = [load_npz(index.storage.read_bytes(f"{s['path']}/{ARRAYS}")) for s in segments] if index else []
        self.seg_of = np.concatenate([np.full(len(p["content_hash"]), i, dtype=np.int32)
                                      for i, p in enumerate(parts)]) if parts else np.empty(0, np.int32)
        self.row = np.concatenate([np.arange(len(p["content_hash"])) for p in parts]) if parts else np.empty(0, int)

        def cat(key, dtype, shape=(0,)):
            return np.concatenate([p[key] for p in parts]) if parts else np.empty(shape, dtype)

        self.content_hash = cat("content_hash", np.uint64)
        self.url_hash = cat("url_hash", np.uint64)
        self.band_keys = cat("band_keys", np.uint64, (0, bands))
        self.start = np.concatenate([p["offsets"][:-1] for p in parts]) if parts else np.empty(0, np.int64)
        self.end = np.concatenate([p["offsets"][1:] for p in parts]) if parts else np.empty(0, np.int64)
        self.fetched_sets = 0
        self.fetched_bytes = 0
        self.reads = 0

    def __len__(self) -> int:
        return len(self.content_hash)

    def shingles(self, ids) -> dict[int, np.ndarray]:
        """Shingle sets of the given prior documents, by ranged reads of only those byte ranges."""
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        out: dict[int, np.ndarray] = {}
        for seg in np.unique(self.seg_of[ids]).tolist():
            members = ids[self.seg_of[ids] == seg]
            path = f"{self.segments[seg]['path']}/{SHINGLES}"
            starts, ends = self.start[members] * 8, self.end[members] * 8
            for lo, hi, ks in coalesced_ranges(starts, ends):
                data = self.index.storage.read_bytes(path, lo, hi) if hi > lo else b""
                self.reads += 1
                self.fetched_bytes += len(data)
                for k in ks:
                    a, b = int(starts[k]) - lo, int(ends[k]) - lo
                    out[int(members[k])] = np.frombuffer(data[a:b], dtype="<u8").astype(np.uint64)
            self.fetched_sets += len(members)
        return out

    def describe(self, ids) -> dict[int, dict]:
        """{prior id: {"id", "url", "date", "snapshot"}} from the segments' docs.parquet."""
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        out = {}
        for seg in np.unique(self.seg_of[ids]).tolist():
            members = ids[self.seg_of[ids] == seg]
            rows = read_parquet_rows(self.index.storage.read_bytes(f"{self.segments[seg]['path']}/{DOCS}"),
                                     self.row[members])
            for k, r in zip(members.tolist(), rows):
                out[k] = {**r, "snapshot": self.segments[seg]["snapshot"]}
        return out


def load_index_json(uri: str) -> dict:
    return json.loads(Storage(uri).read_bytes(INDEX_JSON))
