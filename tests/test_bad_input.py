"""The bad-input catalogue, walked through the real stages. Every bad file is made here (in tmp_path) from real
files of ../shared/data; each case gives a clear error naming the file / record / key, or a counted skip, and the
good records of the same file are kept: the documents out are compared with the clean file's documents.

Already covered elsewhere (not repeated): JSONL bad-line shapes and Parquet null/blank texts (test_ingest
test_jsonl_and_parquet_document_sets), random garbage files (test_many_kinds_of_garbage_never_crash_the_run),
unknown config keys / wrong types / bad YAML (test_config), eval-set JSONL lines that are not JSON (test_evaluate
test_plain_text_formats_and_jsonl).
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import uuid

import pytest

from conftest import CRAWL, SHARED, load_tiny, seed_stage
from stages.core.config import ConfigError
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage

SMALL_CRAWL = CRAWL / "docs.python.org-0002.warc.gz"  # warcinfo + 9 real pages, one gzip member per record
JSONL = SHARED / "jsonl" / "cc_en_head-0091.jsonl.gz"  # 10 real cc_net documents
FAST = {"run.workers": 1, "run.tasks": 1}


# ---------------------------------------------------------------------------------------------------------
# helpers: the real crawl file as records, records made from its pages

def members(path) -> list[bytes]:
    """The records of a per-record-gzip WARC, uncompressed, one per gzip member."""
    import zlib

    raw, out = path.read_bytes(), []
    while raw:
        d = zlib.decompressobj(31)
        out.append(d.decompress(raw))
        raw = d.unused_data
    return out


RECORDS = members(SMALL_CRAWL)
RECORD_IDS = [re.search(rb"WARC-Record-ID: (<[^>]+>)", r).group(1).decode() for r in RECORDS]


def gz(records: list[bytes]) -> bytes:
    return b"".join(gzip.compress(r, 6, mtime=0) for r in records)


@functools.lru_cache(maxsize=1)
def page_50mb() -> bytes:
    """A 50 MB page on one line: the words of a real page, repeated."""
    line = b" ".join(body(1).split())
    return b"<html><body><p>" + line * (50_000_000 // len(line)) + b"</p></body></html>"


@functools.lru_cache(maxsize=1)
def warc_50mb() -> bytes:
    return gz([*RECORDS[:2], response(page_50mb()), *RECORDS[2:]])


def body(i: int) -> bytes:
    """The HTTP body (the HTML page) of record i."""
    return RECORDS[i].split(b"\r\n\r\n", 2)[2].removesuffix(b"\r\n\r\n")


def response(body_: bytes, status: str = "200 OK", ctype: str = "text/html; charset=utf-8",
             uri: str = "https://docs.python.org/3.11/bad.html") -> bytes:
    http = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body_)}\r\n\r\n").encode() + body_
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Date: 2026-11-01T00:00:00Z\r\n"
            f"WARC-Record-ID: <urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, uri + status)}>\r\nWARC-Target-URI: {uri}\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n").encode()
    return head + http + b"\r\n\r\n"


def replace(i: int, old: bytes, new: bytes) -> list[bytes]:
    assert old in RECORDS[i]
    return [r.replace(old, new, 1) if j == i else r for j, r in enumerate(RECORDS)]


def content_length(i: int, delta: int) -> list[bytes]:
    """Record i with its WARC Content-Length off by ``delta``."""
    rec = re.sub(rb"Content-Length: (\d+)", lambda m: b"Content-Length: %d" % (int(m[1]) + delta), RECORDS[i], 1)
    return [rec if j == i else r for j, r in enumerate(RECORDS)]


def flip_bit(data: bytes, member: int) -> bytes:
    """One bit flipped in the middle of the compressed bytes of gzip member ``member``."""
    import zlib

    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        pos = len(data) - len(d.unused_data)
    mid = (starts[member] + starts[member + 1]) // 2
    return data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1:]


def ingest(tmp_path, files: dict[str, bytes], **over) -> tuple[dict, dict[str, dict]]:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    m = run_stage("ingest", load_tiny(None, {"ingest.inputs": [str(src)], **FAST, **over}), str(tmp_path / "st"), "r")
    out = Storage(str(tmp_path / "st")).sub("r", "ingest")
    docs = [json.loads(line) for rel in out.list("data", suffix=".jsonl.gz")
            for line in gzip.decompress(out.read_bytes(rel)).splitlines()]
    return m["counts"], {d["id"]: d for d in docs}


def log_text(tmp_path, stage: str = "ingest") -> str:
    out = Storage(str(tmp_path / "st")).sub("r", stage)
    return "".join(gzip.decompress(out.read_bytes(p)).decode() if p.endswith(".gz") else out.read_bytes(p).decode()
                   for p in out.list("logs", suffix=""))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The clean crawl file through ingest: counts and documents by id (the reference of every WARC case)."""
    return ingest(tmp_path_factory.mktemp("clean"), {"good.warc.gz": SMALL_CRAWL.read_bytes()})


