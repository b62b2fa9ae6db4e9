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

import codecs
import contextlib
import io
import posixpath
import re
from urllib.parse import urlsplit

from pydantic import Field

from stages.core.config import Strict, resolve_path
from stages.core.runner import StageContext, StageError, StageResult

HTML_TYPES = ("text/html", "application/xhtml+xml")
# reasons a WARC record does not become a document (keys of counts.removed)
SKIP_REASONS = ("non_response", "revisit", "non_200", "non_html", "empty", "too_large", "undecodable",
                "corrupt_record", "extract_timeout", "extract_error", "extract_empty")
_INLINE_CODE = re.compile(r"<(/?)(?:code|tt|kbd|samp)\b", re.I)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)


class Config(Strict):
    # input files: globs or paths (local, s3://, http(s)://); relative paths resolve against the profile's folder
    inputs: list[str] = ["../../shared/data/crawl/*.warc.gz"]
    max_record_bytes: int = Field(10_000_000, ge=1)  # larger HTTP payloads are skipped as too_large
    extract_timeout: float = Field(10.0, gt=0)  # seconds per page for trafilatura before it counts as a timeout
    favour_precision: bool = False  # trafilatura: True drops more borderline text (e.g. code-heavy sections)
    include_tables: bool = True  # trafilatura: keep text inside <table> (reference docs use many tables)
    deduplicate: bool = False  # trafilatura's in-document duplicate segment removal
    fallback: bool = True  # trafilatura's fallback extractors when its main one finds little (slower, better)
    inline_code_as_text: bool = True  # treat inline <code>/<tt>/<kbd>/<samp> as text (see TextTrafilatura)


# ---------------------------------------------------------------------------------------------------------
# decoding helpers

def _codec(name: str | None) -> str | None:
    """Canonical codec name, or None when Python does not know it."""
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().strip("'\"").lower()).name
    except LookupError:
        return None


def parse_content_type(value: str | None) -> tuple[str, str | None]:
    """'text/html; charset=ISO-8859-1' -> ('text/html', 'iso8859-1')."""
    if not value:
        return "", None
    mime, _, params = value.partition(";")
    charset = None
    for p in params.split(";"):
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset":
            charset = _codec(v)
    return mime.strip().lower(), charset


def decode_html(payload: bytes, declared: str | None) -> tuple[str, str] | None:
    """Decode an HTML payload: the HTTP charset, else the <meta> charset, else UTF-8, else a detected one
    (cchardet); a last lenient pass accepts at most 0.5% replacement characters. None if undecodable."""
    candidates = [declared]
    m = _META_CHARSET.search(payload[:4096])
    candidates.append(_codec(m.group(1).decode("ascii", "ignore")) if m else None)
    candidates.append("utf-8")
    try:
        import cchardet

        candidates.append(_codec(cchardet.detect(payload[:65536]).get("encoding")))
    except ImportError:  # pragma: no cover - datatrove[processing] ships it
        pass
    tried = list(dict.fromkeys(c for c in candidates if c))
    for enc in tried:
        try:
            return payload.decode(enc), enc
        except (UnicodeDecodeError, LookupError):
            continue
    for enc in tried:
        text = payload.decode(enc, errors="replace")
        if text.count("\ufffd") <= 0.005 * max(len(text), 1):
            return text, enc
    return None


# ---------------------------------------------------------------------------------------------------------
# the datatrove reader block

class CorruptInput(Exception):
    """Damage in a WARC file that warcio reported only on stderr or by ending early."""


