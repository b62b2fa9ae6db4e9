"""normalize on real text: mojibake, NFC, invisible characters, and boilerplate of real extracted pages."""

from __future__ import annotations

import gzip
import json
import unicodedata

import ftfy.bad_codecs  # noqa: F401 - registers the "sloppy-windows-1252" codec

from conftest import CRAWL, load_tiny, real_docs, seed_stage
from stages.core.runner import run_stage
from stages.core.storage import Storage


def slice_warc(src, dest, urls: set[str]) -> int:
    """Copy the response records of ``urls`` from a real WARC file into a new one (test input)."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    n = 0
    with open(src, "rb") as f, open(dest, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response" and rec.rec_headers.get_header("WARC-Target-URI") in urls:
                writer.write_record(rec)
                n += 1
    return n


def stage_docs(storage: str, stage: str, run_id: str = "run1") -> list[dict]:
    out = Storage(storage).sub(run_id, stage)
    return [json.loads(line) for rel in out.list("data", suffix=".jsonl.gz")
            for line in gzip.decompress(out.read_bytes(rel)).splitlines()]


def test_mojibake_nfc_invisible_and_empty(tmp_path):
    docs = real_docs(100)
    clean = next(d for d in docs if any(ord(c) > 127 for c in d["text"]))  # e.g. curly quotes
    accented = next(d for d in docs if unicodedata.normalize("NFD", d["text"]) != d["text"])  # e.g. "é"
    plain = next(d for d in docs if d not in (clean, accented))
    docs = [clean, accented, plain]
    bad = [
        # UTF-8 bytes read as Windows-1252, the classic web mojibake ("We’d" -> "Weâ€™d")
        dict(clean, id="mojibake", text=clean["text"].encode("utf-8").decode("sloppy-windows-1252")),
        dict(accented, id="nfd", text=unicodedata.normalize("NFD", accented["text"])),
        dict(plain, id="invisible", text=plain["text"].replace(" ", "\u00a0", 5).replace(".", ".\u200b", 3)
             + "  \r\n\r\n\r\n\x07"),
        dict(plain, id="only-boilerplate", text="Skip to content\nPrevious topic\nNext topic\n|\n»\nShow Source"),
    ]
    storage = str(tmp_path)
    seed_stage(storage, "run1", "ingest", docs + bad)
    m = run_stage("normalize", load_tiny(tmp_path), storage, "run1")
    c = m["counts"]
    assert c["documents_in"] == 7 and c["documents_out"] == 6 and c["removed"] == {"empty": 1}
    assert c["changed"]["ftfy"] >= 1 and c["changed"]["nfc"] >= 1 and c["changed"]["whitespace"] >= 1
    assert c["lines_dropped"]["boilerplate"] >= 4 and c["lines_dropped"]["symbol_lines"] >= 1
    out = {d["id"]: d["text"] for d in stage_docs(storage, "normalize")}
    assert out["mojibake"] != bad[0]["text"] and out["mojibake"] == out[clean["id"]]  # ftfy repaired it
    assert out["nfd"] == out[accented["id"]] == unicodedata.normalize("NFC", out["nfd"])
    assert out["invisible"] == out[plain["id"]]
    assert "\u200b" not in out["invisible"] and "\u00a0" not in out["invisible"]


def test_boilerplate_of_real_sphinx_and_postgres_pages(tmp_path):
    """Real pages through ingest (trafilatura, which keeps the Sphinx sidebars), then normalize: the navigation
    lines go, the content stays."""
    urls = {"https://docs.python.org/3.11/faq/index.html", "https://docs.python.org/3.11/faq/windows.html"}
    assert slice_warc(CRAWL / "docs.python.org-0000.warc.gz", tmp_path / "py.warc.gz", urls) + \
        slice_warc(CRAWL / "docs.python.org-0001.warc.gz", tmp_path / "py2.warc.gz", urls) == 2
    pg = {"https://www.postgresql.org/docs/15/brin.html", "https://www.postgresql.org/docs/15/brin-intro.html"}
    assert slice_warc(CRAWL / "www.postgresql.org-0000.warc.gz", tmp_path / "pg.warc.gz", pg) == 2
    cfg = load_tiny(tmp_path, {"ingest.inputs": [str(tmp_path / "*.warc.gz")], "ingest.extract.extractor": "trafilatura"})
    storage = str(tmp_path / "st")
    run_stage("ingest", cfg, storage, "run1")
    before = {d["metadata"]["url"]: d["text"] for d in stage_docs(storage, "ingest")}
    m = run_stage("normalize", cfg, storage, "run1")
    after = {d["metadata"]["url"]: d["text"] for d in stage_docs(storage, "normalize")}
    assert m["counts"]["documents_out"] == 4 and m["counts"]["lines_dropped"]["boilerplate"] >= 10

    faq_in, faq = before["https://docs.python.org/3.11/faq/index.html"], after["https://docs.python.org/3.11/faq/index.html"]
    furniture = ["Previous topic", "Next topic", "This Page", "Show Source", "Report a Bug", "Navigation"]
    assert all(f"\n{x}\n" in faq_in for x in furniture)  # really in trafilatura's output ...
    lines = set(faq.splitlines())
    assert not lines & set(furniture + ["index", "modules", "|", "»"])  # ... and gone
    assert {"General Python FAQ", "Programming FAQ", "Python on Windows FAQ"} <= lines  # content kept
    assert "Python Frequently Asked Questions" in lines and "¶" not in faq
    brin = after["https://www.postgresql.org/docs/15/brin.html"].splitlines()
    assert not set(brin) & {"Prev", "Up", "Home", "Next", "Table of Contents"}
    assert "71.1. Introduction" in brin


def real_foreign_docs() -> list[dict]:
    """Main text of the real Common Crawl pages in warcfile.warc.gz (Chinese, Russian, German, Dutch...)."""
    from resiliparse.extract.html2text import extract_plain_text
    from warcio.archiveiterator import ArchiveIterator

    from stages.ingest.readers import decode_html, parse_content_type

    docs = []
    with open(CRAWL.parent / "warc" / "warcfile.warc.gz", "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type != "response":
                continue
            _, charset = parse_content_type(rec.http_headers.get_header("Content-Type"))
            html, _ = decode_html(rec.content_stream().read(), charset)
            text = extract_plain_text(html, main_content=True)
            url = rec.rec_headers.get_header("WARC-Target-URI")
            if len(text) > 500:
                docs.append({"text": text, "id": url, "metadata": {"url": url}})
    return docs


def test_language_and_score_on_every_document(tmp_path):
    english, foreign = real_docs(20), real_foreign_docs()
    urls = {d["id"]: d["id"] for d in foreign}
    storage = str(tmp_path)
    seed_stage(storage, "run1", "ingest", english + foreign)
    m = run_stage("normalize", load_tiny(tmp_path), storage, "run1")
    out = {d["id"]: d["metadata"] for d in stage_docs(storage, "normalize")}
    assert len(out) == m["counts"]["documents_out"] == len(english) + len(foreign)
    assert all(0 < md["language_score"] <= 1 for md in out.values())
    # the benchmark's pages are news articles, mostly English; the .kr/.br/.it ones are Korean/Portuguese/Italian
    by_tld = {".kr": "ko", ".br": "pt", ".it": "it"}
    for d in english:
        host = d["metadata"]["url"].split("/")[2]
        want = next((lang for tld, lang in by_tld.items() if host.endswith(tld)), "en")
        assert out[d["id"]]["language"] == want, (host, out[d["id"]])
    assert sum(out[d["id"]]["language"] == "en" and out[d["id"]]["language_score"] > 0.85 for d in english) >= 15
    assert out[urls["http://01spb.ru/company/"]]["language"] == "ru"
    assert out[urls["http://0513mt.com/index.php/art/detail/id/8884.html"]]["language"] == "zh"
    langs = m["counts"]["languages"]
    assert sum(langs.values()) == len(out) and langs["en"] >= 15 and langs["zh"] >= 3
    # switched off: no tags, no counts
    seed_stage(storage, "run2", "ingest", english[:3])
    m2 = run_stage("normalize", load_tiny(tmp_path, {"normalize.language_id": False}), storage, "run2")
    assert m2["counts"]["languages"] == {}
    assert all("language" not in d["metadata"] for d in stage_docs(storage, "normalize", "run2"))


def test_missing_language_model_is_one_clear_error(tmp_path, monkeypatch):
    import pytest

    from stages.core.lid import lid176_path
    from stages.core.runner import StageError

    seed_stage(str(tmp_path), "run1", "ingest", real_docs(2))
    monkeypatch.setenv("KILN_LID_MODEL", str(tmp_path / "nope.ftz"))
    lid176_path.cache_clear()
    try:
        with pytest.raises(StageError, match=r"normalize.language_id: KILN_LID_MODEL=.*nope.ftz is not a file"):
            run_stage("normalize", load_tiny(tmp_path), str(tmp_path), "run1")
    finally:
        monkeypatch.delenv("KILN_LID_MODEL")
        lid176_path.cache_clear()
