"""ingest on real data: WARC/ARC/WET/JSONL/Parquet readers, input sources (folders, globs, s3://, http, Common
Crawl crawl ids), exact counts and skips by reason, damaged input."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import threading
from pathlib import Path

import pytest

from conftest import CRAWL, SHARED, load_tiny
from stages.core.config import ConfigError
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.ingest.extract import REASONS as EXTRACT_REASONS
from stages.ingest.readers import SKIP_REASONS, _reader_cls, file_kind

WARC = SHARED / "warc"
JSONL = sorted((SHARED / "jsonl").glob("*.jsonl.gz"))  # 2 x 10 real cc_net documents
SMALL_CRAWL = CRAWL / "docs.python.org-0002.warc.gz"  # 1 warcinfo + 9 real docs.python.org pages
CC = "CC-MAIN-2024-22"


def cfg_for(inputs, **extra):
    return load_tiny(None, {"ingest.inputs": [str(p) for p in inputs], **extra})


def read_docs(storage: str, run_id: str = "run1") -> list[dict]:
    out = Storage(storage).sub(run_id, "ingest")
    docs = []
    for rel in out.list("data", suffix=".jsonl.gz"):
        docs += [json.loads(line) for line in gzip.decompress(out.read_bytes(rel)).splitlines()]
    return docs


def balanced(counts: dict) -> bool:
    return counts["documents_in"] == counts["documents_out"] + sum(counts["removed"].values())


def read(files, max_record_bytes: int = 10_000_000, **kw) -> tuple[list, dict]:
    """The reader block alone, in this process (no extraction): (documents, stats)."""
    block = _reader_cls()([[str(f) for f in files]], max_record_bytes, **kw)
    docs = list(block.run())
    stats = {k: int(getattr(v, "total", v)) for k, v in block.stats.stats.items() if not k.startswith("doc_")}
    reasons = sum(stats.get(f"skip_{r}", 0) for r in SKIP_REASONS)
    assert stats.get("records", 0) == len(docs) + reasons  # the invariant, checked on every read
    assert stats.get("pages", 0) + stats.get("text_docs", 0) == len(docs)
    return docs, stats


def real_jsonl_lines() -> list[bytes]:
    return [line for f in JSONL for line in gzip.decompress(f.read_bytes()).splitlines()]


# ---------------------------------------------------------------------------------------------------------
# readers

def test_every_page_of_the_sample_crawl_reaches_the_extractor():
    docs, st = read(sorted(CRAWL.glob("*.warc.gz")))
    assert st["records"] == 2397 and st["pages"] == 2391 and st["skip_non_response"] == 6  # 6 warcinfo
    assert len({d.id for d in docs}) == 2391
    for d in docs:
        md = d.metadata
        assert md["format"] == "html" and md["domain"] in md["url"] and md["source"].endswith(".warc.gz")
        assert len(md["date"]) == 20 and md["date"].endswith("Z") and d.text.lstrip()[:1] == "<"


def test_plain_per_record_and_whole_file_gzip_read_alike(tmp_path):
    plain = gzip.decompress(SMALL_CRAWL.read_bytes())
    (tmp_path / "plain.warc").write_bytes(plain)
    (tmp_path / "whole.warc.gz").write_bytes(gzip.compress(plain))
    ref, _ = read([SMALL_CRAWL])
    for name in ("plain.warc", "whole.warc.gz"):
        docs, st = read([tmp_path / name])
        assert [(d.id, d.text) for d in docs] == [(d.id, d.text) for d in ref] and st["pages"] == 9


def test_warc_quirks_revisits_and_wat():
    docs, st = read([WARC / "clueweb-quirk.warc.gz"])
    assert st["pages"] == 29 and st["records"] == 30  # LF line endings: every page read
    assert all(d.metadata["date"] == "" and d.metadata["date_raw"] == "2008-10-294T05:21:46-0700" for d in docs)
    docs, st = read([WARC / "iana.warc.gz"])
    assert st["skip_revisit"] == 123 and st["pages"] == 16 and st["skip_non_200"] == 4
    assert st["records"] == 343 and st["skip_non_html"] == 28 and st["skip_non_response"] == 172
    docs, st = read([WARC / "whirlwind.warc.wat.gz"])  # WAT: warcinfo + metadata records only
    assert docs == [] and st["records"] == st["skip_non_response"] >= 2


def test_wet_conversion_records_are_text_documents():
    docs, st = read([WARC / "whirlwind.warc.wet.gz"])
    assert st == {"input_files": 1, "records": 2, "skip_non_response": 1, "text_docs": 1}
    (d,) = docs
    assert d.metadata["format"] == "text" and d.metadata["url"] == "https://an.wikipedia.org/wiki/Escopete"
    assert d.metadata["date"] == "2024-05-18T01:58:10Z" and d.metadata["domain"] == "an.wikipedia.org"
    assert d.metadata["refers_to"] == "urn:uuid:2aabeff2-67f5-4608-8466-e87c6296e2b6"
    assert d.metadata["content_language"] == "spa" and d.text.startswith("Escopete - Biquipedia")


def _arc(records: list[tuple[str, str, bytes]], per_record_gzip: bool) -> bytes:
    """An ARC v1 file (filedesc record, then 'URL IP date type length' + HTTP response + newline)."""
    desc = b"1 0 Kiln\nURL IP-address Archive-date Content-type Archive-length\n"
    parts = [b"filedesc://test.arc 0.0.0.0 20240425162444 text/plain %d\n%s\n" % (len(desc), desc)]
    for url, date14, block in records:
        parts.append(b"%s 127.0.0.1 %s text/html %d\n%s\n" % (url.encode(), date14.encode(), len(block), block))
    return b"".join(gzip.compress(p) for p in parts) if per_record_gzip else b"".join(parts)


def test_arc_files_from_real_pages(tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    records = []
    with open(SMALL_CRAWL, "rb") as f:  # the HTTP responses (status line, headers, body) of real pages
        for i, rec in enumerate(ArchiveIterator(f, no_record_parse=True)):
            if rec.rec_type == "response":
                records.append((rec.rec_headers.get_header("WARC-Target-URI"), f"202404251624{i:02d}",
                                rec.raw_stream.read()))
    (tmp_path / "a.arc").write_bytes(_arc(records, per_record_gzip=False))
    (tmp_path / "b.arc.gz").write_bytes(_arc(records, per_record_gzip=True))
    ref, _ = read([SMALL_CRAWL])
    for name in ("a.arc", "b.arc.gz"):
        docs, st = read([tmp_path / name])
        assert st["records"] == 10 and st["pages"] == 9 and st["skip_non_response"] == 1  # filedesc
        assert [d.text for d in docs] == [d.text for d in ref]
        assert [d.metadata["url"] for d in docs] == [r[0] for r in records]
        assert docs[3].metadata["date"] == "2024-04-25T16:24:04Z" and docs[3].metadata["source"] == name


def test_truncated_warc_keeps_every_record_before_the_cut(tmp_path):
    src = SMALL_CRAWL.read_bytes()  # per-record gzip; record 5 spans bytes 225648-277124
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(src[:257170])
    ref, _ = read([SMALL_CRAWL])
    docs, st = read([cut])
    assert [d.id for d in docs] == [d.id for d in ref[:4]]  # records 1-4 (pages) whole, record 5 cut
    assert st["records"] == 6 and st["skip_corrupt_record"] == 1 and st["corrupt_files"] == 1


def _bad_lines(max_len: int) -> list[bytes]:
    return [b"not json {", b"[1, 2]", b'{"id": "no-text"}', b'{"text": ""}', b'{"text": "   "}', b'{"text": 5}',
            b'{"text": "\xff\xfe invalid utf-8"}', b"", b"[" * 100_000, b'{"text": "%s"}' % (b"x" * max_len)]


def test_jsonl_and_parquet_document_sets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = real_jsonl_lines()
    assert len(lines) == 20
    bad = _bad_lines(2_000_000)
    mixed = lines[:7] + bad + lines[7:]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(mixed) + b"\n")
    (tmp_path / "docs.json.gz").write_bytes(gzip.compress(b"\n".join(mixed)))  # no final newline
    rows = [json.loads(line) for line in lines]
    pq.write_table(pa.Table.from_pylist(rows + [{**rows[0], "text": None}, {**rows[1], "text": ""}]),
                   tmp_path / "docs.parquet")
    for name, n_bad, too_large in (("docs.jsonl", 9, 1), ("docs.json.gz", 9, 1), ("docs.parquet", 2, 0)):
        docs, st = read([tmp_path / name], max_record_bytes=1_000_000)
        assert st["records"] == 20 + n_bad + too_large and st["text_docs"] == 20
        assert st["skip_bad_line"] == n_bad and st.get("skip_too_large", 0) == too_large
        assert [d.text for d in docs] == [r["text"] for r in rows]
        assert [d.id for d in docs] == [r["id"] for r in rows]  # cc_net ids are the URLs
        md = docs[0].metadata
        assert md["format"] == "text" and md["url"] == rows[0]["metadata"]["url"] and md["source"] == name
        assert md["date"] == rows[0]["metadata"]["date_download"] and md["domain"] == "100kinvesting.com"
        assert md["perplexity"] == rows[0]["metadata"]["perplexity"] and md["orig_source"] == "common-crawl"
    docs, _ = read([tmp_path / "docs.jsonl"], 1_000_000, id_field="no_such_field", text_field="text")
    assert docs[0].id == "docs.jsonl#0" and docs[7].id == "docs.jsonl#17"  # file + line (10 bad lines between)


def test_stage_reads_every_format_and_text_passes_extraction(tmp_path):
    """WET + JSONL + Parquet + WARC in one run: text documents come out unchanged, HTML is extracted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    lines = real_jsonl_lines()
    (src / "a.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines[:5] + _bad_lines(10)[:-1] + lines[5:10])))
    rows = [json.loads(line) for line in lines[10:]]
    pq.write_table(pa.Table.from_pylist([{**r, "id": f"pq-{i}"} for i, r in enumerate(rows)]), src / "b.parquet")
    shutil.copy(WARC / "whirlwind.warc.wet.gz", src)
    shutil.copy(WARC / "cc.warc.gz", src)
    (src / "README.txt").write_text("not an input: ignored in a folder")
    m = run_stage("ingest", cfg_for([src]), str(tmp_path / "st"), "run1")  # a folder input
    c = m["counts"]
    assert c["files_in"] == 4 and c["files_by_kind"] == {"jsonl": 1, "parquet": 1, "warc": 1, "wet": 1}
    assert c["text_documents"] == 21 and c["html_pages"] == 1 and c["removed"]["bad_line"] == 9 and balanced(c)
    docs = {d["id"]: d for d in read_docs(str(tmp_path / "st"))}
    for i, r in enumerate(rows):
        assert docs[f"pq-{i}"]["text"] == r["text"] and docs[f"pq-{i}"]["metadata"]["format"] == "text"
    assert all(set(d["metadata"]) >= {"format", "url", "domain", "date", "source"} for d in docs.values())


def test_unknown_extension_is_one_clear_error(tmp_path):
    (tmp_path / "crawl.txt").write_text("hello")
    with pytest.raises(StageError, match=r"^ingest.inputs: unknown file type '.*crawl.txt' \(1 such files\); "
                                         r"readable: .warc"):
        run_stage("ingest", cfg_for([tmp_path / "*.txt"]), str(tmp_path / "st"), "run1")
    assert [file_kind(n) for n in ("a.WARC.GZ", "x.warc.wet.gz", "y.json.gz", "s3://b/k.arc", "z.gz")] == \
        ["warc", "wet", "jsonl", "arc", None]


def test_inputs_listed_with_sizes_and_balanced_by_size(tmp_path):
    from stages.core.runner import StageContext
    from stages.ingest.sources import balance, input_files

    (tmp_path / "in" / "sub").mkdir(parents=True)
    names = {"in/a.warc.gz": "iana.warc.gz", "in/sub/b.warc.gz": "warcfile.warc.gz",
             "in/c.wet.gz": "whirlwind.warc.wet.gz", "in/d.warc.gz": "sample-0000.warc.gz",
             "in/e.warc.gz": "sample-0001.warc.gz"}
    for rel, real in names.items():
        shutil.copy(WARC / real, tmp_path / rel)
    cfg = cfg_for([tmp_path / "in", tmp_path / "in" / "a.warc.gz"])  # a folder, and a file in it again
    files = input_files(cfg.ingest, StageContext("ingest", "r", cfg, None, None, {}, str(tmp_path)))
    assert sorted(files) == sorted((str(tmp_path / rel), (WARC / real).stat().st_size) for rel, real in names.items())
    shards = balance(files, 2)  # 787k | 237k + 214k + 136k + 3k: the big file alone, the rest together
    assert shards == [[str(tmp_path / "in/a.warc.gz")], sorted(str(tmp_path / r) for r in names if "a.warc" not in r)]


# ---------------------------------------------------------------------------------------------------------
# sources: Common Crawl through a local HTTP server, s3://

@pytest.fixture
def http_served(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (threaded http.server): (folder, base URL, requests as
    [(method, path)])."""
    root, log = tmp_path / "www", []
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            log.append((self.command, self.path))
            return super().send_head()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", log
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_root(http_served):
    """(folder, base URL) of ``http_served``."""
    return http_served[:2]


SEGMENTS = ["1715971057216.39", "1715971057216.40", "1715971057216.41"]
CC_FILES = {  # segment index -> real files standing in for that segment's files (in listing order)
    0: ["cc.warc.gz", "example.warc.gz"], 1: ["whirlwind.warc.gz", "warcfile.warc.gz"], 2: ["sample-0000.warc.gz"]}


def make_crawl(root, kind: str = "warc") -> list[str]:
    """A Common Crawl layout: crawl-data/<crawl>/<kind>.paths.gz listing symlinks to real files."""
    paths = []
    for s, names in CC_FILES.items():
        for j, name in enumerate(names if kind == "warc" else ["whirlwind.warc.wet.gz"]):
            ext = "warc.gz" if kind == "warc" else "warc.wet.gz"
            rel = f"crawl-data/{CC}/segments/{SEGMENTS[s]}/{kind}/CC-MAIN-20240517233122-{s}{j:04d}.{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(WARC / name)
            paths.append(rel)
    listing = sorted(paths, key=lambda p: random.Random(p).random())  # order of lines must not matter
    (root / f"crawl-data/{CC}/{kind}.paths.gz").write_bytes(gzip.compress("\n".join(listing).encode() + b"\n"))
    return sorted(paths)


def test_common_crawl_crawl_id_over_http(tmp_path, http_root):
    from stages.core.runner import StageContext
    from stages.ingest.sources import input_files

    root, base = http_root
    paths = make_crawl(root)
    cc = {"crawl": CC, "segments": [0, 2], "files_per_segment": 1, "kind": "warc", "base_url": base}
    cfg = load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": cc})
    files = input_files(cfg.ingest, StageContext("ingest", "r", cfg, None, None, {}, str(tmp_path)))
    assert files == [(base + paths[0], (WARC / "cc.warc.gz").stat().st_size),  # sizes by HEAD
                     (base + paths[2], (WARC / "whirlwind.warc.gz").stat().st_size)]
    m = run_stage("ingest", cfg, str(tmp_path / "st"), "run1")
    c = m["counts"]
    assert c["files_in"] == 2 and c["html_pages"] == 2 and balanced(c)
    docs = read_docs(str(tmp_path / "st"))
    assert sorted(d["metadata"]["source"] for d in docs) == sorted(p.rsplit("/", 1)[1] for p in (paths[0], paths[2]))
    assert {d["metadata"]["domain"] for d in docs} == {"commoncrawl.org", "an.wikipedia.org"}

    make_crawl(root, "wet")  # the same crawl's WET files: text documents
    cfg = load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": {**cc, "kind": "wet", "segments": [1, 3]}})
    m = run_stage("ingest", cfg, str(tmp_path / "st2"), "run1")
    assert m["counts"]["text_documents"] == 2 and m["counts"]["files_in"] == 2

    for bad, msg in (({"crawl": "CC-MAIN-24-22"}, "CC-MAIN-YYYY-WW"), ({"segments": [2, 1]}, "start < stop")):
        with pytest.raises(ConfigError, match=msg):
            load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": {**cc, **bad}})
    for bad, msg in (({"segments": [0, 9]}, r"segments \[0, 9\) but CC-MAIN-2024-22 has 3 segments"),
                     ({"crawl": "CC-MAIN-2023-50"}, r"cannot read the listing .*CC-MAIN-2023-50/warc.paths.gz")):
        cfg = load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": {**cc, **bad}})
        with pytest.raises(StageError, match=msg):
            run_stage("ingest", cfg, str(tmp_path / "st3"), "run1")


def test_http_inputs_are_streamed(http_root):
    import tracemalloc

    from stages.ingest.readers import open_raw

    root, base = http_root
    (root / "cc.warc.gz").symlink_to(WARC / "cc.warc.gz")
    with open_raw(base + "cc.warc.gz") as f:
        assert type(f).__name__ == "HTTPStreamFile"  # one GET read as consumed, never the whole file at once
    docs, st = read([base + "cc.warc.gz", base + "missing.warc.gz"])
    assert st["pages"] == 1 and st["unreadable_files"] == 1
    big = root / "big.warc"  # 24 MB of real pages, uncompressed: memory must stay well below the file's size
    big.write_bytes(gzip.decompress((CRAWL / "docs.python.org-0001.warc.gz").read_bytes()))
    block = _reader_cls()([[base + "big.warc"]], 10_000_000)
    tracemalloc.start()
    try:
        assert sum(1 for _ in block.run()) == 249
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.6 * big.stat().st_size, peak  # ~9.6 MB measured (largest page + buffers)


def test_http_open_retries_transient_errors_not_missing_files():
    """A server answering 503 twice (Common Crawl's SlowDown) is retried; a 404 is not (unreadable at once)."""
    hits = []
    payload = (WARC / "cc.warc.gz").read_bytes()

    class Flaky(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            hits.append(self.path)
            status = 404 if "missing" in self.path else 503 if hits.count(self.path) <= 2 else 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload) if status == 200 else 0))
            self.end_headers()
            if body and status == 200:
                self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        docs, st = read([base + "cc.warc.gz", base + "missing.warc.gz"])
    finally:
        server.shutdown()
        server.server_close()
    assert st["pages"] == 1 and st["unreadable_files"] == 1
    assert hits.count("/cc.warc.gz") >= 3 and hits.count("/missing.warc.gz") <= 2  # HEAD (+ GET) once


def test_s3_storage_and_s3_input(tmp_path, s3_bucket):
    """Artifacts in S3 (moto_server); WARC input from an s3:// glob and an s3:// prefix (a folder)."""
    src = Storage(s3_bucket).sub("crawl")
    for name in ("cc.warc.gz", "example.warc.gz"):
        src.put_file(str(WARC / name), name)
    src.put_file(str(WARC / "whirlwind.warc.wet.gz"), "wet/x/whirlwind.warc.wet.gz")
    src.put_file(str(WARC / "whirlwind.warc.wat.gz"), "wet/x/whirlwind.warc.wat.gz")
    src.put_file(str(JSONL[0]), "wet/index.cdx")  # not an input type: ignored in a folder
    cfg = load_tiny(None, {"ingest.inputs": [f"{s3_bucket}/crawl/*.warc.gz", f"{s3_bucket}/crawl/wet/"],
                           "run.workers": 1})
    m = run_stage("ingest", cfg, s3_bucket + "/artifacts", "run1")
    c = m["counts"]
    assert c["files_in"] == 4 and c["html_pages"] == 2 and c["text_documents"] == 1 and balanced(c)
    assert c["removed"]["revisit"] == 1
    docs = read_docs(s3_bucket + "/artifacts")
    assert len(docs) == c["documents_out"] >= 2
    assert {d["metadata"]["domain"] for d in docs} <= {"commoncrawl.org", "example.com", "www.example.com",
                                                      "an.wikipedia.org"}


def test_common_crawl_from_s3(tmp_path, s3_bucket):
    """base_url s3://... (as s3://commoncrawl/): the listing and the files come from the bucket."""
    from stages.core.runner import StageContext
    from stages.ingest.sources import input_files

    paths = make_crawl(tmp_path, "wet")
    bucket = Storage(s3_bucket)
    for rel in [*paths, f"crawl-data/{CC}/wet.paths.gz"]:
        bucket.put_file(str(tmp_path / rel), rel)
    cc = {"crawl": CC, "segments": [2, 3], "files_per_segment": 5, "kind": "wet", "base_url": s3_bucket}
    cfg = load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": cc})
    files = input_files(cfg.ingest, StageContext("ingest", "r", cfg, None, None, {}, str(tmp_path)))
    assert files == [(f"{s3_bucket}/{paths[2]}", (WARC / "whirlwind.warc.wet.gz").stat().st_size)]
    docs, st = read([f for f, _ in files])
    assert st["text_docs"] == 1 and docs[0].metadata["url"] == "https://an.wikipedia.org/wiki/Escopete"


# ---------------------------------------------------------------------------------------------------------
# whole stage on WARC files

def test_one_crawl_file_exact_stable_with_metadata(tmp_path):
    cfg = cfg_for([SMALL_CRAWL])
    m1 = run_stage("ingest", cfg, str(tmp_path / "a"), "run1")
    m2 = run_stage("ingest", cfg, str(tmp_path / "b"), "run1")
    c = m1["counts"]
    assert c == m2["counts"]
    assert c["documents_in"] == 10 and c["html_pages"] == 9 and c["documents_out"] == 9
    assert c["removed"]["non_response"] == 1 and balanced(c)
    docs = read_docs(str(tmp_path / "a"))
    assert sorted(d["id"] for d in docs) == sorted(d["id"] for d in read_docs(str(tmp_path / "b")))
    assert len({d["id"] for d in docs}) == 9
    for d in docs:
        md = d["metadata"]
        assert md["url"].startswith("https://docs.python.org/3.11/") and md["domain"] == "docs.python.org"
        assert md["date"].startswith("20") and md["content_type"] == "text/html" and len(d["text"]) > 200
        assert md["format"] == "html" and md["source"] == SMALL_CRAWL.name
    assert c["bytes_out"] == sum(len(d["text"].encode()) for d in docs)


def test_common_crawl_and_revisits_counted(tmp_path):
    """warcfile: CC records with WARC-Identified-Payload-Type; iana: revisits, redirects, JS/CSS/images."""
    m = run_stage("ingest", cfg_for([WARC / "warcfile.warc.gz", WARC / "iana.warc.gz"]), str(tmp_path), "run1")
    c, r = m["counts"], m["counts"]["removed"]
    assert c["documents_in"] == 50 + 343
    assert r["non_response"] == 34 + 172  # warcinfo, request and metadata records
    assert r["revisit"] == 123 and r["non_200"] == 4 and r["non_html"] == 28
    assert c["html_pages"] == 16 + 16
    assert c["documents_out"] + sum(r[k] for k in EXTRACT_REASONS) == 32
    assert c["documents_out"] >= 28 and balanced(c)
    docs = read_docs(str(tmp_path))
    cc = [d for d in docs if d["metadata"]["content_type"] == "application/xhtml+xml"]
    assert cc and all(d["metadata"]["url"].startswith("http") for d in cc)
    # the cp1251 / gb2312 pages were decoded with their declared charsets
    charsets = {d["metadata"]["charset"] for d in docs}
    assert {"cp1251", "gb2312"} <= charsets
    assert not any("\ufffd" in d["text"] for d in docs)
    assert {d["metadata"]["domain"] for d in docs} >= {"www.iana.org"}


def test_euc_jp_pages_decoded(tmp_path):
    m = run_stage("ingest", cfg_for([WARC / "clueweb-quirk.warc.gz"]), str(tmp_path), "run1")
    docs = read_docs(str(tmp_path))
    assert m["counts"]["html_pages"] == 29 and len(docs) >= 25
    assert all(d["metadata"]["charset"] == "euc_jp" for d in docs)
    japanese = sum(any("\u3040" <= ch <= "\u30ff" for ch in d["text"]) for d in docs)
    assert japanese >= 0.8 * len(docs)


def test_damaged_files_are_counted_skips(tmp_path):
    src = SMALL_CRAWL.read_bytes()
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "a-truncated.warc.gz").write_bytes(src[: len(src) * 6 // 10])  # cut inside a record
    (bad / "b-random.warc.gz").write_bytes(random.Random(3).randbytes(50_000))
    (bad / "c-empty.warc.gz").write_bytes(b"")
    shutil.copy(WARC / "warcfile.warc.gz", bad / "d-good.warc.gz")
    (bad / "e-truncated.jsonl.gz").write_bytes(JSONL[0].read_bytes()[:20_000])
    m = run_stage("ingest", cfg_for([bad / "*.gz"]), str(tmp_path / "st"), "run1")
    c = m["counts"]
    assert c["files_in"] == 5 and c["files_skipped"] == {"corrupt": 3, "empty": 1, "unreadable": 0}
    assert c["removed"]["corrupt_record"] == 1 and balanced(c)
    docs = read_docs(str(tmp_path / "st"))
    by_file = {}
    for d in docs:
        by_file.setdefault(d["metadata"]["source"], []).append(d)
    assert len(by_file["a-truncated.warc.gz"]) == 4  # pages before the damage are kept
    assert len(by_file["d-good.warc.gz"]) >= 14  # the good file is untouched
    assert 1 <= len(by_file["e-truncated.jsonl.gz"]) < 10
    logs = Storage(str(tmp_path / "st")).sub("run1", "ingest")
    text = "".join(gzip.decompress(logs.read_bytes(p)).decode() if p.endswith(".gz") else logs.read_bytes(p).decode()
                   for p in logs.list("logs", suffix=""))
    for name in ("a-truncated.warc.gz", "b-random.warc.gz", "e-truncated.jsonl.gz"):
        assert sum(name in line and "corrupt" in line for line in text.splitlines()) == 1


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"ingest.inputs: '.*nothing-here-\*.warc.gz' matches no file"):
        run_stage("ingest", cfg_for([tmp_path / "nothing-here-*.warc.gz"]), str(tmp_path), "run1")


def test_decode_html_fallbacks_on_real_euc_jp_bytes():
    """Declared charset first; a wrong or missing one falls back to <meta>, then UTF-8, then detection."""
    from warcio.archiveiterator import ArchiveIterator

    from stages.ingest import decode_html, parse_content_type

    with open(WARC / "clueweb-quirk.warc.gz", "rb") as f:
        rec = next(r for r in ArchiveIterator(f) if r.rec_type == "response")
        declared = parse_content_type(rec.http_headers.get_header("Content-Type"))
        payload = rec.content_stream().read()
    assert declared[1] == "euc_jp"
    text, enc = decode_html(payload, declared[1])
    assert enc == "euc_jp" and "\ufffd" not in text and any("\u3040" <= ch <= "\u30ff" for ch in text)
    assert decode_html(payload, "utf-8") == (text, "euc_jp")  # wrong declaration: strict UTF-8 fails
    no_meta = payload.replace(b"charset=", b"xharset=")
    assert decode_html(no_meta, None)[0] == no_meta.decode("euc_jp")  # detected
    assert parse_content_type("Text/HTML; Charset=\"ISO-8859-1\"") == ("text/html", "iso8859-1")
    assert parse_content_type("text/html; charset=no-such-codec") == ("text/html", None)


def test_iso_dates():
    from datetime import datetime, timezone

    from stages.ingest.readers import iso_date

    assert iso_date("2024-05-18T01:58:10Z") == iso_date("2024-05-18T03:58:10.5+02:00") == "2024-05-18T01:58:10Z"
    assert iso_date("20080430204825") == "2008-04-30T20:48:25Z"
    assert iso_date("Fri, 31 May 2024 01:16:46 GMT") == "2024-05-31T01:16:46Z"
    assert iso_date(datetime(2020, 3, 29, 9, 4, 10, tzinfo=timezone.utc)) == "2020-03-29T09:04:10Z"
    assert iso_date("2008-10-294T05:21:46-0700") == iso_date("soon") == iso_date(None) == ""


def test_many_kinds_of_garbage_never_crash_the_run(tmp_path):
    """Seeded garbage in the shapes readers meet in the wild: each file is one counted skip."""
    rng = random.Random(2026)
    good = SMALL_CRAWL.read_bytes()
    plain = gzip.decompress(good)
    src = tmp_path / "in"
    src.mkdir()
    garbage = {
        "random.warc.gz": lambda i: rng.randbytes(5_000 + i),
        "gzip-magic.warc.gz": lambda i: b"\x1f\x8b\x08\x00" + rng.randbytes(4_000),
        "gzip-of-random.warc.gz": lambda i: gzip.compress(rng.randbytes(3_000)),
        "warc-header-then-junk.warc.gz": lambda i: b"WARC/1.0\r\n" + rng.randbytes(3_000),
        "flipped-bytes.warc.gz": lambda i: bytes(b ^ 0xFF if j % 97 == i else b for j, b in enumerate(good[:200_000])),
        "plain-cut-mid-header.warc.gz": lambda i: plain[: plain.index(b"WARC-Type: response") + 40],
        "random.parquet": lambda i: b"PAR1" + rng.randbytes(3_000) + b"PAR1",
        "random.jsonl.gz": lambda i: rng.randbytes(3_000),
    }
    for kind, make in garbage.items():
        for i in range(2):
            (src / f"{i}-{kind}").write_bytes(make(i))
    shutil.copy(SMALL_CRAWL, src / "zz-good.warc.gz")
    m = run_stage("ingest", cfg_for([src], **{"run.workers": 1}), str(tmp_path / "st"), "run1")
    c = m["counts"]
    assert c["files_in"] == 17 and sum(c["files_skipped"].values()) >= 12 and balanced(c)
    docs = read_docs(str(tmp_path / "st"))
    assert sum(d["metadata"]["source"] == "zz-good.warc.gz" for d in docs) == 9  # the good file is whole


# ---------------------------------------------------------------------------------------------------------
# the fingerprint: crawl files by content (a file replaced under the same path re-runs ingest)

EDIT = (b"This article explains", b"This article EXPLAINS")  # in the first page (whatsnew/3.2) of SMALL_CRAWL


def crawl_slice(pages: int) -> bytes:
    """The warcinfo and the first ``pages`` responses of a real crawl file, uncompressed (a plain .warc)."""
    raw = gzip.decompress(SMALL_CRAWL.read_bytes())
    starts = [m.start() for m in re.finditer(rb"WARC/1\.0\r\n", raw)]
    return raw[:starts[pages + 1]]


def edited(data: bytes) -> bytes:
    """``data`` with one phrase of its first page changed: same size, other bytes."""
    out = data.replace(*EDIT, 1)
    assert len(out) == len(data) and out != data
    return out


def fingerprint(cfg) -> str:
    from stages.core.runner import stage_fingerprint

    return stage_fingerprint(cfg, "ingest", {})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def texts(storage: str) -> str:
    return "\n".join(d["text"] for d in read_docs(storage))


def test_local_crawl_file_edited_in_place_reruns_ingest(tmp_path):
    from stages.ingest import external_inputs

    (tmp_path / "in").mkdir()
    crawl, cc = tmp_path / "in" / "docs.warc", tmp_path / "in" / "cc.warc.gz"
    data = crawl_slice(2)  # whatsnew/3.2 and 3.3, 660 kB
    crawl.write_bytes(data)
    shutil.copy(WARC / "cc.warc.gz", cc)
    cfg, st = cfg_for([tmp_path / "in" / "*"]), str(tmp_path / "st")
    m1 = run_stage("ingest", cfg, st, "run1")
    assert m1["metrics"]["input_files"] == [  # in the order of metrics.inputs, like the outputs' entries
        {"path": str(cc), "bytes": cc.stat().st_size, "sha256": sha256(cc.read_bytes())},
        {"path": str(crawl), "bytes": len(data), "sha256": sha256(data)}]
    # the fingerprint names local files without their folder: the same crawl mounted elsewhere is the same input
    assert [{**f, "path": Path(f["path"]).name} for f in m1["metrics"]["input_files"]] == \
        external_inputs(cfg.ingest, cfg)["files"]
    shutil.copytree(tmp_path / "in", tmp_path / "elsewhere")
    moved = cfg_for([tmp_path / "elsewhere" / "*"])
    assert external_inputs(moved.ingest, moved) == external_inputs(cfg.ingest, cfg)
    assert m1["metrics"]["inputs"] == [str(cc), str(crawl)] and m1["counts"]["html_pages"] == 3
    assert EDIT[0].decode() in texts(st) and EDIT[1].decode() not in texts(st)

    assert run_stage("ingest", cfg, st, "run1").get("skipped")  # untouched: skipped
    mtime = crawl.stat().st_mtime_ns
    os.utime(crawl, ns=(mtime + 10**9, mtime + 10**9))  # touched, same bytes: identified by content, skipped
    assert run_stage("ingest", cfg, st, "run1").get("skipped")

    crawl.write_bytes(edited(data))  # same path, same size, other bytes
    m2 = run_stage("ingest", cfg, st, "run1")
    assert not m2.get("skipped") and m2["fingerprint"] != m1["fingerprint"]
    assert m2["metrics"]["input_files"] == [m1["metrics"]["input_files"][0],
                                            {"path": str(crawl), "bytes": len(data), "sha256": sha256(edited(data))}]
    assert EDIT[1].decode() in texts(st) and EDIT[0].decode() in texts(st)  # the edited page; 3.3 has it too
    assert texts(st).count(EDIT[1].decode()) == 1


def test_files_past_the_hash_budget_by_size_mtime_and_ends(tmp_path):
    """Smallest files first are hashed whole within hash_budget_mb; a bigger one by size, mtime and its ends."""
    from stages.ingest import external_inputs
    from stages.ingest.identity import SAMPLE

    small, big = tmp_path / "a.warc", tmp_path / "b.warc"
    small.write_bytes(crawl_slice(1))  # 334 kB
    big.write_bytes(crawl_slice(4))  # 1.0 MB: past a 1 MiB budget once the small one is hashed
    cfg = cfg_for([tmp_path / "*.warc"], **{"ingest.hash_budget_mb": 1})
    b = big.read_bytes()
    assert external_inputs(cfg.ingest, cfg)["files"] == [
        {"path": small.name, "bytes": small.stat().st_size, "sha256": sha256(small.read_bytes())},
        {"path": big.name, "bytes": len(b), "mtime_ns": big.stat().st_mtime_ns,
         "head_tail_sha256": sha256(b[:SAMPLE] + b[-SAMPLE:])}]
    before = fingerprint(cfg)
    mtime = big.stat().st_mtime_ns
    os.utime(big, ns=(mtime + 10**9, mtime + 10**9))  # past the budget a touch re-runs (mtime is the signal)
    assert fingerprint(cfg) != before
    os.utime(big, ns=(mtime, mtime))
    assert fingerprint(cfg) == before
    big.write_bytes(b[:-SAMPLE] + b[-SAMPLE:].replace(b"</html>", b"</HTML>", 1))  # an edit in the last 64 KiB
    os.utime(big, ns=(mtime, mtime))  # even with the old mtime put back
    assert fingerprint(cfg) != before
    unlimited = cfg_for([tmp_path / "*.warc"])  # default budget (1 GiB): both by content
    assert [sorted(f) for f in external_inputs(unlimited.ingest, unlimited)["files"]] == [["bytes", "path", "sha256"]] * 2


def test_s3_object_replaced_under_the_same_key_reruns_ingest(tmp_path, s3_bucket):
    import boto3

    data, bucket = crawl_slice(2), s3_bucket[len("s3://"):]
    s3 = boto3.client("s3")  # the user's own upload, not through Kiln's filesystem (whose listing cache it misses)
    s3.put_object(Bucket=bucket, Key="crawl/docs.warc", Body=data)
    s3.put_object(Bucket=bucket, Key="crawl/cc.warc.gz", Body=(WARC / "cc.warc.gz").read_bytes())
    cfg = load_tiny(None, {"ingest.inputs": [f"{s3_bucket}/crawl/"], "run.workers": 1})
    st = str(tmp_path / "st")
    m1 = run_stage("ingest", cfg, st, "run1")
    ids = m1["metrics"]["input_files"]
    assert ids == [{"path": f"{s3_bucket}/crawl/cc.warc.gz", "bytes": (WARC / "cc.warc.gz").stat().st_size,
                    "etag": hashlib.md5((WARC / "cc.warc.gz").read_bytes()).hexdigest()},  # S3's ETag of a PUT
                   {"path": f"{s3_bucket}/crawl/docs.warc", "bytes": len(data), "etag": hashlib.md5(data).hexdigest()}]
    assert run_stage("ingest", cfg, st, "run1").get("skipped")

    s3.put_object(Bucket=bucket, Key="crawl/docs.warc", Body=edited(data))  # same key, same size
    m2 = run_stage("ingest", cfg, st, "run1")
    assert not m2.get("skipped") and m2["fingerprint"] != m1["fingerprint"]
    assert m2["metrics"]["input_files"] == [ids[0], {**ids[1], "etag": hashlib.md5(edited(data)).hexdigest()}]
    assert texts(st).count(EDIT[1].decode()) == 1
    assert run_stage("ingest", cfg, st, "run1").get("skipped")


def test_http_sources_by_etag_and_a_server_without_validators_said_so(tmp_path):
    from stages.ingest.identity import UNVERIFIED

    data = crawl_slice(2)
    served = {"/etag/docs.warc": (data, {"ETag": f'"{sha256(data)[:16]}"'}),
              "/dated/cc.warc.gz": ((WARC / "cc.warc.gz").read_bytes(), {"Last-Modified": "Wed, 15 May 2024 10:00:00 GMT"}),
              "/bare/example.warc.gz": ((WARC / "example.warc.gz").read_bytes(), {})}
    hits = []

    class Files(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            hits.append((self.command, self.path))
            payload, headers = served[self.path]
            self.send_response(200)
            for k, v in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cfg = load_tiny(None, {"ingest.inputs": [base + p for p in served]})
        st = str(tmp_path / "st")
        m1 = run_stage("ingest", cfg, st, "run1")
        assert m1["metrics"]["input_files"] == [
            {"path": base + "/etag/docs.warc", "bytes": len(data), "etag": sha256(data)[:16]},
            {"path": base + "/dated/cc.warc.gz", "bytes": (WARC / "cc.warc.gz").stat().st_size,
             "last_modified": "Wed, 15 May 2024 10:00:00 GMT"},
            {"path": base + "/bare/example.warc.gz", "bytes": (WARC / "example.warc.gz").stat().st_size,
             "unverified": UNVERIFIED}]  # no validator: said, and the run goes on
        assert m1["counts"]["files_in"] == 3 and m1["counts"]["html_pages"] == 4
        hits.clear()
        assert run_stage("ingest", cfg, st, "run1").get("skipped")
        assert sorted(hits) == sorted(("HEAD", p) for p in served)  # a skip costs one HEAD per file, no GET

        served["/etag/docs.warc"] = (edited(data), {"ETag": f'"{sha256(edited(data))[:16]}"'})  # same URL and size
        m2 = run_stage("ingest", cfg, st, "run1")
        assert not m2.get("skipped") and m2["fingerprint"] != m1["fingerprint"]
        assert m2["metrics"]["input_files"][0]["etag"] == sha256(edited(data))[:16]
        assert texts(st).count(EDIT[1].decode()) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_glob_picking_a_new_file_changes_the_fingerprint(tmp_path):
    """The fingerprint identifies exactly the files ingest reads (the same resolution: sources.listing)."""
    from stages.core.runner import StageContext
    from stages.ingest import external_inputs
    from stages.ingest.sources import input_files

    (tmp_path / "in" / "sub").mkdir(parents=True)
    shutil.copy(WARC / "cc.warc.gz", tmp_path / "in" / "a.warc.gz")
    shutil.copy(WARC / "whirlwind.warc.wet.gz", tmp_path / "in" / "sub" / "c.wet.gz")
    cfg = cfg_for([tmp_path / "in" / "*.warc.gz", tmp_path / "in" / "sub"])  # a glob and a folder

    def listed():
        read = [u for u, _ in input_files(cfg.ingest, StageContext("ingest", "r", cfg, None, None, {}, str(tmp_path)))]
        assert [f["path"] for f in external_inputs(cfg.ingest, cfg)["files"]] == [Path(u).name for u in read]
        return read

    assert listed() == [str(tmp_path / "in" / "a.warc.gz"), str(tmp_path / "in" / "sub" / "c.wet.gz")]
    before = fingerprint(cfg)
    shutil.copy(JSONL[0], tmp_path / "in" / "sub" / "index.cdx")  # not a crawl file: ignored by both
    shutil.copy(WARC / "example.warc.gz", tmp_path / "in" / "b.wet")  # not matched by the glob
    assert len(listed()) == 2 and fingerprint(cfg) == before
    shutil.copy(WARC / "example.warc.gz", tmp_path / "in" / "b.warc.gz")  # the glob picks a new file
    assert str(tmp_path / "in" / "b.warc.gz") in listed() and fingerprint(cfg) != before
    (tmp_path / "in" / "b.warc.gz").unlink()
    assert fingerprint(cfg) == before


def test_common_crawl_fingerprint_is_the_resolved_list_without_fetching_files(tmp_path, http_served):
    from stages.ingest import external_inputs

    root, base, log = http_served
    paths = make_crawl(root)
    cc = {"crawl": CC, "segments": [0, 2], "files_per_segment": 1, "kind": "warc", "base_url": base}
    cfg = load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": cc})
    listing = f"{base}crawl-data/{CC}/warc.paths.gz"
    assert external_inputs(cfg.ingest, cfg)["files"] == [{"path": base + p, "listed_in": listing}
                                                          for p in (paths[0], paths[2])]
    assert {p for _, p in log} == {f"/crawl-data/{CC}/warc.paths.gz"}  # the listing only: no crawl file asked for
    before = fingerprint(cfg)
    assert fingerprint(cfg) == before
    for other in ({"segments": [0, 3]}, {"files_per_segment": 2}):
        assert fingerprint(load_tiny(None, {"ingest.inputs": [], "ingest.common_crawl": {**cc, **other}})) != before
    log.clear()
    m = run_stage("ingest", cfg, str(tmp_path / "st"), "run1")  # the run HEADs each file (sizes): recorded too
    files = m["metrics"]["input_files"]
    assert [f["path"] for f in files] == m["metrics"]["inputs"] == [base + paths[0], base + paths[2]]
    assert all(f["listed_in"] == listing and f["last_modified"] and f["bytes"] > 0 for f in files)
