"""The dedup stage's datatrove blocks: signature (per task) -> cluster (one task) -> filter (per task).

Blocks are created by factories (datatrove is imported lazily) and take only strings and numbers, so they
pickle into any executor's workers. ``scratch`` is a folder every task can reach: the local executor's
``ctx.workdir``; on a multi-node executor a shared filesystem path (the cluster step memory-maps the shingle
files found there).

Scratch layout: ``tasks/<rank>/`` one document table per signature task (see ``index.py``), in the order the
task's reader yields documents; ``decisions/<rank>.npz`` the positions (and ids, as a check) of the documents
the filter task of that rank drops, with the reason.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from datetime import datetime, timezone
from functools import lru_cache

import numpy as np

from stages.dedup.index import (ARRAYS, DOCS, NO_DATE, SHINGLES, DedupIndex, PriorDocs, npz_bytes,
                                parquet_bytes)

SCRATCH_DOCS = "docs.json"  # per-task strings in scratch: JSON columns (workers need not import pyarrow)

DUPLICATES = "duplicates.jsonl.gz"


def task_folder(scratch: str, rank: int) -> str:
    return os.path.join(scratch, "tasks", f"{rank:05d}")


def decisions_file(scratch: str, rank: int) -> str:
    return os.path.join(scratch, "decisions", f"{rank:05d}.npz")


def content_text(text: str) -> str:
    """What exact dedup compares: the text with whitespace runs collapsed (``content_hash`` hashes this)."""
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _space_table() -> np.ndarray:
    """bool[0x110000]: the code points ``str.split()`` splits on (``str.isspace``)."""
    table = np.zeros(0x110000, dtype=bool)
    table[[i for i in range(0x3001) if chr(i).isspace()]] = True  # U+3000 is the last space character
    return table


def content_hash(text: str) -> int:
    """xxh3-64 of ``content_text(text)``'s code points (uint8 when all are ASCII, else uint32), computed with
    numpy: ~5x faster than splitting and joining the text."""
    import xxhash

    if text.isascii():
        cp = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        space = _space_table()[:128][cp]
    else:
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        space = _space_table()[cp]
    solid = np.flatnonzero(~space)
    if solid.size == 0:
        return xxhash.xxh3_64_intdigest(b"")
    cp, space = cp[solid[0]:solid[-1] + 1], space[solid[0]:solid[-1] + 1]
    keep = ~space
    keep[1:] |= ~space[:-1]  # the first space of each run stays (as " ")
    out = np.where(space, 32, cp)[keep]
    if out.dtype != np.uint8 and (out.size == 0 or out.max() < 128):
        out = out.astype(np.uint8)
    return xxhash.xxh3_64_intdigest(out.tobytes())


@lru_cache(maxsize=4096)
def crawl_time(value) -> int:
    """Epoch seconds of an ISO 8601 date (naive = UTC); NO_DATE when missing or unreadable."""
    if not value:
        return NO_DATE
    try:
        d = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return NO_DATE
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return int(d.timestamp())


def _quality(value) -> float:
    try:
        q = float(value)
    except (TypeError, ValueError):
        return math.nan
    return q if math.isfinite(q) else math.nan


class TableWriter:
    """Builds one document table: shingles streamed to disk, small arrays and strings kept until close."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.sh = open(os.path.join(folder, SHINGLES), "wb")
        self.cols: dict[str, list] = {k: [] for k in ("content_hash", "url_hash", "date", "length", "quality",
                                                      "signature")}
        self.offsets = [0]
        self.strings: dict[str, list] = {"id": [], "url": [], "date": []}

    def add(self, *, content_hash: int, url_hash: int, date: int, length: int, quality: float,
            signature: np.ndarray, shingles: np.ndarray, id: str, url: str, date_str: str) -> None:
        for k, v in (("content_hash", content_hash), ("url_hash", url_hash), ("date", date),
                     ("length", length), ("quality", quality), ("signature", signature)):
            self.cols[k].append(v)
        self.sh.write(np.ascontiguousarray(shingles, dtype="<u8").tobytes())
        self.offsets.append(self.offsets[-1] + len(shingles))
        for k, v in (("id", id), ("url", url), ("date", date_str)):
            self.strings[k].append(v)

    def close(self, minhasher) -> int:
        """Writes the arrays (band keys of all signatures at once: one vectorized pass) and the strings."""
        self.sh.close()
        c = self.cols
        sigs = np.array(c["signature"], dtype=np.uint64).reshape(-1, minhasher.num_hashes)
        arrays = {"content_hash": np.array(c["content_hash"], dtype=np.uint64),
                  "url_hash": np.array(c["url_hash"], dtype=np.uint64),
                  "date": np.array(c["date"], dtype=np.int64), "length": np.array(c["length"], dtype=np.int64),
                  "quality": np.array(c["quality"], dtype=np.float64),
                  "band_keys": minhasher.band_keys(sigs).reshape(-1, minhasher.bands),
                  "offsets": np.array(self.offsets, dtype=np.int64)}
        with open(os.path.join(self.folder, ARRAYS), "wb") as f:
            f.write(npz_bytes(arrays))
        with open(os.path.join(self.folder, SCRATCH_DOCS), "w") as f:
            json.dump(self.strings, f)
        return len(self.offsets) - 1


