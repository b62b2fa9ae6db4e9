"""Ingest throughput on the sample crawl (../shared/data/crawl: 6 gzipped WARC files, 2,397 records, 2,391 pages).

- reader: the ingest reader block alone (``stages.ingest.readers``), in this process, 1 thread: every record read,
  classified, its HTML decoded to str; on the gzipped files (per-record gzip, as crawlers write them) and on the
  same files uncompressed (written once under bench/_work/ingest). Best of 3 runs. MB/s are of the files read
  (compressed bytes for .warc.gz) and of the uncompressed WARC bytes.
- raw iteration, for the reader-library choice: warcio vs FastWARC iterating the gzipped files and reading every
  response payload (no classification or decoding): what switching library could gain at most.
- whole ingest: ``run_stage("ingest")`` with the tiny profile (its tasks/workers and its extractor, whatever
  configs/tiny.yaml and stages/ingest/extract.py choose), cold: documents out per second of wall time.
"""

from __future__ import annotations

import gzip
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CRAWL = REPO.parent / "shared" / "data" / "crawl"
WORK = REPO / "bench" / "_work" / "ingest"


def best_of(fn, n: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def read_all(files: list[Path]) -> tuple[int, int]:
    """(records, documents) through the ingest reader block."""
    from stages.ingest.readers import _reader_cls

    block = _reader_cls()([[str(f) for f in files]], 10_000_000)
    docs = sum(1 for _ in block.run())
    return int(block.stats["records"].total), docs


def warcio_raw(files: list[Path]) -> int:
    from warcio.archiveiterator import ArchiveIterator

    n = 0
    for p in files:
        with open(p, "rb") as f:
            for rec in ArchiveIterator(f):
                if rec.rec_type == "response":
                    rec.content_stream().read()
                n += 1
    return n


def fastwarc_raw(files: list[Path]) -> int:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    n = 0
    for p in files:
        with open(p, "rb") as f:
            for rec in ArchiveIterator(f, parse_http=True, quirks_mode=True):
                if rec.record_type == WarcRecordType.response:
                    rec.reader.read()
                n += 1
    return n


def run() -> dict:
    from stages.core.config import load_config
    from stages.core.runner import run_stage

    gz = sorted(CRAWL.glob("*.warc.gz"))
    plain_dir = WORK / "plain"
    plain_dir.mkdir(parents=True, exist_ok=True)
    plain = []
    for p in gz:
        out = plain_dir / p.name.removesuffix(".gz")
        if not out.exists():
            out.write_bytes(gzip.decompress(p.read_bytes()))
        plain.append(out)
    gz_mb = sum(p.stat().st_size for p in gz) / 1e6
    raw_mb = sum(p.stat().st_size for p in plain) / 1e6
    figures: dict = {}

    def fig(key, value, unit, what):
        figures[key] = {"value": round(value, 1), "unit": unit, "what": what}

    for label, files, file_mb in (("gz", gz, gz_mb), ("plain", plain, raw_mb)):
        secs, (records, docs) = best_of(lambda: read_all(files))
        kind = f"{gz_mb:.0f} MB .warc.gz" if label == "gz" else f"{raw_mb:.0f} MB uncompressed .warc"
        print(f"reader {label:<5}: {records} records, {docs} docs in {secs:.2f} s: {records / secs:,.0f} records/s, "
              f"{file_mb / secs:.1f} MB/s of files, {raw_mb / secs:.1f} MB/s of WARC", flush=True)
        fig(f"ingest.reader.{label}.records_per_s", records / secs, "records/s",
            f"ingest reader, sample crawl ({kind}), 1 thread")
        fig(f"ingest.reader.{label}.warc_mb_per_s", raw_mb / secs, "MB/s",
            f"ingest reader, uncompressed WARC bytes per s ({kind}), 1 thread")
        if label == "gz":
            fig("ingest.reader.gz.file_mb_per_s", gz_mb / secs, "MB/s",
                f"ingest reader, gzipped WARC file bytes per s ({kind}), 1 thread")

    for name, fn in (("warcio", warcio_raw), ("fastwarc", fastwarc_raw)):
        secs, n = best_of(lambda: fn(gz))
        print(f"raw {name:<8}: {n} records in {secs:.2f} s: {raw_mb / secs:.1f} MB/s of WARC", flush=True)
        fig(f"ingest.raw.{name}.warc_mb_per_s", raw_mb / secs, "MB/s",
            f"{name}: iterate the .warc.gz crawl + read payloads, no decoding (library ceiling)")

    storage = WORK / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    m = run_stage("ingest", cfg, str(storage), "bench")
    c, wall = m["counts"], m["wall_time_s"]
    print(f"whole ingest: {c['documents_out']} docs out of {c['html_pages']} pages in {wall:.1f} s "
          f"({c['documents_out'] / wall:.1f} docs/s, extractor {cfg.ingest.extract.extractor}, "
          f"{m['metrics']['tasks']} tasks, {cfg.run.workers} workers)", flush=True)
    fig("ingest.stage.docs_per_s", c["documents_out"] / wall, "docs/s",
        f"whole ingest stage, tiny profile ({cfg.ingest.extract.extractor}, {cfg.run.workers} workers), sample crawl")
    fig("ingest.stage.seconds", wall, "s", "whole ingest stage, tiny profile, sample crawl (2,391 pages)")
    return figures


if __name__ == "__main__":
    for k, v in run().items():
        print(k, v["value"], v["unit"])
