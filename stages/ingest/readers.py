"""Readers of ingest: WARC/ARC records -> documents (HTML as text), with counted skip reasons."""

from __future__ import annotations

import codecs
import contextlib
import io
import posixpath
import re
from urllib.parse import urlsplit

HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)


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


