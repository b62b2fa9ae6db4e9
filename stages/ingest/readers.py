"""Readers of ingest: WARC / ARC / WET records and JSONL / Parquet rows -> documents, with counted skip reasons.

One datatrove block (``_reader_cls()``) reads every kind of input; the kind comes from the file name
(``file_kind``). Each record or line read becomes exactly one outcome: a Document or a skip reason (a key of
``SKIP_REASONS``). Every document carries ``metadata``: ``format`` ("html": an HTML page decoded to str, for
the extractor; "text": already-extracted text, passed through it), ``url``, ``domain``, ``date`` (crawl date,
ISO 8601 UTC to the second, "" when unknown; an unparseable raw value is kept as ``date_raw``) and ``source``
(the file's base name).

- WARC (gzip, per-record gzip or plain), WAT, ARC (warcio ``arc2warc``): ``response`` records with HTTP 200
  whose declared type (``WARC-Identified-Payload-Type`` when present, else the HTTP ``Content-Type``) is HTML
  -> "html". The type is never guessed from the bytes (datatrove 0.10.1's ``WarcReader`` does, and drops ~80%
  of the sample crawl).
- WET: ``conversion`` records of type text/plain -> "text", with ``refers_to`` (WARC-Refers-To) and
  ``content_language`` (WARC-Identified-Content-Language) when present.
- JSONL(.gz) / Parquet document sets: the ``text_field`` -> text, the ``id_field`` -> id (else
  ``<file>#<line>``), every other field (and the fields of a nested ``metadata`` object, e.g. cc_net's)
  -> metadata; a field that collides with one we set is kept as ``orig_<name>``.

Damage: gzip is decompressed by zlib member by member (``_Members``: it raises on truncation, bad data and CRC,
where warcio's own decompression ends the iteration early or only prints to stderr, and it also reads whole-file
gzip that warcio rejects); each archive record is read to its end and checked against its declared length, and
must be followed by nothing but blank lines. Damage makes the record it hit a ``corrupt_record`` skip and the
file one ``corrupt`` file skip (one log line naming the file and the first damaged records); reading resumes at
the next intact gzip member (an uncompressed WARC: at the next 'WARC/1.x' line, searched from just after the
damaged record's start in the last 1 MB read), so every good record of the file is kept: a bit flip, a malformed
header, a missing or wrong Content-Length loses exactly the record it hit. Bytes between gzip members that are
not gzip are skipped with a note. In an uncompressed ARC or a whole-file gzip the records before the damage are
kept and the rest is skipped. A file that cannot be opened is an
``unreadable`` file skip. A page whose HTTP Content-Encoding cannot be decoded (warcio only prints that) is
``undecodable``.

Why warcio and not FastWARC (measured on the sample crawl, bench/bench_ingest.py, 2026-11): FastWARC 2.0.1
iterates the gzipped crawl ~3x faster (182 vs 61 MB/s of WARC), but reading is ~10% of ingest time (this
reader: ~1,200 records/s; extraction: ~150 pages/s per process), so it would save under 7%; and FastWARC
returns the records of a truncated file without any error and needs ``quirks_mode`` to read LF-only (ClueWeb)
files whole: damage would go uncounted.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import posixpath
import re
from datetime import date, datetime, timezone
from decimal import Decimal
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)  # WET conversion records
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)

# reasons a record / line does not become a document (keys of counts.removed)
SKIP_REASONS = ("non_response", "revisit", "non_200", "non_html", "empty", "too_large", "undecodable",
                "corrupt_record", "bad_line")
# reasons a whole file (or its rest) is skipped (keys of counts.files_skipped)
FILE_SKIP_REASONS = ("corrupt", "empty", "unreadable")

# file name endings -> reader kind (longest first: ".warc.wet.gz" is WET, ".json.gz" is JSONL)
SUFFIXES = {".warc.gz": "warc", ".warc": "warc", ".wat.gz": "warc", ".wat": "warc", ".arc.gz": "arc",
            ".arc": "arc", ".wet.gz": "wet", ".wet": "wet", ".jsonl.gz": "jsonl", ".jsonl": "jsonl",
            ".json.gz": "jsonl", ".parquet": "parquet"}
SUPPORTED = ".warc[.gz], .arc[.gz], .wet[.gz], .wat[.gz], .jsonl[.gz], .json.gz, .parquet"
# JSONL/Parquet fields that hold the crawl date, in order of preference (cc_net: date_download)
DATE_FIELDS = ("date", "crawl_date", "date_download", "timestamp", "warc_date", "created")
RESERVED = ("format", "url", "domain", "date", "source")


def file_kind(path: str) -> str | None:
    """'warc', 'arc', 'wet', 'jsonl' or 'parquet' from the file name (case-insensitive); None if unknown."""
    name = posixpath.basename(urlsplit(path).path if "://" in path else path).lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


# ---------------------------------------------------------------------------------------------------------
# decoding and metadata helpers

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
    (cchardet); a last lenient pass accepts at most 0.5% replacement characters. None if undecodable.

    A UTF-8 page with a few stray bytes of another encoding (mixed encodings: a latin-1 snippet pasted into a
    UTF-8 template) is decoded as UTF-8 with U+FFFD for the stray bytes before any detected charset is tried:
    detection picks a single-byte codec (iso8859-16 on a real docs.python.org page with 'caf\\xe9' spliced in)
    that decodes every byte and turns all of the page's real UTF-8 characters into mojibake. The rule: lenient
    UTF-8 is taken when its replacements are at most 0.5% of the text and fewer than the non-ASCII characters it
    decoded correctly (a cp1252 page read as UTF-8 has almost none of those)."""
    m = _META_CHARSET.search(payload[:4096])
    strict = list(dict.fromkeys(c for c in (declared, _codec(m.group(1).decode("ascii", "ignore")) if m else None,
                                            "utf-8") if c))
    for enc in strict:
        try:
            return payload.decode(enc), enc
        except (UnicodeDecodeError, LookupError):
            continue
    text = payload.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad <= 0.005 * max(len(text), 1) and sum(ord(c) > 127 for c in text) - bad > bad:
        return text, "utf-8"
    tried = list(strict)
    try:
        import cchardet

        detected = _codec(cchardet.detect(payload[:65536]).get("encoding"))
        if detected and detected not in tried:
            tried.append(detected)
            try:
                return payload.decode(detected), detected
            except (UnicodeDecodeError, LookupError):
                pass
    except ImportError:  # pragma: no cover - datatrove[processing] ships it
        pass
    for enc in tried:
        text = payload.decode(enc, errors="replace")
        if text.count("\ufffd") <= 0.005 * max(len(text), 1):
            return text, enc
    return None