def signature_block_cls():
    from datatrove.pipeline.base import PipelineStep

    class DedupSignature(PipelineStep):
        """Per document: content hash, URL hash, crawl date, length, quality, shingles, band keys -> scratch."""

        name = "🔏 dedup signature"
        type = "🫂 - DEDUP"

        def __init__(self, scratch: str, n_grams: int, bands: int, rows: int, seed: int):
            super().__init__()
            self.scratch, self.params = scratch, dict(n_grams=n_grams, bands=bands, rows=rows, seed=seed)

        def run(self, data, rank: int = 0, world_size: int = 1):
            import xxhash

            from stages.dedup.minhash import MinHasher

            mh = MinHasher(**self.params)
            out = TableWriter(task_folder(self.scratch, rank))
            for doc in data:
                with self.track_time():
                    meta = doc.metadata or {}
                    url, date = meta.get("url") or "", meta.get("date") or ""
                    shingles = mh.shingles(doc.text)
                    sig = mh.signature(shingles)
                    t = crawl_time(str(date)) if date else NO_DATE
                    q = _quality(meta.get("quality_score"))
                    out.add(content_hash=content_hash(doc.text),
                            url_hash=xxhash.xxh3_64_intdigest(url) if url else 0, date=t, length=len(doc.text),
                            quality=q, signature=sig, shingles=shingles, id=str(doc.id),
                            url=str(url), date_str=str(date))
                self.stat_update("documents")
                if t == NO_DATE:
                    self.stat_update("no_date")
                if not url:
                    self.stat_update("no_url")
                if not len(shingles):
                    self.stat_update("no_words")
            out.close(mh)

    return DedupSignature