def _cp1252(i: int, declare: bool) -> bytes:
    page = body(i).decode("utf-8").encode("cp1252", "xmlcharrefreplace")
    return response(page if declare else page.replace(b'charset="utf-8"', b""),
                    ctype="text/html; charset=windows-1252" if declare else "text/html")


def _mixed(i: int) -> bytes:
    """Page i (UTF-8, with curly quotes and accents) with a latin-1 snippet spliced in after its first <p>."""
    page = body(i)
    p = page.index(b"<p>") + 3
    return response(page[:p] + "caf\xe9 na\xefve ".encode("latin-1") + page[p:])


# ---------------------------------------------------------------------------------------------------------
# WARC catalogue: (file, records of the clean file lost, removed-reason deltas, corrupt files, pages added)
# "added": inserted records that are good pages in another form (their text must equal the clean page's text)

CUT = sum(len(gzip.compress(r, 6, mtime=0)) for r in RECORDS[:5]) + 20_000  # inside record 5 (gzip member 5)

WARC_CASES = {
    "truncated_gzip": (lambda: gz(RECORDS)[:CUT], {5, 6, 7, 8, 9}, {"corrupt_record": 1}, 1, {}),
    "flipped_bit_in_a_gzip_member": (lambda: flip_bit(gz(RECORDS), 3), {3}, {"corrupt_record": 1}, 1, {}),
    "malformed_version_line": (lambda: replace(3, b"WARC/1.0\r\n", b"WARX/9.Z\r\n"), {3}, {"corrupt_record": 1}, 1, {}),
    "missing_content_length": (lambda: replace(3, b"Content-Length: ", b"Content-Length "), {3}, {"corrupt_record": 1},
                               1, {}),
    "plain_record_between_gzip_members": (lambda: gz(RECORDS[:4]) + RECORDS[4] + gz(RECORDS[4:]), set(), {}, 1, {}),
    "header_line_without_colon": (lambda: replace(3, b"WARC-Type: response", b"WARC-Type response"), {3},
                                  {"non_response": 1}, 0, {}),
    "content_length_too_long": (lambda: content_length(3, 100), {3}, {"corrupt_record": 1}, 1, {}),
    "content_length_too_short": (lambda: content_length(3, -100), {3}, {"corrupt_record": 1}, 1, {}),
    "http_404_and_301": (lambda: gz([*RECORDS[:4], response(body(2), "404 Not Found"),
                                     response(b"", "301 Moved Permanently"), *RECORDS[4:]]),
                         set(), {"non_200": 2}, 0, {}),
    "binary_payload_labelled_html": (lambda: gz([*RECORDS, response((SHARED / "warc" / "cc.warc.gz").read_bytes())]),
                                     set(), {"undecodable": 1}, 0, {}),
    "page_50mb_single_line": (warc_50mb, set(), {"too_large": 1}, 0, {}),
    "cp1252_declared": (lambda: gz([*RECORDS, _cp1252(1, declare=True)]), set(), {}, 0, {"windows-1252": 1}),
    "cp1252_undeclared": (lambda: gz([*RECORDS, _cp1252(1, declare=False)]), set(), {}, 0, {"undeclared": 1}),
    "mixed_encodings": (lambda: gz([*RECORDS, _mixed(1)]), set(), {}, 0, {"utf-8 + latin-1": 1}),
    "zero_length_files": (lambda: gz(RECORDS), set(), {}, 0, {}),  # + empty .warc.gz, .jsonl and .parquet
}


# record-level damage also in an uncompressed WARC (resumes at the next 'WARC/1.0' line)
PLAIN = ["malformed_version_line", "missing_content_length", "header_line_without_colon", "content_length_too_long",
         "content_length_too_short"]