def iso_date(value) -> str:
    """A crawl date as 'YYYY-MM-DDTHH:MM:SSZ' (UTC), so that dates from any source sort as strings.
    Accepts ISO 8601 (WARC-Date, JSON), 14-digit ARC timestamps, RFC 2822 (HTTP dates), datetime objects and
    Unix seconds. '' when absent or unparseable (e.g. ClueWeb's '2008-10-294T05:21:46-0700')."""
    if value is None or value == "":
        return ""
    dt = None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            dt = datetime.fromtimestamp(value, timezone.utc)
    elif isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"\d{14}", s):
            with contextlib.suppress(ValueError):
                dt = datetime.strptime(s, "%Y%m%d%H%M%S")
        elif re.match(r"\d{4}-\d{2}-\d{2}", s):
            with contextlib.suppress(ValueError):
                dt = datetime.fromisoformat(s)
        else:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                dt = parsedate_to_datetime(s)
    if dt is None:
        return ""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def domain_of(url: str) -> str:
    """Lower-case host name of a URL ('' when there is none)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _jsonable(v):
    """Parquet values (datetime, Decimal, bytes, nested) -> what the JSONL writer can store."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    return v


def _base_metadata(fmt: str, url: str, raw_date, source: str) -> dict:
    d = iso_date(raw_date)
    md = {"format": fmt, "url": url, "domain": domain_of(url), "date": d, "source": source}
    if not d and raw_date not in (None, ""):
        md["date_raw"] = str(raw_date)
    return md