def cluster_block_cls():
    from datatrove.pipeline.base import PipelineStep

    class DedupCluster(PipelineStep):
        """One task: decisions over all signature tables and the index; writes per-task decisions, the
        duplicates report (``out_uri``/duplicates.jsonl.gz) and, with an index, this snapshot's new segment
        (not yet committed: the stage commits it after the filter has written the data)."""

        name = "🔗 dedup cluster"
        type = "🫂 - DEDUP"

        def __init__(self, scratch: str, tasks: int, out_uri: str, rules: dict, params: dict,
                     index_uri: str | None, snapshot: str, segment: str | None):
            super().__init__()
            self.scratch, self.tasks, self.out_uri, self.rules, self.params = scratch, tasks, out_uri, rules, params
            self.index_uri, self.snapshot, self.segment = index_uri, snapshot, segment

        def run(self, data=None, rank: int = 0, world_size: int = 1):
            from stages.core.storage import Storage
            from stages.dedup.cluster import KEEP, REASONS, ScratchTables, decide

            tables = ScratchTables([task_folder(self.scratch, r) for r in range(self.tasks)])
            index = DedupIndex(self.index_uri) if self.index_uri else None
            segments = index.prior_segments(index.load(), self.snapshot) if index else []
            prior = PriorDocs(index, segments, self.params["bands"])
            with self.track_time():
                d = decide(tables, prior, **self.rules)
            n = len(tables)
            removed = np.flatnonzero(d.reason != KEEP)
            # strings only for reported rows: removed documents and what they matched
            refs = np.concatenate([d.matched, d.kept])
            cur_rows = np.union1d(removed, refs[(refs >= 0) & (refs < n)])
            info = self._describe(tables, cur_rows)
            old = prior.describe(np.unique(refs[refs >= n]) - n) if (refs >= n).any() else {}
            rows = []
            for i in removed.tolist():
                m = int(d.matched[i])
                mi = info[m] if m < n else old[m - n]
                rows.append({"id": info[i]["id"], "url": info[i]["url"], "reason": REASONS[int(d.reason[i])],
                             "matched_id": mi["id"], "matched_url": mi["url"],
                             "matched_snapshot": self.snapshot if m < n else mi["snapshot"],
                             "jaccard": None if np.isnan(d.jaccard[i]) else round(float(d.jaccard[i]), 4),
                             "cluster": None if d.cluster[i] < 0 else int(d.cluster[i]),
                             "kept_id": None if d.kept[i] < 0 else
                             (info[int(d.kept[i])] if d.kept[i] < n else old[int(d.kept[i]) - n])["id"]})
            payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
            Storage(self.out_uri).write_bytes(DUPLICATES, gzip.compress(payload, mtime=0))
            for r in range(self.tasks):  # per filter task: positions to drop, ids as a check, reasons
                lo, hi = tables.first[r], tables.first[r + 1]
                pos = removed[(removed >= lo) & (removed < hi)]
                os.makedirs(os.path.dirname(decisions_file(self.scratch, r)), exist_ok=True)
                np.savez(decisions_file(self.scratch, r), pos=pos - lo, reason=d.reason[pos],
                         ids=np.array([info[i]["id"] for i in pos.tolist()], dtype=str))
            if index is not None:
                kept = self._write_segment(index, tables, d.reason == KEEP)
                d.counts["index"]["added_documents"] = kept
            # what the cluster step holds in memory per document (hashes, date, length, quality, band keys);
            # shingle sets stay on disk (memory-mapped) and are read for candidate pairs only
            d.counts["memory"] = {"table_bytes": int(sum(v.nbytes for v in tables.arrays.values())),
                                  "table_bytes_per_doc": round(sum(v.nbytes for v in tables.arrays.values())
                                                               / max(n, 1), 1)}
            self._stats(d.counts)
            with open(os.path.join(self.scratch, "counts.json"), "w") as f:
                json.dump(d.counts, f)

        @staticmethod
        def _describe(tables, rows: np.ndarray) -> dict[int, dict]:
            out = {}
            for task in np.unique([tables.locate(i)[0] for i in rows.tolist()]).tolist() if rows.size else []:
                members = rows[(rows >= tables.first[task]) & (rows < tables.first[task + 1])]
                for i, r in zip(members.tolist(),
                                tables.doc_rows(task, members - tables.first[task])):
                    out[i] = r
            return out

        def _write_segment(self, index: DedupIndex, tables, keep: np.ndarray) -> int:
            """This snapshot's kept documents as a new document table in the index (shingles streamed)."""
            st = index.storage
            arrays = {k: v[keep] for k, v in tables.arrays.items()}
            strings: dict[str, list] = {"id": [], "url": [], "date": []}
            lengths = []
            with st.open(f"{self.segment}/{SHINGLES}", "wb") as f:
                for task in range(self.tasks):
                    lo, hi = tables.first[task], tables.first[task + 1]
                    rows = np.flatnonzero(keep[lo:hi])
                    off = tables.offsets[task]
                    sh = tables.task_shingles(task)
                    for r in rows.tolist():
                        f.write(np.asarray(sh[off[r]:off[r + 1]], dtype="<u8").tobytes())
                        lengths.append(off[r + 1] - off[r])
                    for r in tables.doc_rows(task, rows):
                        for k in strings:
                            strings[k].append(r[k])
            arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
            st.write_bytes(f"{self.segment}/{DOCS}", parquet_bytes(strings))
            st.write_bytes(f"{self.segment}/{ARRAYS}", npz_bytes(arrays))  # last: a segment is whole with it
            return int(keep.sum())

        def _stats(self, counts: dict, prefix: str = "") -> None:
            for k, v in counts.items():
                if isinstance(v, dict):
                    self._stats(v, f"{prefix}{k}.")
                elif isinstance(v, (int, np.integer)) and v:
                    self.stat_update(f"{prefix}{k}", value=int(v))

    return DedupCluster


def filter_block_cls():
    from datatrove.pipeline.base import PipelineStep

    class DedupFilter(PipelineStep):
        """Drops the documents the cluster step removed (by position in this task's input; ids checked)."""

        name = "🧹 dedup filter"
        type = "🫂 - DEDUP"

        def __init__(self, scratch: str):
            super().__init__()
            self.scratch = scratch

        def run(self, data, rank: int = 0, world_size: int = 1):
            from stages.dedup.cluster import REASONS

            with np.load(decisions_file(self.scratch, rank)) as z:
                drop = dict(zip(z["pos"].tolist(), zip(z["reason"].tolist(), z["ids"].tolist())))
            for pos, doc in enumerate(data):
                self.stat_update("documents")
                hit = drop.get(pos)
                if hit is None:
                    yield doc
                    continue
                if str(doc.id) != hit[1]:
                    raise RuntimeError(f"dedup filter task {rank}: document {pos} is {doc.id!r}, the signature "
                                       f"step saw {hit[1]!r} (input order changed between the two passes)")
                self.stat_update("dropped")
                self.stat_update(f"dropped_{REASONS[hit[0]]}")

    return DedupFilter
