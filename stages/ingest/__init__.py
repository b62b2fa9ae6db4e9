"""ingest: WARC files -> documents with the main text of each HTML page (datatrove JSONL).

Our own datatrove reader keeps ``response`` records with HTTP status 200 whose declared type
(``WARC-Identified-Payload-Type`` when present, else the HTTP ``Content-Type``) is HTML. The type is never
guessed from the bytes: datatrove 0.10.1's ``WarcReader`` does that and silently drops ~80% of the sample
crawl. Every record that does not become a document is counted under a reason; a corrupt file (truncated
gzip, random bytes, malformed WARC) is one log line and a counted skip, and records read before the
corruption are kept. Main text comes from trafilatura (datatrove's ``Trafilatura`` block).

Counts: ``documents_in`` is every WARC record read (warcinfo and request records included), each either a
document out or under one ``removed`` reason; ``html_pages`` is the records that reached extraction.
Files go to tasks balanced by size.
"""

from __future__ import annotations

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageResult
from stages.ingest.extract import ExtractConfig
from stages.ingest.readers import decode_html, parse_content_type  # noqa: F401  (public helpers)

# reasons a WARC record does not become a document (keys of counts.removed)
SKIP_REASONS = ("non_response", "revisit", "non_200", "non_html", "empty", "too_large", "undecodable",
                "corrupt_record")


class Config(Strict):
    # input files: globs or paths (local, s3://, http(s)://); relative paths resolve against the profile's folder
    inputs: list[str] = ["../../shared/data/crawl/*.warc.gz"]
    max_record_bytes: int = Field(10_000_000, ge=1)  # larger HTTP payloads are skipped as too_large
    extract: ExtractConfig = ExtractConfig()  # main-text extraction (stages/ingest/extract.py)



def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import data_result, output_steps, run_pipeline
    from stages.ingest.extract import extractor_block, removed_counts
    from stages.ingest.readers import _warc_reader_cls
    from stages.ingest.sources import balance, input_files

    files = input_files(cfg, ctx)
    tasks = max(1, min(ctx.cfg.run.tasks, len(files)))
    reader = _warc_reader_cls()(balance(files, tasks), cfg.max_record_bytes)
    extractor = extractor_block(cfg.extract)
    blocks = run_pipeline(ctx, [reader, extractor, *output_steps(ctx)], name="ingest", tasks=tasks)
    rd, ex = (blocks[k] for k in list(blocks)[:2])

    def n(block: dict, key: str) -> int:
        return int(block.get(key, 0))

    # every WARC record read is either a document out or removed under exactly one reason
    removed = {r: n(rd, f"skip_{r}") for r in SKIP_REASONS} | removed_counts(ex)
    return data_result(ctx, blocks, n(rd, "records"), removed,
                       metrics={"blocks": blocks, "tasks": tasks, "inputs": [f for f, _ in files]},
                       html_pages=n(rd, "pages"), files_in=len(files),
                       files_skipped={"corrupt": n(rd, "corrupt_files"), "empty": n(rd, "empty_files")})