@pytest.mark.parametrize("case,name", [(c, "bad.warc.gz") for c in WARC_CASES] + [(c, "bad.warc") for c in PLAIN])
def test_bad_warc_keeps_exactly_the_good_records(tmp_path, clean, case, name):
    make, lost, delta, corrupt_files, added = WARC_CASES[case]
    ref_counts, ref = clean
    data = make()
    if isinstance(data, list):  # records: one gzip member each, or uncompressed
        data = gz(data) if name.endswith(".gz") else b"".join(data)
    files = {name: data}
    if case == "zero_length_files":
        files |= {"empty.warc.gz": b"", "empty.jsonl": b"", "empty.parquet": b""}
    c, docs = ingest(tmp_path, files)
    lost_ids = {RECORD_IDS[i] for i in lost}
    kept = {k: v for k, v in ref.items() if k not in lost_ids}
    assert {k: docs[k]["text"] for k in kept} == {k: v["text"] for k, v in kept.items()}  # every good page, same
    extra = [d for k, d in docs.items() if k not in ref]
    assert len(extra) == sum(added.values())
    for d in extra:  # a page in another encoding gives the same text as the clean page
        text = d["text"].replace("caf\ufffd na\ufffdve ", "") if case == "mixed_encodings" else d["text"]
        assert text == ref[RECORD_IDS[1]]["text"], d["metadata"]["charset"]  # mixed: UTF-8 kept, 2 bytes U+FFFD
    want = {r: ref_counts["removed"].get(r, 0) + delta.get(r, 0) for r in set(ref_counts["removed"]) | set(delta)}
    assert c["removed"] == {**{r: 0 for r in c["removed"]}, **want}  # the damage, under its reason, nothing else
    assert c["documents_in"] == c["documents_out"] + sum(c["removed"].values())
    assert c["files_skipped"]["corrupt"] == corrupt_files
    if case == "zero_length_files":
        assert c["files_skipped"] == {"corrupt": 0, "empty": 3, "unreadable": 0} and c["files_in"] == 4
    logs = log_text(tmp_path)
    if corrupt_files:  # one line naming the file and the damaged record
        (line,) = [ln for ln in logs.splitlines() if name in ln and "corrupt" in ln]
        n = delta.get("corrupt_record", 0)
        assert "corrupt file" in line and f" {n} damaged records skipped" in line and re.search(r"record \d+", line)
    if case == "page_50mb_single_line":  # skipped by its declared length: never read whole, never extracted
        assert c["documents_out"] == ref_counts["documents_out"]


def test_50mb_single_line_is_streamed_past(tmp_path):
    """The 50 MB one-line page (WARC) and a 50 MB JSONL line: counted too_large with memory far below their size
    (the WARC record is skipped by its declared length and drained in 1 MB reads; the JSONL line is dropped as it
    streams by). Measured (tracemalloc): peak 6.1 MB for the WARC (its largest real page, decoded: 2.9 MB with the
    big record alone), 11.5 MB for the JSONL (the 10 MB cap + a chunk); reading 0.33 s and 0.63 s."""
    import tracemalloc

    from stages.ingest.readers import _reader_cls

    (tmp_path / "big.warc.gz").write_bytes(warc_50mb())
    lines = gzip.decompress(JSONL.read_bytes()).splitlines()
    big_line = json.dumps({"text": page_50mb().decode(), "id": "big"}).encode()
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(b"\n".join([lines[0], big_line, lines[1]]), 1))
    for name, n_good in (("big.warc.gz", 9), ("big.jsonl.gz", 2)):
        block = _reader_cls()([[str(tmp_path / name)]], 10_000_000)
        tracemalloc.start()
        try:
            docs = list(block.run())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(docs) == n_good and block.stats["skip_too_large"].total == 1
        assert peak < 13_000_000, (name, peak)  # a quarter of the line; max_record_bytes + buffers


# ---------------------------------------------------------------------------------------------------------
# JSONL / Parquet document sets


def _jsonl_lines() -> list[bytes]:
    return gzip.decompress(JSONL.read_bytes()).splitlines()


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


DOC_CASES = {  # name -> (files besides the clean JSONL, removed deltas, corrupt files, log fragment)
    "jsonl_line_not_json": (lambda ls: {"docs.jsonl": b"\n".join([*ls[:3], b'{"text": "cut', *ls[3:]])},
                            {"bad_line": 1}, 0, None),
    "jsonl_mixed_encodings": (lambda ls: {"docs.jsonl": b"\n".join([*ls[:3], b'{"text": "caf\xe9 latin-1"}', *ls[3:]])},
                              {"bad_line": 1}, 0, None),
    "parquet_wrong_schema": (lambda ls: {"docs.jsonl": b"\n".join(ls),
                                         "other.parquet": _parquet([{"content": json.loads(x)["text"]} for x in ls])},
                             {}, 1, "no column 'text' (columns: content); set ingest.text_field"),
    "parquet_text_not_strings": (lambda ls: {"docs.jsonl": b"\n".join(ls),
                                             "ints.parquet": _parquet([{"text": i} for i in range(5)])},
                                 {}, 1, "column 'text' holds int64, not strings"),
}


