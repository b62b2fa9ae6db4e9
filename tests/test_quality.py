"""fastText quality classifier on real text: positives = the extraction benchmark's article bodies, negatives = real
crawl pages (50 from each of three crawl WARCs, through ingest). Deterministic model bytes, a real fastText NaN
retried, held-out precision/recall, keep rules, positives excluded from negatives, corpus formats, bad configs."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil

import dill
import pytest

from conftest import CRAWL, SHARED, TINY, load_tiny, real_docs, seed_stage
from stages.core.config import load_config
from stages.core.runner import StageContext, StageError, read_manifest, run_stage
from stages.core.storage import Storage
from stages.filter.quality import (INJECT_NAN_ENV, NEG, QualityConfig, ReferenceCorpus, datatrove_prefilter, preprocess,
                                   quality_block, read_reference, score_texts, train_quality)
from test_normalize import stage_docs

GT = SHARED / "extraction-benchmark" / "ground-truth.json"
ON = QualityConfig(enabled=True)


def first_pages(src, dest, n: int) -> int:
    """Copy the first ``n`` response records of a real crawl WARC into a new one."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    k = 0
    with open(src, "rb") as f, open(dest, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response":
                writer.write_record(rec)
                k += 1
                if k == n:
                    break
    return k


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> list[dict]:
    """150 real crawl pages (Python, Django, PostgreSQL docs) as ingest documents."""
    tmp = tmp_path_factory.mktemp("crawl")
    for name in ("docs.python.org-0000", "docs.djangoproject.com-0000", "www.postgresql.org-0000"):
        assert first_pages(CRAWL / f"{name}.warc.gz", tmp / f"{name}.warc.gz", 50) == 50
    cfg = load_tiny(tmp, {"ingest.inputs": [str(tmp / "*.warc.gz")], "run.workers": 1})
    run_stage("ingest", cfg, str(tmp / "st"), "run1")
    docs = stage_docs(str(tmp / "st"), "ingest")
    assert len(docs) >= 140
    return docs


def make_ctx(storage: str, work, docs: list[dict] | None = None, cfg=None) -> StageContext:
    """A filter-stage context over a seeded dedup stage (``docs``) in ``storage``."""
    if docs is not None:
        seed_stage(storage, "run1", "dedup", docs)
    root = Storage(storage).sub("run1")
    work.mkdir(parents=True, exist_ok=True)
    return StageContext("filter", "run1", cfg or load_tiny(None), root, root.sub("filter"),
                        {"dedup": read_manifest(root, "dedup")}, str(work))


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def trained(crawl, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    ctx = make_ctx(str(tmp / "st"), tmp / "work", crawl)
    return ctx, train_quality(ON, ctx)


def test_report_heldout_and_domains(trained, crawl):
    ctx, res = trained
    rep = res["report"]
    assert rep["positives"]["documents"] == 181 and rep["positives"]["heldout"] == 36
    assert rep["negatives"]["sampled"] == len(crawl) and rep["negatives"]["excluded_as_positive"] == 0
    h = rep["heldout"]["at_0.5"]
    assert h["tp"] + h["fp"] + h["fn"] + h["tn"] == 36 + rep["negatives"]["heldout"]
    assert h["precision"] >= 0.9 and h["recall"] >= 0.8  # news prose vs documentation: easy to separate
    doms = rep["domains"]
    assert set(doms) == {"docs.python.org", "docs.djangoproject.com", "www.postgresql.org"}
    assert sum(d["documents"] for d in doms.values()) == len(crawl) == rep["keep"]["scored"]
    assert sum(d["training_negatives"] for d in doms.values()) == rep["negatives"]["train"]
    for d in doms.values():
        assert 0 <= d["p10"] <= d["p50"] <= d["p90"] <= 1 and 0 <= d["kept_share"] <= 1
    # top 10% (default): ceil(15) documents at or above the cutoff, ties aside
    assert rep["keep"]["kept"] >= math.ceil(len(crawl) * 0.1) and rep["keep"]["cutoff"] == res["cutoff"]
    assert ctx.out.read_bytes("quality/model.bin") == open(res["model_path"], "rb").read()
    assert ctx.out.read_json("quality/report.json")["heldout"] == rep["heldout"]
    assert res["counts"]["quality_precision"] == h["precision"] and res["outputs"] == ["quality/model.bin",
                                                                                         "quality/report.json"]


def test_training_is_deterministic(trained, crawl, tmp_path):
    """A second training (other storage, other process) writes the same model bytes and the same scores."""
    _, first = trained
    res = train_quality(ON, make_ctx(str(tmp_path / "st"), tmp_path / "work", crawl))
    assert sha(res["model_path"]) == sha(first["model_path"])
    assert res["cutoff"] == first["cutoff"] and res["report"]["domains"] == first["report"]["domains"]
    assert res["report"]["heldout"] == first["report"]["heldout"]


def test_nan_flake_is_retried_and_gives_the_same_model(trained, crawl, tmp_path, monkeypatch):
    """The first two attempts really fail inside fastText (lr=1e30 -> "Encountered NaN"); the third succeeds
    with the same bytes as an unflaky run. With fewer attempts than failures: a clear error."""
    _, first = trained
    monkeypatch.setenv(INJECT_NAN_ENV, "2")
    res = train_quality(ON, make_ctx(str(tmp_path / "st"), tmp_path / "w1", crawl))
    assert res["report"]["training"]["attempts"] == 3 and res["report"]["training"]["nan_retries"] == 2
    assert sha(res["model_path"]) == sha(first["model_path"])
    with pytest.raises(StageError, match=r"failed 2 times in fresh processes \(last: .*Encountered NaN"):
        train_quality(QualityConfig(enabled=True, attempts=2), make_ctx(str(tmp_path / "st"), tmp_path / "w2"))


def test_keep_rules(trained, crawl):
    """threshold keeps exactly the documents scoring >= threshold; top 10% keeps the best ceil(10%) (ties kept);
    the block pickles (dill, as datatrove ships it to workers) and sets metadata["quality_score"]."""
    import fasttext
    from datatrove.data import Document

    _, res = trained
    model = fasttext.load_model(res["model_path"])
    scores = dict(zip([d["id"] for d in crawl], score_texts(model, [preprocess(d["text"]) for d in crawl])))
    for cfg, cutoff in ((QualityConfig(enabled=True, keep="threshold", threshold=0.05), 0.05),
                        (ON, res["cutoff"])):
        block = dill.loads(dill.dumps(quality_block(cfg, res["model_path"], cutoff)))
        docs = [Document(text=d["text"], id=d["id"], metadata=dict(d["metadata"])) for d in crawl]
        kept = list(block.run(iter(docs)))
        assert {d.id for d in kept} == {i for i, s in scores.items() if s >= cutoff}
        assert all(d.metadata["quality_score"] == scores[d.id] for d in docs)  # set on dropped ones too
        st = block.stats.stats
        assert st["kept"].total == len(kept) and st["dropped"].total == len(crawl) - len(kept)
    best = sorted(scores.values(), reverse=True)
    k = math.ceil(len(crawl) * 0.1)
    assert res["cutoff"] == best[k - 1] and len(kept) == sum(s >= best[k - 1] for s in best) >= k
    assert 0 < sum(s >= 0.05 for s in best) < len(crawl)  # the threshold case is not trivial


def test_positives_are_never_negatives(crawl, tmp_path):
    """Crawl documents that are also positives (same URL; or the same text with other case/whitespace) are
    excluded from the negatives: none of them is in the training file under the negative label."""
    pos = real_docs(181)
    same_url = [dict(d, id=f"url-{i}", text=crawl[100 + i]["text"]) for i, d in enumerate(pos[:3])]
    same_text = [dict(d, id=f"text-{i}", text=d["text"].upper().replace(" ", "  "),
                      metadata={"url": f"https://mirror.example/{i}", "domain": "mirror.example"})
                 for i, d in enumerate(pos[3:6])]
    ctx = make_ctx(str(tmp_path / "st"), tmp_path / "work", crawl[:60] + same_url + same_text)
    res = train_quality(QualityConfig(enabled=True, heldout_fraction=0.0), ctx)
    assert res["report"]["negatives"]["excluded_as_positive"] == 6 and res["report"]["negatives"]["sampled"] == 60
    negatives = {line[len(NEG) + 1:-1] for line in open(tmp_path / "work" / "quality-train.txt")
                 if line.startswith(NEG)}
    assert len(negatives) == 60
    assert not negatives & {preprocess(d["text"]) for d in same_url + same_text}
    assert preprocess(crawl[0]["text"]) in negatives
    with pytest.raises(StageError, match=r"no negatives: 'dedup' has 6 non-empty documents, 6 of them also positives"):
        train_quality(ON, make_ctx(str(tmp_path / "st2"), tmp_path / "w2", same_url + same_text))


def test_corpus_formats_and_relative_paths(tmp_path):
    """The same positives from the benchmark JSON, JSONL (gzipped) and one text file per document; relative paths
    resolve against the profile's folder."""
    gt = json.loads(GT.read_text())
    texts = [v["articleBody"] for _, v in sorted(gt.items()) if v["articleBody"].strip()]
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "pos.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"id": k, "text": v["articleBody"], "url": v["url"]}) + "\n"
                for k, v in sorted(gt.items())).encode()))
    for i, t in enumerate(texts[:5]):
        (tmp_path / "ref" / f"{i}.txt").write_text(t)
    shutil.copy(TINY, tmp_path / "profile.yaml")
    cfg = load_config(tmp_path / "profile.yaml")
    js = read_reference(ReferenceCorpus(), load_tiny(None))
    jl = read_reference(ReferenceCorpus(paths=["ref/pos.jsonl.gz"], format="jsonl"), cfg)
    tx = read_reference(ReferenceCorpus(paths=["ref/*.txt"], format="text"), cfg)
    assert [d["text"] for d in js] == [d["text"] for d in jl] == texts and len(texts) == 181
    assert [d["url"] for d in js] == [d["url"] for d in jl] and js[0]["url"].startswith("http")
    assert sorted(d["text"] for d in tx) == sorted(texts[:5])


