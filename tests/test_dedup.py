"""dedup on real documents: exact/URL rules, verified near duplicates of the crawl (Django release notes),
LSH false positives rejected by verification, keep rules, the duplicates report, and the cross-snapshot index
(two nightly snapshots, re-runs, a crash before the commit, S3)."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest

from conftest import CRAWL, load_tiny, real_docs, seed_stage
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.dedup.index import INDEX_JSON, DedupIndex
from stages.dedup.minhash import MinHasher, jaccard
from test_normalize import slice_warc, stage_docs

REL = "https://docs.djangoproject.com/en/3.2/releases/"
# Django security releases published together: near duplicates on word 5-grams (true Jaccard of the
# resiliparse text: 1.4.13~1.5.8 0.91, 1.8.16~1.9.11 0.90, 1.11.23~2.1.11 0.89, 2.2.26~3.2.11 0.84) and
# near misses below 0.8 (2.2.24~3.1.12 0.78, 1.6.5~1.4.13/1.5.8 0.74); major releases are distinct
NEAR = {"0000": ["1.4.13", "1.5.8", "1.6.5", "1.8.16", "1.9.11", "1.11.23", "2.1.11", "2.2.26", "2.2.24"],
        "0001": ["3.2.11", "3.1.12"]}
OTHERS = {"0000": ["1.0", "2.0"], "0001": ["3.1", "3.2"]}
FAST = {"run.tasks": 2, "run.workers": 1}  # two tasks one after the other in this process: cross-task, fast


def version(doc) -> str:
    return doc["metadata"]["url"].removeprefix(REL).removesuffix(".html")


@pytest.fixture(scope="module")
def django(tmp_path_factory) -> dict[str, dict]:
    """Real release-note pages of the crawl, through ingest and normalize: {version: document}."""
    tmp = tmp_path_factory.mktemp("django")
    for part in NEAR:
        urls = {f"{REL}{v}.html" for v in NEAR[part] + OTHERS[part]}
        assert slice_warc(CRAWL / f"docs.djangoproject.com-{part}.warc.gz", tmp / f"dj{part}.warc.gz", urls) == len(urls)
    cfg = load_tiny(tmp, {"ingest.inputs": [str(tmp / "*.warc.gz")], **FAST})
    for stage in ("ingest", "normalize"):
        run_stage(stage, cfg, str(tmp / "st"), "run1")
    return {version(d): d for d in stage_docs(str(tmp / "st"), "normalize")}


def run_dedup(storage, docs: list[dict], overrides: dict | None = None, run_id: str = "run1",
              second_file: list[dict] | None = None, force: bool = False) -> tuple[dict, list[dict], list[dict]]:
    """Seed normalize with ``docs`` (and a second file), run dedup; returns (counts, kept docs, duplicates)."""
    extra = {"data/00001.jsonl.gz": gzip.compress("".join(json.dumps(d) + "\n" for d in second_file).encode())} \
        if second_file else None
    seed_stage(str(storage), run_id, "normalize", docs, extra_files=extra)
    cfg = load_tiny(None, {**FAST, "dedup.index": None, **(overrides or {})})
    m = run_stage("dedup", cfg, str(storage), run_id, force=force)
    out = Storage(str(storage)).sub(run_id, "dedup")
    dups = [json.loads(x) for x in gzip.decompress(out.read_bytes("duplicates.jsonl.gz")).splitlines()]
    assert "duplicates.jsonl.gz" in {o["path"] for o in m["outputs"]}
    return m["counts"], stage_docs(str(storage), "dedup", run_id), dups


def dated(doc: dict, date: str, **changes) -> dict:
    meta = changes.pop("metadata", doc["metadata"])
    return {**doc, **changes, "metadata": {**meta, "date": date}}


def test_exact_and_url_rules_first_by_crawl_date(tmp_path):
    docs = [dated(d, "2026-11-02T00:00:00Z") for d in real_docs(26)]
    a, b, spare = docs[:12], docs[12:24], docs[24]
    twin = dict(a[3], id="twin", text=a[3]["text"].replace(" ", "  ", 3) + "\n",  # same text, other whitespace
                metadata={**a[3]["metadata"], "url": "https://mirror.example/copy"})
    # same URL as a[5], other text, crawled a day earlier but read later: the URL rule keeps it, not a[5]
    recrawl = dated(spare, "2026-11-01T00:00:00Z", id="recrawl")
    recrawl["metadata"]["url"] = a[5]["metadata"]["url"]
    counts, kept, dups = run_dedup(tmp_path, a, second_file=b + [twin, recrawl])
    assert counts["documents_in"] == 26 and counts["removed"] == {"exact": 1, "url": 1, "near": 0}
    ids = {d["id"] for d in kept}
    assert "twin" not in ids and a[3]["id"] in ids  # the first copy (first file) survives
    assert "recrawl" in ids and a[5]["id"] not in ids
    by_id = {r["id"]: r for r in dups}
    assert by_id["twin"]["reason"] == "exact" and by_id["twin"]["matched_id"] == a[3]["id"]
    assert by_id[a[5]["id"]]["reason"] == "url" and by_id[a[5]["id"]]["matched_id"] == "recrawl"
    assert by_id[a[5]["id"]]["matched_snapshot"] == "run1" and by_id["twin"]["jaccard"] is None

    counts, kept, _ = run_dedup(tmp_path / "off", a, {"dedup.url": False, "dedup.exact": False}, second_file=[twin, recrawl])
    assert counts["removed"] == {"exact": 0, "url": 0, "near": 1}  # the twin is still a (J = 1) near duplicate


def test_real_near_duplicates_found_verified_and_reported(tmp_path, django):
    docs = list(django.values())
    counts, kept, dups = run_dedup(tmp_path, docs[::2], second_file=docs[1::2])  # pairs split over 2 tasks
    mh = MinHasher()
    sets = {v: mh.shingles(d["text"]) for v, d in django.items()}
    truth = {frozenset(p) for p in itertools.combinations(sets, 2) if jaccard(sets[p[0]], sets[p[1]]) >= 0.8}
    pairs = {frozenset(p) for p in (("1.4.13", "1.5.8"), ("1.8.16", "1.9.11"), ("1.11.23", "2.1.11"),
                                    ("2.2.26", "3.2.11"))}
    assert truth == pairs
    assert counts["near"]["clusters"] == 4 and counts["removed"] == {"exact": 0, "url": 0, "near": 4}
    assert counts["near"]["verified_pairs"] == 4 and counts["near"]["rejected_candidates"] >= 1  # 2.2.24~3.1.12
    assert counts["near"]["candidate_pairs"] == counts["near"]["verified_pairs"] + counts["near"]["rejected_candidates"]
    kept_v = {version(d) for d in kept}
    assert set(OTHERS["0000"] + OTHERS["0001"]) | {"2.2.24", "3.1.12", "1.6.5"} <= kept_v  # distinct, near misses
    assert {"1.4.13", "1.11.23"} <= kept_v  # keep: longest (2,017 vs 2,014 and 2,161 vs 2,158 characters)
    assert all(len(kept_v & p) == 1 for p in pairs)
    by_url = {r["url"].removeprefix(REL).removesuffix(".html"): r for r in dups}
    assert set(by_url) == set(django) - kept_v
    for v, r in by_url.items():  # every removed document names a kept one and their true Jaccard
        m = r["matched_url"].removeprefix(REL).removesuffix(".html")
        assert r["reason"] == "near" and m in kept_v and r["matched_id"] == django[m]["id"]
        assert r["jaccard"] == round(jaccard(sets[v], sets[m]), 4) >= 0.8 and r["matched_snapshot"] == "run1"
    assert len({r["cluster"] for r in dups}) == 4


def test_lsh_false_positives_are_rejected_by_verification(tmp_path, django):
    """200 bands of 1 row: pairs sharing a single MinHash value become candidates (these release
    notes share some boilerplate); only the true J >= 0.8 pairs may survive verification."""
    docs = list(django.values())
    base, _, _ = run_dedup(tmp_path / "default", docs)
    counts, kept, _ = run_dedup(tmp_path / "wide", docs, {"dedup.bands": 200, "dedup.rows": 1})
    near = counts["near"]
    assert near["rejected_candidates"] > 2 * near["verified_pairs"] > 0
    assert near["verified_pairs"] == base["near"]["verified_pairs"] and counts["removed"] == base["removed"]
    # a strict threshold turns verified pairs into rejected ones (1.4.13/1.5.8/1.6.5 are J ~ 0.9)
    strict, _, _ = run_dedup(tmp_path / "strict", docs, {"dedup.threshold": 0.99})
    assert strict["removed"]["near"] == 0 and strict["near"]["rejected_candidates"] == base["near"]["candidate_pairs"]


def test_chain_cluster_reports_verified_pairs_only(tmp_path):
    """A~B and B~C at J >= 0.8 but A~C below: one cluster, A kept (first); C is reported against B (its
    verified partner), not against A, and every reported pair is a verified one; kept_id names A."""
    words = max((d["text"].split() for d in real_docs(200)), key=len)
    assert len(words) >= 1200
    docs = [dated({"id": name, "text": " ".join(words[k:k + 1000]),
                   "metadata": {"url": f"https://chain.example/{name}", "domain": "chain.example"}},
                  f"2026-11-0{k // 60 + 1}T00:00:00Z") for name, k in (("A", 0), ("B", 60), ("C", 120))]
    sets = {d["id"]: MinHasher().shingles(d["text"]) for d in docs}
    assert jaccard(sets["A"], sets["B"]) >= 0.8 and jaccard(sets["B"], sets["C"]) >= 0.8 > jaccard(sets["A"], sets["C"])
    counts, kept, dups = run_dedup(tmp_path, docs, {"dedup.keep": "first"})
    assert [d["id"] for d in kept] == ["A"] and counts["near"]["clusters"] == 1
    assert counts["near"]["verified_pairs"] == 2
    by_id = {r["id"]: r for r in dups}
    assert (by_id["B"]["matched_id"], by_id["C"]["matched_id"]) == ("A", "B")
    assert by_id["B"]["kept_id"] == by_id["C"]["kept_id"] == "A"
    for r in dups:
        assert r["jaccard"] == round(jaccard(sets[r["id"]], sets[r["matched_id"]]), 4) >= 0.8


def test_keep_rules_first_and_quality(tmp_path, django):
    trio = [django[v] for v in ("1.6.5", "1.4.13", "1.5.8")]  # one cluster at J >= 0.7; 1.6.5 is the longest
    first = [dated(trio[0], "2026-11-03"), dated(trio[1], "2026-11-01"), dated(trio[2], "2026-11-02")]
    _, kept, dups = run_dedup(tmp_path / "first", first, {"dedup.keep": "first", "dedup.threshold": 0.7})
    assert [version(d) for d in kept] == ["1.4.13"]  # earliest crawl date
    assert {r["matched_id"] for r in dups} == {django["1.4.13"]["id"]}
    scored = [dated(d, "2026-11-01", metadata={**d["metadata"], "quality_score": q})
              for d, q in zip(trio, (0.2, 0.5, 0.9))]
    _, kept, _ = run_dedup(tmp_path / "quality", scored, {"dedup.keep": "quality", "dedup.threshold": 0.7})
    assert [version(d) for d in kept] == ["1.5.8"]  # highest quality_score, though the shortest
    _, kept, _ = run_dedup(tmp_path / "longest", scored, {"dedup.threshold": 0.7})
    assert [version(d) for d in kept] == ["1.6.5"]


def nightly(storage, docs, run_id: str, **kw):
    """A nightly run: its own run id (= snapshot) over the shared index under the storage root."""
    return run_dedup(storage, docs, {"dedup.index": "index/dedup"}, run_id=run_id, **kw)


def two_nights(django) -> tuple[list[dict], list[dict]]:
    night1 = [django[v] for v in ("1.0", "2.0", "2.2.26", "1.4.13", "3.1")]
    night2 = [dict(django["1.0"], id="night2-copy"),  # exact copy of a night-1 page
              dict(django["3.2"], id="night2-moved", metadata={**django["3.2"]["metadata"],  # a URL seen before
                                                               "url": django["2.0"]["metadata"]["url"]}),
              django["3.2.11"], django["1.5.8"],  # near copies of night-1 pages
              django["1.8.16"], django["1.9.11"]]  # a new pair within night 2
    return night1, night2


def test_two_nightly_snapshots_dedup_against_each_other(tmp_path, django):
    night1, night2 = two_nights(django)
    c1, kept1, _ = nightly(tmp_path, night1, "night1")
    assert c1["documents_out"] == 5 and c1["index"]["added_documents"] == 5 and c1["index"]["segments_read"] == 0
    c2, kept2, dups = nightly(tmp_path, night2, "night2")
    assert c2["removed"] == {"exact": 1, "url": 1, "near": 3}  # 3.2.11, 1.5.8 vs night 1; one of the pair
    assert c2["index"]["prior_documents"] == 5 and c2["index"]["near"] == 2
    assert {"exact": 1, "url": 1} == {k: c2["index"][k] for k in ("exact", "url")}
    assert c2["index"]["shingle_sets_fetched"] < 5  # only candidates' night-1 sets were read back
    by_id = {r["id"]: r for r in dups}
    for rid, reason, match in [("night2-copy", "exact", "1.0"), ("night2-moved", "url", "2.0"),
                               (django["3.2.11"]["id"], "near", "2.2.26"), (django["1.5.8"]["id"], "near", "1.4.13")]:
        r = by_id[rid]
        assert (r["reason"], r["matched_id"], r["matched_snapshot"]) == (reason, django[match]["id"], "night1")
    mh = MinHasher()
    assert by_id[django["3.2.11"]["id"]]["jaccard"] == round(
        jaccard(mh.shingles(django["3.2.11"]["text"]), mh.shingles(django["2.2.26"]["text"])), 4)
    assert {version(d) for d in kept2} == {"1.8.16"}  # same length as 1.9.11: input order decides

    # re-running night 2 replaces its segment: it does not dedup against itself
    c2b, kept2b, _ = nightly(tmp_path, night2, "night2", force=True)
    assert c2b["removed"] == c2["removed"] and c2b["index"]["replaced_segment"] and c2b["index"]["segments_read"] == 1
    index = Storage(str(tmp_path)).sub("index", "dedup")
    state = index.read_json(INDEX_JSON)
    assert [s["snapshot"] for s in state["segments"]] == ["night1", "night2"]
    assert sorted(index.list("segments", suffix="arrays.npz")) == sorted(
        f"{s['path']}/arrays.npz" for s in state["segments"])  # the replaced segment is gone

    # a third night sees both earlier snapshots
    c3, _, dups3 = nightly(tmp_path, [dict(kept2[0], id="n3"), django["3.2"]], "night3")
    assert c3["removed"] == {"exact": 1, "url": 0, "near": 0} and c3["index"]["segments_read"] == 2
    assert (dups3[0]["matched_id"], dups3[0]["matched_snapshot"]) == (kept2[0]["id"], "night2")


def test_index_crash_before_commit_leaves_previous_index(tmp_path, django, monkeypatch):
    night1, night2 = two_nights(django)
    nightly(tmp_path, night1, "night1")
    index = Storage(str(tmp_path)).sub("index", "dedup")
    before = index.read_bytes(INDEX_JSON)

    def crash(self, *a, **kw):
        raise StageError("simulated crash after the segment files were written")

    monkeypatch.setattr(DedupIndex, "commit", crash)
    with pytest.raises(StageError, match="simulated crash"):
        nightly(tmp_path, night2, "night2")
    monkeypatch.undo()
    assert index.read_bytes(INDEX_JSON) == before  # still the night-1 index
    assert sum(1 for p in index.list("segments") if p.endswith("arrays.npz")) == 2  # + the orphaned segment
    # the next run uses the previous index (night 1 only) and commits normally
    c2, _, _ = nightly(tmp_path, night2, "night2")
    assert c2["index"]["segments_read"] == 1 and c2["removed"] == {"exact": 1, "url": 1, "near": 3}
    assert [s["snapshot"] for s in index.read_json(INDEX_JSON)["segments"]] == ["night1", "night2"]


def test_index_settings_must_match(tmp_path, django):
    nightly(tmp_path, [django["1.0"], django["2.0"]], "night1")
    with pytest.raises(StageError, match="was built with MinHash settings"):
        run_dedup(tmp_path, [django["3.1"]], {"dedup.index": "index/dedup", "dedup.rows": 4}, run_id="night2")


def test_index_on_s3(s3_bucket, django, tmp_path):
    """The index as a full s3:// URL (moto_server), runs on local storage: night 2 verifies against night 1
    with ranged reads of only the needed shingle sets. (S3 storage with the default relative index:
    test_filter.py::test_normalize_dedup_filter_on_s3.)"""
    url = s3_bucket + "/dedup-index"
    night1, night2 = two_nights(django)
    run_dedup(tmp_path, night1, {"dedup.index": url}, run_id="night1")
    c2, kept, dups = run_dedup(tmp_path, night2, {"dedup.index": url}, run_id="night2")
    assert c2["removed"] == {"exact": 1, "url": 1, "near": 3}
    assert c2["index"]["uri"] == url and c2["index"]["ranged_reads"] >= 1
    index = Storage(url)
    seg = index.read_json(INDEX_JSON)["segments"][0]["path"]
    assert 0 < c2["index"]["bytes_fetched"] < index.size(f"{seg}/shingles.u64")  # not the whole file
    assert sorted(r["matched_snapshot"] for r in dups) == ["night1"] * 4 + ["night2"]
    assert not (tmp_path / "index").exists()


COMMITTER = """
import os, sys, time
from stages.dedup.index import DedupIndex
uri, who, n, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
index = DedupIndex(uri)
open(os.path.join(barrier, who), "w").close()  # imports done: ready
while len(os.listdir(barrier)) < 2:  # both processes begin together
    time.sleep(0.001)