# ---------------------------------------------------------------------------------------------------------
# one record / row -> Document or skip reason (pure functions, used by the block and by tests)

def archive_record(record, source: str, idx: int, max_bytes: int):
    """A warcio record -> a Document ("html" for an HTML response, "text" for a WET conversion) or the reason
    (a key of SKIP_REASONS) it is skipped. Reads at most ``max_bytes + 1`` bytes of the payload."""
    from datatrove.data import Document

    h = record.rec_headers
    if record.rec_type == "revisit":
        return "revisit"
    if record.rec_type == "conversion":  # WET: text extracted by Common Crawl
        mime, charset = parse_content_type(h.get_header("Content-Type"))
        fmt = "text"
        if mime not in TEXT_TYPES:
            return "non_html"
    elif record.rec_type == "response" and record.http_headers is not None:
        try:
            status = int(record.http_headers.get_statuscode() or 0)
        except ValueError:
            status = 0
        if status != 200:
            return "non_200"
        http_type, charset = parse_content_type(record.http_headers.get_header("Content-Type"))
        warc_type = (h.get_header("WARC-Identified-Payload-Type") or "").split(";")[0]
        mime, fmt = warc_type.strip().lower() or http_type, "html"
        if mime not in HTML_TYPES:
            return "non_html"
        declared_len = (record.http_headers.get_header("Content-Length") or "").strip()
        if declared_len.isdigit() and int(declared_len) > max_bytes:
            return "too_large"
    else:  # warcinfo, request, metadata (WAT), resource, ...
        return "non_response"
    payload = record.content_stream().read(max_bytes + 1)
    if len(payload) > max_bytes:
        return "too_large"
    if not payload.strip():
        return "empty"
    decoded = decode_html(payload, charset)
    if decoded is None:
        return "undecodable"
    text, encoding = decoded
    url = (h.get_header("WARC-Target-URI") or h.get_header("uri") or "").strip().strip("<>")
    md = _base_metadata(fmt, url, h.get_header("WARC-Date") or h.get_header("archive-date"), source)
    md |= {"content_type": mime, "charset": encoding}
    for header, key in (("WARC-Refers-To", "refers_to"), ("WARC-Identified-Content-Language", "content_language")):
        if h.get_header(header):
            md[key] = h.get_header(header).strip().strip("<>")
    return Document(text=text, id=h.get_header("WARC-Record-ID") or f"{source}#{idx}", metadata=md)


def json_row(row, source: str, idx: int, text_field: str = "text", id_field: str = "id"):
    """A JSON object / Parquet row -> a "text" Document, or "bad_line" (not an object; text missing, not a
    string or blank). ``idx`` is the 0-based line / row number, used for the id when the row has none."""
    from datatrove.data import Document

    if not isinstance(row, dict):
        return "bad_line"
    text = row.get(text_field)
    if not isinstance(text, str) or not text.strip():
        return "bad_line"
    rid = row.get(id_field)
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else f"{source}#{idx}"
    nested = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    fields = _jsonable(nested | {k: v for k, v in row.items() if k not in (text_field, id_field, "metadata")})
    url = fields.get("url") if isinstance(fields.get("url"), str) else ""
    raw_date = next((fields[k] for k in DATE_FIELDS if fields.get(k) not in (None, "")), None)
    md = _base_metadata("text", url, raw_date, source)
    if not md["domain"]:
        md["domain"] = str(fields.get("domain") or fields.get("source_domain") or "").lower()
    for k, v in fields.items():
        if k in RESERVED:
            if k != "date" and v != md[k]:  # a date is kept normalised (or as date_raw)
                md[f"orig_{k}"] = v
        else:
            md.setdefault(k, v)
    return Document(text=text, id=rid, metadata=md)