def test_bad_configs_are_clear_errors(tmp_path, crawl):
    from pydantic import ValidationError

    ctx = make_ctx(str(tmp_path / "st"), tmp_path / "work", crawl[:20])
    missing = QualityConfig(enabled=True, positives={"paths": ["nowhere/ref.json"]})
    with pytest.raises(StageError, match=r"positives: 'nowhere/ref.json' matches no file \(resolved to /"):
        train_quality(missing, ctx)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"id": 1, "text": "  "}) + "\n")
    empty = QualityConfig(enabled=True, positives={"paths": [str(tmp_path / "empty.jsonl")], "format": "jsonl"})
    with pytest.raises(StageError, match=r"no text in 1 file\(s\) \(format jsonl, text field 'text'\)"):
        train_quality(empty, ctx)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(StageError, match=r"broken.json is not valid json"):
        train_quality(QualityConfig(enabled=True, positives={"paths": [str(tmp_path / "broken.json")]}), ctx)
    for bad in ({"keep": "best"}, {"top_percent": 0}, {"heldout_fraction": 1.0}, {"word_ngram": 2}):
        with pytest.raises(ValidationError):
            QualityConfig(enabled=True, **bad)


def test_on_s3(s3_bucket, crawl, tmp_path):
    """Upstream documents read from and artifacts written to S3 (moto_server)."""
    ctx = make_ctx(s3_bucket + "/artifacts", tmp_path / "work", crawl[:40])
    res = train_quality(QualityConfig(enabled=True, heldout_fraction=0.1), ctx)
    assert Storage(s3_bucket + "/artifacts").sub("run1", "filter").exists("quality/model.bin")
    assert res["report"]["keep"]["scored"] == 40 and res["report"]["negatives"]["sampled"] == 40