@contextlib.contextmanager
def _warcio_stderr():
    """Capture what warcio prints to stderr (it reports some gzip errors only there)."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield buf


def _warc_reader_cls():
    from datatrove.pipeline.readers.base import BaseReader

    class WarcHtmlReader(BaseReader):
        """Reads WARC/ARC files (any fsspec URL) and yields one document per HTML page, HTML as text.

        ``shards[rank]`` lists the files of each task (balanced by size beforehand)."""

        name = "🕷 WARC HTML reader"
        _requires_dependencies = ["warcio"]

        def __init__(self, shards: list[list[str]], max_record_bytes: int):
            super().__init__()
            self.shards = shards
            self.max_record_bytes = max_record_bytes

        def read_record(self, record, path: str, idx: int):
            """A Document for a kept record, or the reason (a key of SKIP_REASONS) it is skipped."""
            from datatrove.data import Document

            if record.rec_type == "revisit":
                return "revisit"
            if record.rec_type != "response" or record.http_headers is None:
                return "non_response"
            try:
                status = int(record.http_headers.get_statuscode() or 0)
            except ValueError:
                status = 0
            if status != 200:
                return "non_200"
            http_type, charset = parse_content_type(record.http_headers.get_header("Content-Type"))
            warc_type = (record.rec_headers.get_header("WARC-Identified-Payload-Type") or "").split(";")[0]
            mime = warc_type.strip().lower() or http_type
            if mime not in HTML_TYPES:
                return "non_html"
            declared_len = (record.http_headers.get_header("Content-Length") or "").strip()
            if declared_len.isdigit() and int(declared_len) > self.max_record_bytes:
                return "too_large"
            payload = record.content_stream().read(self.max_record_bytes + 1)
            if len(payload) > self.max_record_bytes:
                return "too_large"
            if not payload.strip():
                return "empty"
            decoded = decode_html(payload, charset)
            if decoded is None:
                return "undecodable"
            html, encoding = decoded
            h = record.rec_headers
            url = (h.get_header("WARC-Target-URI") or h.get_header("uri") or "").strip().strip("<>")
            return Document(
                text=html,
                id=h.get_header("WARC-Record-ID") or f"{path}#{idx}",
                metadata={"url": url, "domain": (urlsplit(url).hostname or "").lower(),
                          "date": h.get_header("WARC-Date") or h.get_header("archive-date") or "",
                          "content_type": mime, "charset": encoding, "source": posixpath.basename(path)})

        def read_file(self, path: str):
            """Yield the documents of one file. warcio swallows some damage (a truncated gzip ends the
            iteration early; a bad gzip block is only printed to stderr), so each record is read to its
            end and checked for its declared length, and warcio's stderr is captured: damage makes the
            record it hit a ``corrupt_record`` skip and the file a ``corrupt_files`` skip (one log line)."""
            from datatrove.utils.logging import logger  # not a closure variable: the block must pickle
            from warcio.archiveiterator import ArchiveIterator

            from stages.core.storage import open_input

            self.stat_update("input_files")
            records, pending = 0, False
            try:
                with open_input(path) as f:
                    it = iter(ArchiveIterator(f, arc2warc=True))
                    while True:
                        with _warcio_stderr() as err:
                            record = next(it, None)
                        if record is None:
                            break
                        records += 1
                        self.stat_update("records")
                        pending = True  # this record is not yet a document or a counted skip
                        with self.track_time(), _warcio_stderr() as err:
                            doc = self.read_record(record, path, records - 1)
                            while record.raw_stream.read(1 << 20):  # to the record's end: detects truncation
                                pass
                        if record.raw_stream.limit > 0 or err.getvalue():
                            raise CorruptInput(err.getvalue().strip().splitlines()[0] if err.getvalue() else
                                               f"record {records} ends {record.raw_stream.limit} bytes early")
                        pending = False
                        if isinstance(doc, str):
                            self.stat_update(f"skip_{doc}")
                            continue
                        self.stat_update("pages")
                        yield doc
                if records == 0:
                    self.stat_update("empty_files")
                    logger.warning(f"ingest: skipped {path}: no WARC records (empty file)")
            except Exception as e:  # any damage (warcio raises many kinds): one line, counted; earlier records kept
                if pending:
                    self.stat_update("skip_corrupt_record")
                self.stat_update("corrupt_files")
                msg = (str(e).strip().splitlines() or [""])[0].encode("ascii", "backslashreplace").decode()[:120]
                logger.warning(f"ingest: skipped rest of corrupt file {path} after {records} records: "
                               f"{type(e).__name__}: {msg}")

        def run(self, data=None, rank: int = 0, world_size: int = 1):
            if data:
                yield from data
            for path in self.shards[rank] if rank < len(self.shards) else []:
                for doc in self.read_file(path):
                    self.update_doc_stats(doc)
                    yield doc

    return WarcHtmlReader


def _extractor_cls():
    from datatrove.pipeline.extractors import Trafilatura

    class TextTrafilatura(Trafilatura):
        """datatrove's Trafilatura block, optionally turning inline code tags into spans first: trafilatura
        treats <code> as a block, which splits every sentence of a documentation page that names a function
        ("parsing, argparse⏎, was introduced") and glues the next word on ("andhttp.client")."""

        def __init__(self, inline_code_as_text: bool = True, **kw):
            super().__init__(**kw)
            self.inline_code_as_text = inline_code_as_text

        def extract(self, text: str) -> str:
            if self.inline_code_as_text:
                text = _INLINE_CODE.sub(r"<\1span", text)
            return super().extract(text)

    return TextTrafilatura


def balance(files: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Split (path, size) into n shards of similar total size (largest first, to the lightest shard)."""
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for path, size in sorted(files, key=lambda x: (-x[1], x[0])):
        i = load.index(min(load))
        shards[i].append(path)
        load[i] += size
    return [sorted(s) for s in shards]


def _input_files(cfg: Config, ctx: StageContext) -> list[tuple[str, int]]:
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


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import data_result, output_steps, run_pipeline

    files = _input_files(cfg, ctx)
    tasks = max(1, min(ctx.cfg.run.tasks, len(files)))
    reader = _warc_reader_cls()(balance(files, tasks), cfg.max_record_bytes)
    extractor = _extractor_cls()(inline_code_as_text=cfg.inline_code_as_text, timeout=cfg.extract_timeout,
                                 favour_precision=cfg.favour_precision, deduplicate=cfg.deduplicate,
                                 include_tables=cfg.include_tables, no_fallback=not cfg.fallback)
    blocks = run_pipeline(ctx, [reader, extractor, *output_steps(ctx)], name="ingest", tasks=tasks)
    rd, ex = (blocks[k] for k in list(blocks)[:2])

    def n(block: dict, key: str) -> int:
        return int(block.get(key, 0))

    # every WARC record read is either a document out or removed under exactly one reason
    removed = {r: n(rd, f"skip_{r}") for r in SKIP_REASONS if not r.startswith("extract_")}
    removed |= {"extract_timeout": n(ex, "timeout") + n(ex, "broken_process"),
                "extract_error": n(ex, "clean_error"), "extract_empty": n(ex, "dropped")}
    return data_result(ctx, blocks, n(rd, "records"), removed,
                       metrics={"blocks": blocks, "tasks": tasks, "inputs": [f for f, _ in files]},
                       html_pages=n(rd, "pages"), files_in=len(files),
                       files_skipped={"corrupt": n(rd, "corrupt_files"), "empty": n(rd, "empty_files")})
