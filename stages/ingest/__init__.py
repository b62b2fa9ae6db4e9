"""ingest: crawl files -> documents with the main text of each page (datatrove JSONL).

Inputs (``sources.py``): local paths, folders and globs, s3:// prefixes and globs, http(s) URLs, and the files
of a Common Crawl crawl chosen by segment (``common_crawl``). Files go to tasks balanced by size.
Readers (``readers.py``), chosen by file name: WARC / ARC / WET records (warcio) and JSONL / Parquet document
sets. HTML responses become ``format: html`` documents for the extractor (``extract.py``); WET conversion
records and JSONL/Parquet rows are already text (``format: text``) and pass through it.

Counts: ``documents_in`` is every record or line read (warcinfo and request records included), each either a
document out or removed under exactly one reason (``removed``: the reader's ``SKIP_REASONS`` plus the
extractor's reasons); ``html_pages`` / ``text_documents`` are the reader's documents of each format;
``files_in`` / ``files_skipped`` (corrupt: damaged records skipped or the rest of the file unreadable;
empty; unreadable) / ``files_by_kind`` count input files.

Input files by content (``identity.py``): ``external_inputs`` puts what each crawl file is (local: sha256 within
``hash_budget_mb``; s3: ETag; http: ETag / Last-Modified) into the fingerprint, so a file replaced or edited
under the same path re-runs ingest; the manifest lists the same per file under ``metrics.input_files``
(``metrics.inputs``: the paths, same order).
"""

from __future__ import annotations

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageResult
from stages.ingest.extract import ExtractConfig
from stages.ingest.readers import FILE_SKIP_REASONS, SKIP_REASONS, decode_html, parse_content_type  # noqa: F401
from stages.ingest.sources import CommonCrawl


class Config(Strict):
    # input files: paths, folders, globs (local, s3://) or http(s):// URLs; relative paths resolve against the
    # profile's folder. Types by name: .warc[.gz] .arc[.gz] .wet[.gz] .wat[.gz] .jsonl[.gz] .json.gz .parquet
    inputs: list[str] = ["../../shared/data/crawl/*.warc.gz"]
    common_crawl: CommonCrawl | None = None  # also read files of a Common Crawl crawl (see sources.py)
    max_record_bytes: int = Field(10_000_000, ge=1)  # larger HTTP payloads / JSONL lines are skipped as too_large
    text_field: str = "text"  # JSONL / Parquet: field holding the text
    id_field: str = "id"  # JSONL / Parquet: field holding the id (missing: "<file>#<line>")
    extract: ExtractConfig = ExtractConfig()  # main-text extraction (stages/ingest/extract.py)
    # local input files are identified by sha256, smallest first, up to this many MiB hashed per fingerprint
    # (~0.7 s at the measured 1.57 GB/s); files past it by size + mtime + sha256 of their ends (identity.py)
    hash_budget_mb: int = Field(1024, ge=0)


def external_inputs(cfg: Config, kiln_cfg) -> dict:
    """The crawl files, by content (part of ingest's fingerprint, ``identity.py``): the same files, listed by the
    same function (``sources.listing``), that ``run`` reads; Common Crawl files by the resolved list only."""
    import os

    from stages.ingest.identity import _local, identities
    from stages.ingest.sources import listing

    files = identities(listing(cfg, kiln_cfg, head_common_crawl=False), cfg.hash_budget_mb << 20)
    # local files by name, not by absolute path: the same crawl mounted elsewhere (a container's /opt/shared, the
    # host's /work/shared) is the same input (documents carry only the file name, metadata.source)
    return {"files": [{**f, "path": os.path.basename(f["path"])} if _local(f["path"]) else f for f in files]}


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from collections import Counter

    from stages.core.pipeline import data_result, output_steps, run_pipeline
    from stages.ingest.extract import extractor_block, removed_counts
    from stages.ingest.readers import _reader_cls, file_kind
    from stages.ingest.identity import identities
    from stages.ingest.sources import balance, listing, sizes

    listed = listing(cfg, ctx.cfg)
    files = sizes(listed)
    identified = identities(listed, cfg.hash_budget_mb << 20)  # before reading: what was read, by content
    tasks = max(1, min(ctx.cfg.run.tasks, len(files)))
    reader = _reader_cls()(balance(files, tasks), cfg.max_record_bytes, cfg.text_field, cfg.id_field)
    blocks = run_pipeline(ctx, [reader, extractor_block(cfg.extract), *output_steps(ctx)], name="ingest",
                          tasks=tasks)
    rd, ex = (blocks[k] for k in list(blocks)[:2])

    def n(block: dict, key: str) -> int:
        return int(block.get(key, 0))

    # every record read is either a document out or removed under exactly one reason
    removed = {r: n(rd, f"skip_{r}") for r in SKIP_REASONS} | removed_counts(ex)
    return data_result(ctx, blocks, n(rd, "records"), removed,
                       metrics={"blocks": blocks, "tasks": tasks, "inputs": [f for f, _ in files],
                                "input_files": identified},
                       html_pages=n(rd, "pages"), text_documents=n(rd, "text_docs"), files_in=len(files),
                       files_skipped={r: n(rd, f"{r}_files") for r in FILE_SKIP_REASONS},
                       files_by_kind=dict(sorted(Counter(file_kind(f) for f, _ in files).items())),
                       # pages extracted by the chosen extractor, by resiliparse over trafilatura's cap, and by
                       # the other extractor after an empty result (on_empty: other)
                       extraction={k: n(ex, k) for k in ("extracted", "extract_fallback", "extract_empty_fallback")})