for k in range(n):
    seg = index.new_segment_path(f"{who}-{k}")
    index.storage.write_bytes(f"{seg}/arrays.npz", b"segment")
    index.commit_locked(f"{who}-{k}", {"path": seg, "documents": 1}, {"n_grams": 5})
"""


def test_index_commits_of_two_processes_keep_every_snapshot(tmp_path):
    """Two processes (two runs with different run ids sharing an index) commit 30 snapshots each at the same time,
    as a dedup run does (``commit_locked``). Without the index lock, the read-modify-write of index.json lost
    15-26 of 80 entries in every one of 3 trials (40 each); with it none is lost."""
    import subprocess
    import sys

    from conftest import ROOT

    uri, n, barrier = str(tmp_path / "index"), 30, tmp_path / "ready"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", COMMITTER, uri, who, str(n), str(barrier)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    state = DedupIndex(uri).load()
    assert sorted(s["snapshot"] for s in state["segments"]) == sorted(f"{w}-{k}" for w in "ab" for k in range(n))
    whos = [s["snapshot"][0] for s in state["segments"]]  # commit order: the two writers did overlap
    assert sum(x != y for x, y in zip(whos, whos[1:])) >= 2, whos
    index = Storage(uri)
    assert all(index.exists(f"{s['path']}/arrays.npz") for s in state["segments"])
    assert not [p for p in index.list() if ".lock" in p]  # released, no temporary left


def test_snapshot_must_be_one_folder_name(tmp_path):
    from stages.core.config import ConfigError

    for bad in ("../x", ".hidden", "a/b", "x" * 129, ""):
        with pytest.raises(ConfigError, match=r"dedup\.snapshot: .*must be one folder name"):
            load_tiny(tmp_path, {"dedup.snapshot": bad})
    assert load_tiny(tmp_path, {"dedup.snapshot": "2026-11-30_night.1"}).dedup.snapshot == "2026-11-30_night.1"