@pytest.mark.parametrize("case", list(DOC_CASES))
def test_bad_document_sets_keep_the_good_rows(tmp_path, case):
    make, delta, corrupt_files, fragment = DOC_CASES[case]
    ls = _jsonl_lines()
    c, docs = ingest(tmp_path, make(ls))
    ref = {json.loads(x)["id"]: json.loads(x)["text"] for x in ls}
    assert {k: d["text"] for k, d in docs.items()} == ref  # every good row, nothing else
    assert {k: v for k, v in c["removed"].items() if v} == delta
    assert c["files_skipped"]["corrupt"] == corrupt_files
    if fragment:
        (line,) = [ln for ln in log_text(tmp_path).splitlines() if "corrupt file" in ln]
        assert fragment in line and ".parquet" in line


# ---------------------------------------------------------------------------------------------------------
# Kiln's own intermediate files (upstream outputs), eval sets, shard Parquet


def _seeded_ingest(tmp_path, n: int = 12) -> tuple[str, list[dict]]:
    from conftest import real_docs

    docs = real_docs(n)
    seed_stage(str(tmp_path), "r", "ingest", docs)
    return str(tmp_path), docs


def _damage_line(data: Storage, rel: str, i: int, junk: bytes) -> None:
    lines = gzip.decompress(data.read_bytes(rel)).splitlines()
    lines[i] = junk
    data.write_bytes(rel, gzip.compress(b"\n".join(lines) + b"\n"))


@pytest.mark.parametrize("damage", [b"not json {", b'{"text": "\xff\xfe not utf-8", "id": "x"}'])
def test_damaged_upstream_output_is_one_clear_error(tmp_path, damage):
    """A line of an upstream stage's data file replaced by junk (after its manifest was written): datatrove's reader
    would drop it with a log line; the stage fails naming the upstream stage and its data folder instead."""
    storage, docs = _seeded_ingest(tmp_path)
    _damage_line(Storage(storage).sub("r", "ingest"), "data/00000.jsonl.gz", 5, damage)
    cfg = load_tiny(None, {**FAST, "normalize.language_id": False})
    with pytest.raises(StageError, match=r"^normalize: read \d+ documents of the 12 that the ingest manifest counts "
                                         r"in .*/r/ingest/data: .*damaged.*kiln stage ingest --force"):
        run_stage("normalize", cfg, storage, "r")


def test_damaged_upstream_output_fails_dedup_tokenizer_and_shard_too(tmp_path):
    """The same count check in every stage that reads a whole upstream stage: dedup (normalize's files, before
    anything reaches the cross-snapshot index), tokenizer and shard (reweight's files; shard has its own reader)."""
    from conftest import real_docs
    from test_reweight import mixed_docs

    storage = str(tmp_path)
    cfg = load_tiny(tmp_path, {**FAST, "dedup.index": None, "tokenizer.vocab_size": 1024})
    seed_stage(storage, "d", "normalize", real_docs(12))
    _damage_line(Storage(storage).sub("d", "normalize"), "data/00000.jsonl.gz", 3, b"not json {")
    with pytest.raises(StageError, match=r"^dedup: read 11 documents of the 12 that the normalize manifest counts "
                                         r"in .*/d/normalize/data: .*kiln stage normalize --force"):
        run_stage("dedup", cfg, storage, "d")

    docs = mixed_docs(20, 20, 5)
    seed_stage(storage, "t", "reweight", docs)
    run_stage("tokenizer", cfg, storage, "t")  # on the intact files
    _damage_line(Storage(storage).sub("t", "reweight"), "data/00000.jsonl.gz", 7, b'{"text": "cut')
    want = rf"read {len(docs) - 1} documents of the {len(docs)} that the reweight manifest counts in .*/t/reweight/data"
    with pytest.raises(StageError, match=rf"^shard: {want}"):
        run_stage("shard", cfg, storage, "t")
    with pytest.raises(StageError, match=rf"^tokenizer: {want}"):
        run_stage("tokenizer", cfg, storage, "t", force=True)