def test_prefilter_limits_negatives_and_cutoff(crawl, tmp_path):
    """With a prefilter (here datatrove's real GopherQualityFilter), rejected documents are neither negatives nor
    part of the cutoff and the per-domain report."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    from stages.filter import fast_word_tokenizer

    gopher = GopherQualityFilter(language=fast_word_tokenizer())  # the filter stage's word tokenizer (spacy: slow)
    verdicts = {d["id"]: gopher.filter(Document(text=d["text"], id=d["id"])) for d in crawl}  # bool or (False, why)
    rejected = {i for i, v in verdicts.items() if v is not True}
    assert 10 < len(rejected) < len(crawl) - 20  # the crawl's code-heavy pages fail it, prose passes
    ctx = make_ctx(str(tmp_path / "st"), tmp_path / "work", crawl)
    res = train_quality(QualityConfig(enabled=True, heldout_fraction=0.0), ctx,
                        prefilter=datatrove_prefilter([gopher]))
    rep = res["report"]
    assert rep["negatives"]["prefiltered_out"] == len(rejected)
    assert rep["negatives"]["pool"] == len(crawl) - len(rejected)
    assert rep["keep"]["scored"] == sum(d["documents"] for d in rep["domains"].values()) == len(crawl) - len(rejected)
    negatives = {line[len(NEG) + 1:-1] for line in open(tmp_path / "work" / "quality-train.txt")
                 if line.startswith(NEG)}
    assert len(negatives) == len(crawl) - len(rejected)
    assert not negatives & {preprocess(d["text"]) for d in crawl if d["id"] in rejected}


def test_block_in_a_datatrove_pipeline(trained, crawl):
    """The block in the stage's kind of pipeline (datatrove reader -> block -> writer, 2 tasks on 2 worker
    processes): each worker loads the model itself; stats add up; written documents carry their score."""
    from stages.core.pipeline import block_stats, output_steps, run_pipeline, upstream_reader

    ctx, res = trained
    blocks = run_pipeline(ctx, [upstream_reader(ctx, "dedup"), quality_block(ON, res["model_path"], res["cutoff"]),
                                *output_steps(ctx)], name="quality", tasks=2, workers=2)
    st = block_stats(blocks, "🏅 fastText quality")
    assert st["kept"] == res["report"]["keep"]["kept"] and st["kept"] + st["dropped"] == len(crawl)
    out = stage_docs(ctx.root.uri.rsplit("/", 1)[0], "filter")
    assert len(out) == st["kept"] and all(d["metadata"]["quality_score"] >= res["cutoff"] for d in out)


def test_filter_stage_trains_on_heuristic_survivors_and_counts_quality(crawl, tmp_path):
    """The filter stage with the classifier on: heuristics first, the classifier trained on their survivors
    (negatives and top-percent pool), then scoring, PII and the output; removals counted under "quality" with
    samples; the model and report are outputs; a changed reference corpus changes the stage's fingerprint."""
    import gzip
    import json
    import shutil

    from stages.core.runner import stage_fingerprint

    storage = str(tmp_path / "st")
    seed_stage(storage, "run1", "dedup", crawl)
    over = {"run.workers": 1, "filter.url.enabled": False, "filter.quality.enabled": True,
            "filter.quality.keep": "top_percent", "filter.quality.top_percent": 50}
    m = run_stage("filter", load_tiny(tmp_path, over), storage, "run1")
    c = m["counts"]
    heuristics = sum(v for k, v in c["removed"].items() if k != "quality")
    pool = len(crawl) - heuristics
    assert c["quality"]["quality_upstream_kept"] == c["documents_out"] and abs(c["documents_out"] - pool / 2) <= 1
    assert c["removed"]["quality"] == pool - c["documents_out"] and c["removed_reasons"]["quality"] == {
        "below_cutoff": c["removed"]["quality"]}
    assert c["documents_in"] == len(crawl) == c["documents_out"] + sum(c["removed"].values())
    outs = {o["path"] for o in m["outputs"]}
    assert {"quality/model.bin", "quality/report.json", "removed_samples.jsonl.gz"} <= outs
    assert not any(p.startswith("heuristics_pass") for p in outs)
    st = tmp_path / "st" / "run1" / "filter"
    rep = json.loads((st / "quality" / "report.json").read_text())
    assert rep["negatives"]["pool"] == pool  # trained and ranked on the heuristics' survivors only
    rows = [json.loads(x) for x in gzip.decompress((st / "removed_samples.jsonl.gz").read_bytes()).splitlines()]
    assert {r["filter"] for r in rows} >= {"quality"}
    kept = [json.loads(x) for f in sorted((st / "data").glob("*.jsonl.gz")) for x in gzip.open(f)]
    assert all(d["metadata"]["quality_score"] >= c["quality"]["quality_cutoff"] for d in kept)

    # the fingerprint follows the reference corpus' content, not only its path
    cfg = load_tiny(tmp_path, over)
    ref = tmp_path / "ref.json"
    shutil.copy(SHARED / "extraction-benchmark" / "ground-truth.json", ref)
    cfg = load_tiny(tmp_path, {**over, "filter.quality.positives.paths": [str(ref)]})
    inputs = {"dedup": {"x": 1}}
    before = stage_fingerprint(cfg, "filter", inputs)
    ref.write_text(ref.read_text().replace("the", "a", 1))
    assert stage_fingerprint(cfg, "filter", inputs) != before