# ---------------------------------------------------------------------------------------------------------
# opening inputs

def open_raw(path: str, seekable: bool = False, attempts: int = 3):
    """Open a local path, s3:// or http(s):// URL for binary reading. HTTP is streamed (one GET, read as
    consumed: multi-GB WARCs never sit in memory) unless ``seekable`` (Parquet needs random access).
    Remote opens are retried (1 s, 2 s) on errors other than a missing file (e.g. Common Crawl's 503 SlowDown);
    a connection lost later, mid-file, is damage like any other (the rest of the file is a counted skip)."""
    import time

    import fsspec

    from stages.core.storage import _s3_options

    kw = _s3_options() if path.startswith("s3://") else {}
    if path.startswith(("http://", "https://")) and not seekable:
        kw["block_size"] = 0
    tries = attempts if "://" in path and not path.startswith("file://") else 1
    for attempt in range(tries):
        try:
            return fsspec.open(path, "rb", **kw).open()
        except Exception as e:
            # fsspec's HTTP turns every failure into FileNotFoundError: only a 403/404 (or no cause) is final
            cause = e.__cause__
            missing = isinstance(e, (FileNotFoundError, PermissionError)) and (
                cause is None or isinstance(cause, (FileNotFoundError, PermissionError))
                or getattr(cause, "status", None) in (401, 403, 404, 410))
            if missing or attempt + 1 == tries:
                raise
            time.sleep(2**attempt)


class _Head:
    """A read-only stream: ``head`` (bytes already read from ``f``), then the rest of ``f``. Once ``f`` has
    returned b"" it is not read again (aiohttp warns on repeated reads at the end of an HTTP stream)."""

    def __init__(self, head: bytes, f):
        self.head, self.f, self.eof, self.pos = head, f, not head, 0

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                out, self.head = self.head + self.f.read(), b""
            elif n > len(self.head):
                out, self.head = self.head + self.f.read(n - len(self.head)), b""
            else:
                out, self.head = self.head[:n], self.head[n:]
        elif self.eof or n == 0:
            return b""
        else:
            out = self.f.read(n)
            self.eof = not out
        self.pos += len(out)
        return out

    def tell(self) -> int:
        return self.pos


def decompressed(f):
    """``f`` as an uncompressed stream: gzip (one member per record, or one for the whole file, as some tools
    write it; warcio reads only the first kind) is detected by its magic bytes, whatever the file name.
    Python's gzip raises on damage (truncation: EOFError; bad data or CRC: BadGzipFile / zlib.error)."""
    import gzip

    head = f.read(2)
    stream = _Head(head, f)  # also the end of file when f is empty
    return gzip.GzipFile(fileobj=stream) if head == b"\x1f\x8b" else stream


def one_line(e: Exception) -> str:
    """'<type>: <first line of the message>', escaped to printable ASCII, at most ~150 characters (messages can
    quote raw bytes of a damaged file)."""
    msg = (str(e).strip().splitlines() or [""])[0][:120].encode("unicode_escape").decode("ascii")
    return f"{type(e).__name__}: {msg[:150]}"


class CorruptInput(Exception):
    """A record that ends before its declared length: the file was cut (warcio just stops there)."""