def test_eval_sets_bad_files_are_clear_errors(tmp_path):
    """Zero-length, non-UTF-8 and truncated-gzip eval files: one StageError naming the set and the file."""
    from stages.evaluate import EvalSet, load_set

    wiki = (SHARED / "eval" / "wikitext-2" / "valid.txt").read_bytes()
    cases = {"empty.txt": (b"", r"no documents"),
             "latin1.txt": (wiki[:20_000] + "caf\xe9".encode("latin-1") + wiki[20_000:40_000],
                            r"cannot read .*latin1.txt \('utf-8' codec can't decode byte 0xe9 in position 20003"),
             "cut.txt.gz": (gzip.compress(wiki)[:30_000], r"cannot read .*cut.txt.gz \(Compressed file ended"),
             "only-bad-lines.jsonl": (b"not json\n[1]\n", r"no documents \(2 lines skipped\)")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        fmt = "jsonl" if name.endswith(".jsonl") else "lines"
        with pytest.raises(StageError, match=rf"^evaluate: eval set '{name}' at .*{name}.*{msg}"):
            load_set(EvalSet(name=name, path=str(tmp_path / name), format=fmt), str(tmp_path / name))


def test_shard_parquet_wrong_schema_is_a_clear_error(tmp_path):
    """evaluate reads the shard stage's held-out Parquet texts: a file without a 'text' column (or not Parquet)
    is one StageError naming it."""
    from stages.evaluate import _read_parquet_texts

    st = Storage(str(tmp_path))
    texts = [json.loads(x)["text"] for x in _jsonl_lines()]
    st.write_bytes("val/good.parquet", _parquet([{"text": t} for t in texts]))
    assert _read_parquet_texts(st, ["val/good.parquet"]) == texts
    st.write_bytes("val/bad.parquet", _parquet([{"content": t} for t in texts]))
    st.write_bytes("val/junk.parquet", JSONL.read_bytes())
    for rel in ("val/bad.parquet", "val/junk.parquet"):
        with pytest.raises(StageError, match=rf"^evaluate: cannot read validation texts .*{rel} \("):
            _read_parquet_texts(st, ["val/good.parquet", rel])


# ---------------------------------------------------------------------------------------------------------
# configs: impossible values (unknown keys and wrong types: test_config)

@pytest.mark.parametrize("key,value,msg", [
    ("ingest.max_record_bytes", 0, "greater than or equal to 1"),
    ("normalize.min_chars", -1, "greater than or equal to 0"),
    ("filter.quality.top_percent", 150, "less than or equal to 100"),
    ("filter.language.min_score", 2, "less than or equal to 1"),
    ("reweight.weights", {"docs.python.org": -1}, "greater than or equal to 0"),
    ("reweight.quality_edges", [0.5, 0.2], "strictly increasing"),
    ("tokenizer.vocab_size", 10, "greater than or equal to 64"),
    ("tokenizer.heldout_fraction", 1.0, "less than 0.5"),
    ("evaluate.batch_size", 0, "greater than or equal to 1"),
    ("ingest.common_crawl", {"crawl": "CC-MAIN-2024-22", "segments": [3, 1]}, "0 <= start < stop"),
    ("filter.pii.emails", "maybe", "valid boolean"),
    ("normalize.nfc", {"deep": {"unknown": 1}}, "valid boolean"),
])
def test_impossible_config_values_name_the_key(key, value, msg):
    with pytest.raises(ConfigError, match=rf"tiny.yaml: {re.escape(key)}[.: ].*{msg}") as e:
        load_tiny(None, {key: value})
    assert "\n" not in str(e.value)


def test_vocabulary_larger_than_the_corpus_is_one_clear_error(tmp_path):
    """A real but tiny corpus (3 documents) and tokenizer.vocab_size 32000: sentencepiece cannot fill the
    vocabulary; the error names the key and the corpus size, and says what the maximum is."""
    from conftest import real_docs

    docs = real_docs(3)
    seed_stage(str(tmp_path), "r", "reweight", docs)
    cfg = load_tiny(None, {**FAST, "tokenizer.vocab_size": 32000})
    with pytest.raises(StageError, match=r"^tokenizer: sentencepiece training failed on \d documents \(\d+ bytes; "
                                         r"tokenizer.vocab_size=32000\): .*Vocabulary size too high.*<= \d+") as e:
        run_stage("tokenizer", cfg, str(tmp_path), "r")
    assert "\n" not in str(e.value)
