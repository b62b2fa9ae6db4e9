"""ingest on real WARC files: exact counts, metadata, skips by reason, damaged input."""

from __future__ import annotations

import gzip
import json
import random
import shutil

import pytest

from conftest import CRAWL, SHARED, load_tiny
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage

WARC = SHARED / "warc"
SMALL_CRAWL = CRAWL / "docs.python.org-0002.warc.gz"  # 1 warcinfo + 9 real docs.python.org pages
SLOW_OK = {"ingest.extract.timeout": 300}  # a loaded 2-core machine must not turn into timeouts


def cfg_for(inputs, **extra):
    return load_tiny(None, {"ingest.inputs": [str(p) for p in inputs], **SLOW_OK, **extra})


def read_docs(storage: str, run_id: str = "run1") -> list[dict]:
    out = Storage(storage).sub(run_id, "ingest")
    docs = []
    for rel in out.list("data", suffix=".jsonl.gz"):
        docs += [json.loads(line) for line in gzip.decompress(out.read_bytes(rel)).splitlines()]
    return docs


def balanced(counts: dict) -> bool:
    return counts["documents_in"] == counts["documents_out"] + sum(counts["removed"].values())


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
        assert md["date"].startswith("20") and md["content_type"] == "text/html" and len(d["text"]) > 1000
    assert c["bytes_out"] == sum(len(d["text"].encode()) for d in docs)
    # inline <code> stays inside its sentence (trafilatura alone would break the line after "argparse")
    whatsnew = next(d["text"] for d in docs if d["metadata"]["url"].endswith("whatsnew/3.2.html"))
    assert "A new module for command line parsing, argparse, was introduced to" in whatsnew


def test_common_crawl_and_revisits_counted(tmp_path):
    """warcfile: CC records with WARC-Identified-Payload-Type; iana: revisits, redirects, JS/CSS/images."""
    m = run_stage("ingest", cfg_for([WARC / "warcfile.warc.gz", WARC / "iana.warc.gz"]), str(tmp_path), "run1")
    c, r = m["counts"], m["counts"]["removed"]
    assert c["documents_in"] == 50 + 343
    assert r["non_response"] == 34 + 172  # warcinfo, request and metadata records
    assert r["revisit"] == 123 and r["non_200"] == 4 and r["non_html"] == 28
    assert c["html_pages"] == 16 + 16
    assert c["documents_out"] + r["extract_empty"] + r["extract_timeout"] + r["extract_error"] == 32
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
    m = run_stage("ingest", cfg_for([bad / "*.warc.gz"]), str(tmp_path / "st"), "run1")
    c = m["counts"]
    assert c["files_in"] == 4 and c["files_skipped"] == {"corrupt": 2, "empty": 1}
    assert c["removed"]["corrupt_record"] == 1 and balanced(c)
    docs = read_docs(str(tmp_path / "st"))
    by_file = {}
    for d in docs:
        by_file.setdefault(d["metadata"]["source"], []).append(d)
    assert 1 <= len(by_file["a-truncated.warc.gz"]) < 9  # pages before the damage are kept
    assert len(by_file["d-good.warc.gz"]) >= 14  # the good file is untouched
    logs = Storage(str(tmp_path / "st")).sub("run1", "ingest")
    text = "".join(gzip.decompress(logs.read_bytes(p)).decode() if p.endswith(".gz") else logs.read_bytes(p).decode()
                   for p in logs.list("logs", suffix=""))
    for name in ("a-truncated", "b-random"):
        assert sum(f"{name}.warc.gz" in line and "corrupt" in line for line in text.splitlines()) == 1


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"ingest.inputs: '.*nothing-here-\*.warc.gz' matches no file"):
        run_stage("ingest", cfg_for([tmp_path / "nothing-here-*.warc.gz"]), str(tmp_path), "run1")


def test_s3_storage_and_s3_input(tmp_path, s3_bucket):
    """Artifacts in S3 (moto_server), and WARC input read from an s3:// glob."""
    src = Storage(s3_bucket).sub("crawl")
    for name in ("cc.warc.gz", "example.warc.gz"):
        src.put_file(str(WARC / name), name)
    cfg = load_tiny(None, {"ingest.inputs": [f"{s3_bucket}/crawl/*.warc.gz"], **SLOW_OK, "run.workers": 1})
    m = run_stage("ingest", cfg, s3_bucket + "/artifacts", "run1")
    c = m["counts"]
    assert c["files_in"] == 2 and c["html_pages"] == 2 and c["removed"]["revisit"] == 1 and balanced(c)
    docs = read_docs(s3_bucket + "/artifacts")
    assert len(docs) == c["documents_out"] >= 1
    assert {d["metadata"]["domain"] for d in docs} <= {"commoncrawl.org", "example.com", "www.example.com"}


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


def test_many_kinds_of_garbage_never_crash_the_run(tmp_path):
    """Seeded garbage in the shapes warcio meets in the wild: each file is one counted skip."""
    rng = random.Random(2026)
    good = SMALL_CRAWL.read_bytes()
    plain = gzip.decompress(good)
    src = tmp_path / "in"
    src.mkdir()
    garbage = {
        "random": lambda i: rng.randbytes(5_000 + i),
        "gzip-magic": lambda i: b"\x1f\x8b\x08\x00" + rng.randbytes(4_000),
        "gzip-of-random": lambda i: gzip.compress(rng.randbytes(3_000)),
        "warc-header-then-junk": lambda i: b"WARC/1.0\r\n" + rng.randbytes(3_000),
        "flipped-bytes": lambda i: bytes(b ^ 0xFF if j % 97 == i else b for j, b in enumerate(good[:200_000])),
        "plain-cut-mid-header": lambda i: plain[: plain.index(b"WARC-Type: response") + 40],
    }
    for kind, make in garbage.items():
        for i in range(2):
            (src / f"{kind}-{i}.warc.gz").write_bytes(make(i))
    shutil.copy(SMALL_CRAWL, src / "zz-good.warc.gz")
    m = run_stage("ingest", cfg_for([src / "*.warc.gz"], **{"run.workers": 1}), str(tmp_path / "st"), "run1")
    c = m["counts"]
    assert c["files_in"] == 13 and sum(c["files_skipped"].values()) >= 8 and balanced(c)
    docs = read_docs(str(tmp_path / "st"))
    assert sum(d["metadata"]["source"] == "zz-good.warc.gz" for d in docs) == 9  # the good file is whole