@contextlib.contextmanager
def _warcio_stderr():
    """Capture what warcio prints to stderr instead of raising (a bad Content-Length between records, a broken
    HTTP Content-Encoding), so that it neither clutters the logs nor goes unnoticed."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield buf


_GZIP_MEMBER = b"\x1f\x8b\x08"
_ARC_LINE = re.compile(rb"\S+ [\d.]+ \d{14} ")


def _starts_record(raw: bytes) -> bool:
    """Does ``raw`` start a gzip member whose first bytes are an archive record ('WARC/' or an ARC URL line)?"""
    import zlib

    try:
        head = zlib.decompressobj(31).decompress(raw[:4096], 64)
    except zlib.error:
        return False
    return head.startswith(b"WARC/") or bool(_ARC_LINE.match(head))


class _Members:
    """The gzip members of a raw stream, one at a time (WARC/ARC files are gzipped one record per member).
    ``read`` gives the decompressed bytes of the current member only (b"" at its end) and raises on damage
    (zlib.error: bad data or CRC; EOFError: the file ends inside the member). ``next_member(damaged)`` moves to
    the next member; after damage, to the next offset where a gzip header starts whose data begins with an
    archive record (``_starts_record``): the records after a damaged one are read. Memory: one input chunk plus
    the decompressed bytes asked for (``max_length``), never a whole member."""

    def __init__(self, f, chunk: int = 1 << 16):
        self.f, self.chunk = f, chunk
        self.raw = b""  # raw bytes not yet given to zlib
        self.last = b""  # the input of the last zlib call (the next member may start inside it)
        self.z, self.pos, self.eof, self.calls, self.broken = None, 0, False, 0, False
        self.junk = 0  # bytes skipped between members that were neither gzip nor padding

    def _more(self) -> bool:
        data = b"" if self.eof else self.f.read(self.chunk)
        self.eof = not data
        self.raw += data
        return bool(data)

    def next_member(self, damaged: bool = False) -> bool:
        import zlib

        if damaged:  # a bad record in an intact member: skip to its end; bad gzip data: search the next member
            try:
                while not self.broken and self.read(1 << 20):
                    pass
                damaged = self.broken
            except (zlib.error, EOFError):
                damaged = True
            if damaged:  # zlib may raise on the call after the one that took the CRC: the
                skip = 1 if self.calls == 1 else 0  # next member can start at the input's first byte
                self.raw, self.last = self.last[skip:] + self.raw, b""
        count = not damaged  # junk after a damaged member is its rest, not counted again
        while True:
            while len(self.raw) < 4096 and self._more():
                pass
            if self.raw.startswith(_GZIP_MEMBER) and (not damaged or _starts_record(self.raw)):
                break
            i = self.raw.find(_GZIP_MEMBER, 1)
            drop = i if i > 0 else len(self.raw) - (0 if self.eof else 2)
            if self.raw[:drop].strip(b"\x00\r\n\t "):  # not padding: junk; the next member must start a record
                self.junk += drop if count else 0
                damaged = True
            self.raw = self.raw[drop:]
            if not self.raw and self.eof:
                return False
        self.z, self.pos, self.calls, self.broken = zlib.decompressobj(31), 0, 0, False
        return True

    def read(self, n: int = -1) -> bytes:
        import zlib

        n = 1 << 20 if n is None or n < 0 else n
        out = b""
        while self.z is not None and not self.z.eof and len(out) < n:
            if not self.raw and not self._more():
                raise EOFError("file ends inside a gzip member (truncated)")
            self.last, self.raw, self.calls, self.broken = self.raw, b"", self.calls + 1, True
            data = self.z.decompress(self.last, n - len(out))
            self.broken = False
            self.raw = self.z.unused_data if self.z.eof else self.z.unconsumed_tail
            if not data and len(self.raw) == len(self.last):
                raise zlib.error("gzip data makes no progress")
            # what zlib consumed of the member (the next member cannot start before its end)
            self.last = b"" if self.z.eof else self.last[: len(self.last) - len(self.raw)]
            out += data
        self.pos += len(out)
        return out

    def tell(self) -> int:
        return self.pos


def iter_archive(f, source: str, max_bytes: int, notes: list | None = None):
    """Outcomes (Document or reason) of every record of a WARC/ARC/WET stream.

    Gzipped files are read member by member (``_Members``): damage (bad gzip data or CRC, a truncated member, a
    record header warcio cannot parse, a record shorter or longer than its Content-Length) makes the records of
    that member ``corrupt_record`` and reading resumes at the next intact member, so every good record of the
    file is kept. An uncompressed WARC resumes at the next 'WARC/1.x' line after the damage (``_next_warc_header``);
    an uncompressed ARC or a whole-file gzip ends at the damage (the records before it are kept). A message per
    damage goes to ``notes``."""
    notes = notes if notes is not None else []
    head = f.read(2)
    stream = _Head(head, f)
    if head != b"\x1f\x8b":
        tail, idx, its, base = _Tail(stream), [0], [], 0
        stream = tail
        while (yield from _member_records(stream, source, max_bytes, idx, notes, its=its, resumed=bool(base))):
            it = its[-1]  # resume after the start of the last record parsed (damaged or not)
            stream, base = _next_warc_header(tail, base + getattr(it, "kiln_offset", 0) + 1)
            if stream is None:
                return
        return
    members, idx, damaged = _Members(stream), [0], False
    while True:
        more = members.next_member(damaged)
        if members.junk:
            notes.append(f"after record {idx[0]}: {members.junk} bytes that are not gzip skipped")
            members.junk = 0
        if not more:
            return
        damaged = yield from _member_records(members, source, max_bytes, idx, notes)


_WARC_LINE = re.compile(rb"(?:^|\n)(WARC/1\.[01]\r?\n)")


class _Tail:
    """A read-only stream that keeps the last ``keep`` bytes read (at least), to search them again after damage."""

    def __init__(self, f, keep: int = 1 << 20):
        self.f, self.keep, self.buf, self.pos = f, keep, bytearray(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.buf += data
        self.pos += len(data)
        if len(self.buf) > 2 * self.keep:
            del self.buf[: len(self.buf) - self.keep]
        return data

    def tell(self) -> int:
        return self.pos

    def since(self, offset: int) -> bytes:
        """The bytes from absolute ``offset`` (or the oldest kept) to what has been read."""
        first = self.pos - len(self.buf)
        return bytes(self.buf[max(offset, first) - first:])


def _next_warc_header(tail: _Tail, offset: int, chunk: int = 1 << 16):
    """After damage in an uncompressed WARC: (a stream from the first 'WARC/1.0' (or 1.1) line at or after absolute
    ``offset``, that line's absolute offset), or (None, 0) at the end of the file. Searches the bytes already read
    (a Content-Length too long reads into the next record: its header line is there), then reads on."""
    buf, start = tail.since(offset), max(offset, tail.pos - len(tail.buf))
    while True:
        if m := _WARC_LINE.search(buf):
            return _Head(buf[m.start(1):], tail), start + m.start(1)
        data = tail.read(chunk)
        if not data:
            return None, 0
        start += max(len(buf) - 12, 0)
        buf = buf[-12:] + data


def _member_records(stream, source: str, max_bytes: int, idx: list, notes: list, hold: int = 1,
                    its: list | None = None, resumed: bool = False):
    """Outcomes of the records of one gzip member (or of a whole uncompressed stream); returns True on damage.
    Each outcome is held back until the next record header parses or the member ends intact (nothing but blank
    lines after the record; with one record per member, its CRC checked): junk after a record means a wrong
    Content-Length and makes it ``corrupt_record``, gzip damage makes the held ones ``corrupt_record``. ``hold``
    is 1 (memory: one document); the records of a whole-file gzip (one member) are released before its CRC.
    ``resumed``: the stream starts where an uncompressed WARC was resynchronised (its first header, if broken, is
    the record already counted as damaged). ``its`` receives the warcio iterator."""
    from warcio.archiveiterator import ArchiveIterator

    import zlib

    it = ArchiveIterator(stream, arc2warc=True)
    records, held, parsed = iter(it), [], False
    if its is not None:
        its.append(it)

    def note(e: Exception, at: int):
        notes.append(f"record {at}: {one_line(e)}")

    def flush(outcomes: list):
        idx[0] += len(outcomes)
        return outcomes

    while True:
        before = it.err_count
        try:
            with _warcio_stderr():
                record = next(records, None)
        except Exception as e:  # bad header, junk after a record, gzip damage
            junk = it.err_count > before and held
            note(e, idx[0] + len(held) + (0 if junk else 1))
            if isinstance(e, (zlib.error, EOFError)):  # the CRC covers the member: none of it is sure
                yield from flush(["corrupt_record"] * max(len(held), 1))
            elif junk:  # junk after the last record: its Content-Length is wrong
                yield from flush([*held[:-1], "corrupt_record"])
            else:  # a record whose header cannot be parsed (at the file's start: not an archive, a file skip only)
                counted = not parsed and (resumed or not idx[0])
                yield from flush([*held] if counted else [*held, "corrupt_record"])
            return True
        if it.err_count > before and held:  # the last record was not followed by a blank line: what follows
            notes.append(f"record {idx[0] + len(held)}: not followed by a blank line (wrong Content-Length?)")
            yield from flush([*held[:-1], "corrupt_record"])  # is its rest, not a record
            return True
        if record is None:
            yield from flush(held)
            return False
        it.kiln_offset, parsed = it.offset, True  # where this record starts in the stream (for resynchronising)
        try:
            if not hasattr(record.raw_stream, "limit"):  # no Content-Length: warcio would read to the end of file
                raise CorruptInput("no Content-Length")
            with _warcio_stderr() as err:  # warcio reports a broken HTTP Content-Encoding only there
                out = archive_record(record, source, idx[0] + len(held), max_bytes)
            if err.getvalue() and not isinstance(out, str):
                out = "undecodable"
            while record.raw_stream.read(1 << 20):  # to the record's end: detects truncation
                pass
            if record.raw_stream.limit > 0:
                raise CorruptInput(f"ends {record.raw_stream.limit} bytes before its Content-Length")
        except Exception as e:
            note(e, idx[0] + len(held) + 1)
            gzip_damage = isinstance(e, (zlib.error, EOFError))
            yield from flush(["corrupt_record"] * (len(held) + 1) if gzip_damage else [*held, "corrupt_record"])
            return True
        held.append(out)
        if len(held) > hold:
            yield from flush([held.pop(0)])


def _lines(stream, max_bytes: int, chunk: int = 1 << 16):
    """The lines of a binary stream without their newline; ``None`` for a line longer than ``max_bytes``
    (dropped as it streams by). Works on non-seekable streams. Reads gzip with ``read1`` (what one decompression
    step gives): damage loses only the data of that step. The buffer is a bytearray grown in place: memory stays
    near ``max_bytes + chunk`` (a 50 MB line with the 10 MB default: 11.5 MB peak traced; ``bytes`` concatenation
    held two copies, 20 MB, and copied the buffer at every chunk)."""
    read = getattr(stream, "read1", stream.read)
    buf, skipping = bytearray(), False
    while data := read(chunk):
        buf += data
        start = 0
        while (i := buf.find(b"\n", start)) >= 0:
            yield None if skipping or i - start > max_bytes else bytes(buf[start:i])
            skipping, start = False, i + 1
        del buf[:start]
        if len(buf) > max_bytes:
            buf, skipping = bytearray(), True
    if skipping or buf:
        yield None if skipping else bytes(buf)


def iter_jsonl(f, source: str, max_bytes: int, text_field: str, id_field: str):
    """Outcomes of every line of a JSONL stream (plain or gzip): a Document, ``bad_line`` or ``too_large``."""
    for idx, line in enumerate(_lines(decompressed(f), max_bytes)):
        if line is None:
            yield "too_large"
            continue
        try:
            yield json_row(json.loads(line.removeprefix(b"\xef\xbb\xbf") if idx == 0 else line), source, idx,
                           text_field, id_field)
        except (ValueError, RecursionError):  # invalid JSON or UTF-8, or nested too deep for the parser
            yield "bad_line"


def iter_parquet(f, source: str, text_field: str, id_field: str, batch_rows: int = 1024):
    """Outcomes of every row of a Parquet file, read in batches of ``batch_rows``. A file without a string column
    ``text_field`` raises (one corrupt file skip whose log line names the column) instead of giving a bad_line
    per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if f.seek(0, 2) == 0:  # a zero-length file: no rows (an empty file skip, like an empty WARC or JSONL)
        return
    f.seek(0)
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    if text_field not in schema.names:  # a file of other data, or ingest.text_field not set for it
        raise CorruptInput(f"no column '{text_field}' (columns: {', '.join(schema.names[:10])}); "
                           f"set ingest.text_field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorruptInput(f"column '{text_field}' holds {kind}, not strings")
    idx = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            yield json_row(row, source, idx, text_field, id_field)
            idx += 1


# ---------------------------------------------------------------------------------------------------------
# the datatrove reader block

def _reader_cls():
    from datatrove.pipeline.readers.base import BaseReader

    class IngestReader(BaseReader):
        """Reads WARC/ARC/WET/JSONL/Parquet files (any fsspec URL): one outcome per record or line, each a
        document or a counted skip. ``shards[rank]`` lists the files of each task (balanced by size).

        Stats: ``records`` (records/lines read), ``skip_<reason>``, ``pages`` (html documents out),
        ``text_docs`` (text documents out), ``input_files``, ``<reason>_files`` (FILE_SKIP_REASONS)."""

        name = "🕷 ingest reader"
        _requires_dependencies = ["warcio"]

        def __init__(self, shards: list[list[str]], max_record_bytes: int, text_field: str = "text",
                     id_field: str = "id"):
            super().__init__()
            self.shards = shards
            self.max_record_bytes = max_record_bytes
            self.text_field, self.id_field = text_field, id_field

        def outcomes(self, f, path: str, kind: str, notes: list):
            source = posixpath.basename(urlsplit(path).path if "://" in path else path)
            if kind == "parquet":
                return iter_parquet(f, source, self.text_field, self.id_field)
            if kind == "jsonl":
                return iter_jsonl(f, source, self.max_record_bytes, self.text_field, self.id_field)
            return iter_archive(f, source, self.max_record_bytes, notes)

        def read_file(self, path: str):
            """Yield the documents of one file; count every other outcome. A file with damage (damaged records
            skipped, or its rest unreadable) is one ``corrupt`` file skip and one log line naming the file."""
            from datatrove.utils.logging import logger  # not a closure variable: the block must pickle

            self.stat_update("input_files")
            kind = file_kind(path) or "warc"
            try:
                f = open_raw(path, seekable=kind == "parquet")
            except Exception as e:
                self.stat_update("unreadable_files")
                logger.warning(f"ingest: skipped unreadable file {path}: {one_line(e)}")
                return
            records = corrupt = 0
            notes, error = [], None
            try:
                with f:
                    outcomes = self.outcomes(f, path, kind, notes)
                    while True:
                        with self.track_time():
                            out = next(outcomes, None)
                        if out is None:
                            break
                        records += 1
                        self.stat_update("records")
                        if isinstance(out, str):
                            corrupt += out == "corrupt_record"
                            self.stat_update(f"skip_{out}")
                            continue
                        self.stat_update("pages" if out.metadata["format"] == "html" else "text_docs")
                        yield out
            except Exception as e:  # any damage (warcio, gzip, pyarrow raise many kinds): one line, counted
                error = e
            if error is not None or corrupt or notes:  # notes: damage the archive reader got past
                self.stat_update("corrupt_files")
                what = f"rest of file skipped: {one_line(error)}" if error is not None else "; ".join(notes[:3])
                logger.warning(f"ingest: corrupt file {path}: {records - corrupt} records read, {corrupt} damaged "
                               f"records skipped; {what}"[:600])
            elif records == 0:
                self.stat_update("empty_files")
                logger.warning(f"ingest: skipped {path}: no records (empty file)")

        def run(self, data=None, rank: int = 0, world_size: int = 1):
            if data:
                yield from data
            for path in self.shards[rank] if rank < len(self.shards) else []:
                for doc in self.read_file(path):
                    self.update_doc_stats(doc)
                    yield doc

    return IngestReader
