"""The run report and the comparison of two runs, on two real runs of every stage over a slice of the crawl.

The slice: 101 WARC records cut (byte-exact gzip members) from three crawl files: Django's first 30 pages plus its
1.3-1.5 release notes (near duplicates of each other: dedup finds clusters), and 15 pages each of Python and
PostgreSQL (three domains for reweighting). Run "a" is the tiny profile with a tiny model; run "b" changes one
filter threshold. Every stage runs for real (run_stage), training too (4 steps, torchrun)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import CRAWL, SHARED, load_tiny
from stages import NEEDS, STAGES
from stages.core import report
from stages.core.runner import manifest_hash, run_stage
from stages.core.storage import Storage

PARTS = [("docs.djangoproject.com-0000.warc.gz", 30, r"/releases/1\.[345]\.\d+\.html$"),
         ("docs.python.org-0000.warc.gz", 15, None), ("www.postgresql.org-0000.warc.gz", 15, None)]
SMALL = {"run.workers": 1, "dedup.index": None,  # no cross-run index: run b would dedup against run a
         "train.steps": 4, "train.checkpoint_every": 2, "train.warmup_steps": 1, "train.log_every": 1,
         "train.nproc": 1, "train.global_batch": 4, "train.micro_batch": 4,
         "train.model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 64},
         "tokenizer.vocab_size": 512, "evaluate.val_tokens": 1024, "evaluate.doc_tokens": 1024,
         "evaluate.sets": [{"name": "wikitext-2", "path": "../../shared/data/eval/wikitext-2/valid.txt",
                            "format": "wikitext", "max_tokens": 1024}],
         "evaluate.generate": {"prompts": ["The Django"], "max_new_tokens": 4, "samples": 1}}
STRICTER = {"filter.gopher_quality.max_non_alpha_words_ratio": 0.8}  # run b: Gopher's published value
RUN_OVERRIDES: dict[str, dict] = {}  # run id -> the profile overrides it ran with (set by the runs fixture)


def write_slice(dst) -> int:
    from warcio.archiveiterator import ArchiveIterator

    n_out = 0
    with open(dst, "wb") as f:
        for name, first, pattern in PARTS:
            spans, n = [], 0
            with open(CRAWL / name, "rb") as fh:
                it = ArchiveIterator(fh)
                for r in it:
                    url = r.rec_headers.get_header("WARC-Target-URI") or ""
                    keep = r.rec_type == "response" and (n < first or (pattern and re.search(pattern, url)))
                    n += r.rec_type == "response"
                    r.content_stream().read()
                    if keep:
                        spans.append((it.get_record_offset(), it.get_record_length()))
            with open(CRAWL / name, "rb") as fh:
                for offset, length in spans:
                    fh.seek(offset)
                    f.write(fh.read(length))
            n_out += len(spans)
    return n_out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    warc = tmp / "slice.warc.gz"
    assert write_slice(warc) == 101
    speeches = (SHARED / "eval" / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    passages = [p.split("\n", 1)[1].replace("\n", " ") for p in speeches if len(p.split()) >= 25][:20]
    (tmp / "last_word.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    last_word = [{"name": "shakespeare-last-word", "path": str(tmp / "last_word.jsonl")}]
    storage = str(tmp / "art")
    for rid, extra in (("a", {}), ("b", STRICTER)):
        RUN_OVERRIDES[rid] = {**SMALL, "ingest.inputs": [str(warc)], "evaluate.last_word": last_word, **extra}
        cfg = load_tiny(tmp, RUN_OVERRIDES[rid])
        for stage in STAGES:
            run_stage(stage, cfg, storage, rid)
    return storage


def _manifests(storage, rid):
    root = Storage(storage).sub(rid)
    return {s: root.read_json(f"{s}/manifest.json") for s in STAGES}


def test_report_numbers_equal_the_manifests(runs):
    rep = report.build(runs, "a")
    ms, root = _manifests(runs, "a"), Storage(runs).sub("a")
    assert rep["complete"] and rep["stages"] == STAGES
    funnel = {r["stage"]: r for r in rep["funnel"]}
    for stage, m in ms.items():
        c, row = m["counts"], funnel[stage]
        assert (row["documents_in"], row["documents_out"], row["bytes_out"]) == \
               (c.get("documents_in"), c.get("documents_out"), c.get("bytes_out")), stage
        assert row["removed"] == (c.get("removed") or {}), stage
    assert funnel["ingest"]["records_in"] == ms["ingest"]["counts"]["documents_in"] == 101
    assert funnel["shard"]["tokens"] == ms["shard"]["counts"]["tokens_out"] and not funnel["shard"]["tokens_estimated"]
    assert funnel["filter"]["tokens_estimated"]  # before sharding: bytes / the tokenizer's bytes per token
    bpt = ms["tokenizer"]["metrics"]["bytes_per_token"]
    assert funnel["filter"]["tokens"] == round(ms["filter"]["counts"]["bytes_out"] / bpt)
    assert funnel["reweight"]["added"] == ms["reweight"]["counts"]["added"]

    # removed by reason, the filters' finer reasons, and links to the sample files the stages wrote
    flt = rep["removed"]["filter"]
    fc = ms["filter"]["counts"]
    assert flt["by_reason"] == fc["removed"] and flt["removed_reasons"] == fc["removed_reasons"]
    [samples] = flt["samples"]
    assert samples["url"] == root.sub("filter").url("removed_samples.jsonl.gz")
    lines = gzip.decompress(root.read_bytes("filter/removed_samples.jsonl.gz")).decode().splitlines()
    assert samples["rows"] == len(lines) > 0 and sum(samples["by_reason"].values()) == len(lines)
    assert funnel["filter"]["removed_samples"] == [samples["url"]]

    # dedup: the manifest's counts, clusters from duplicates.jsonl.gz
    d, dm = rep["dedup"], ms["dedup"]["counts"]
    assert d["removed"] == dm["removed"] and d["near"] == dm["near"] and dm["near"]["clusters"] > 0
    assert len(d["largest_clusters"]) == dm["near"]["clusters"]
    assert sum(c["removed"] for c in d["largest_clusters"]) == dm["removed"]["near"]
    assert all(c["min_jaccard"] >= ms["dedup"]["config"]["threshold"] for c in d["largest_clusters"])

    # language and domain mix, tokenizer, training curve, evaluation
    assert rep["languages"] == ms["normalize"]["counts"]["languages"]
    mix = root.read_json("reweight/mixture.json")
    assert rep["mixture"]["domains"] == mix["domains"] and len(mix["domains"]) == 3
    for dom, v in ms["reweight"]["metrics"]["mixture"].items():
        assert rep["mixture"]["domains"][dom]["share_after"] == v["share_after"]
        assert rep["mixture"]["tokens"][dom]["share"] == ms["shard"]["metrics"]["mixture"][dom]
    # the language mix: normalize's counts beside reweight's mixture.json (before / after reweighting)
    assert rep["mixture"]["languages"] == mix["languages"]
    assert ms["reweight"]["metrics"]["languages"] == {
        x: {k: v[k] for k in ("docs_before", "docs_after", "share_before", "share_after")}
        for x, v in mix["languages"].items()}
    lm = {r["language"]: r for r in rep["language_mix"]}
    assert set(lm) == set(mix["languages"]) | set(ms["normalize"]["counts"]["languages"])
    for lang, r in lm.items():
        assert r["normalize_docs"] == ms["normalize"]["counts"]["languages"].get(lang)
        v = mix["languages"].get(lang, {"docs_before": 0, "docs_after": 0, "share_before": 0.0, "share_after": 0.0})
        assert {k: r[k] for k in ("docs_before", "docs_after", "share_before", "share_after")} == \
               {k: v[k] for k in ("docs_before", "docs_after", "share_before", "share_after")}, lang
    # every document reaching reweight still carries normalize's label (no "(none)"): before = filter's output
    assert "(none)" not in mix["languages"] and mix["languages"]["en"]["docs_before"] > 0
    assert sum(v["docs_before"] for v in mix["languages"].values()) == ms["filter"]["counts"]["documents_out"]
    assert sum(v["docs_after"] for v in mix["languages"].values()) == ms["reweight"]["counts"]["documents_out"]
    tm = ms["tokenizer"]["metrics"]
    assert {k: rep["tokenizer"][k] for k in ("vocab_size", "bytes_per_token", "heldout_tokens")} == \
           {k: tm[k] for k in ("vocab_size", "bytes_per_token", "heldout_tokens")}
    rows = [json.loads(x) for x in root.read_bytes("train/metrics.jsonl").decode().splitlines()]
    assert [(r["step"], r["loss"], r["lr"], r["tokens_per_s"]) for r in rep["training"]["curve"]] == \
           [(r["step"], r["loss"], r["lr"], r["tokens_per_s"]) for r in rows] and len(rows) == 4
    assert rep["training"]["summary"]["final_loss"] == ms["train"]["metrics"]["final_loss"]
    ev = root.read_json("evaluate/report.json")
    assert set(rep["evaluation"]["sets"]) == set(ev["sets"]) >= {"validation", "validation_docs", "wikitext-2"}
    for name, s in ev["sets"].items():
        for k in ("loss", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "tokens"):
            assert rep["evaluation"]["sets"][name].get(k) == s.get(k), (name, k)
    assert [g["text"] for g in rep["evaluation"]["generations"]] == [g["text"] for g in ev["generations"]]
    lw = rep["evaluation"]["last_word"]["shakespeare-last-word"]
    assert lw == {k: ev["last_word"]["shakespeare-last-word"][k] for k in ("examples", "accuracy", "perplexity")}
    assert lw["examples"] == 20
    assert [c["step"] for c in rep["evaluation"]["curve"]] == [c["step"] for c in ev["curve"]] == [2, 4]
    assert rep["evaluation"]["curve"][-1]["validation.loss"] == ev["sets"]["validation"]["loss"]  # step 4 = final
    for c, e in zip(rep["evaluation"]["curve"], ev["curve"]):  # the last-word task per checkpoint too
        assert c["shakespeare-last-word.perplexity"] == e["last_word"]["shakespeare-last-word"]["perplexity"]
    assert list(rep["evaluation"]["sets"])[:2] == ["validation", "validation_docs"]


def test_lineage_hashes_are_the_manifests(runs, tmp_path):
    rep = report.build(runs, "a")
    root = Storage(runs).sub("a")
    lin = {r["stage"]: r for r in rep["lineage"]}
    assert list(lin) == STAGES
    for stage, r in lin.items():
        raw = root.read_bytes(f"{stage}/manifest.json")
        assert r["file_sha256"] == hashlib.sha256(raw).hexdigest()
        assert r["manifest_sha256"] == manifest_hash(json.loads(raw))
        assert r["fingerprint"] == json.loads(raw)["fingerprint"]
        assert set(r["inputs"]) == set(NEEDS[stage])
        for dep, rec in r["inputs"].items():  # what the stage recorded = the upstream manifest now
            assert rec["consistent"] and rec["manifest_sha256"] == lin[dep]["manifest_sha256"]
    assert [s for s, r in lin.items() if r["behind_checkpoint"]] == STAGES[:-1]  # all but evaluate
    assert rep["crawl_inputs"] == json.loads(root.read_bytes("ingest/manifest.json"))["metrics"]["inputs"] != []
    # the crawl files by content: the sha256 of the bytes ingest read, in the report's lineage
    files = rep["crawl_files"]
    assert [f["path"] for f in files] == rep["crawl_inputs"]
    for f in files:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
        assert f["bytes"] == Path(f["path"]).stat().st_size
    md = report.render_markdown(rep)
    assert all(f"sha256 `{f['sha256']}`" in md for f in files)

    # an upstream manifest edited after the fact is flagged where it was recorded
    shutil.copytree(root.url(), tmp_path / "a")
    ingest = json.loads((tmp_path / "a" / "ingest" / "manifest.json").read_text())
    ingest["counts"]["documents_out"] += 1
    (tmp_path / "a" / "ingest" / "manifest.json").write_text(json.dumps(ingest))
    lin2 = {r["stage"]: r for r in report.build(str(tmp_path), "a")["lineage"]}
    assert not lin2["normalize"]["inputs"]["ingest"]["consistent"]
    assert lin2["dedup"]["inputs"]["normalize"]["consistent"]


def test_written_report_files_and_plots_are_real_pngs(runs):
    from PIL import Image

    rep = report.write(runs, "a")
    out = Storage(runs).sub("a", "report")
    assert json.loads(out.read_bytes("report.json"))["funnel"] == rep["funnel"]
    md = out.read_bytes("report.md").decode()
    assert set(rep["plots"]) == {"training.png", "throughput.png", "funnel.png", "domain_mix.png", "evaluation.png"}
    texts = {}
    assert set(report.plots(rep, texts)) == set(texts) == set(rep["plots"])
    for name, t in texts.items():  # every plot: a title, both axes labelled, a legend wherever it draws several series
        main = [a for a in t["axes"] if a["xlabel"]]
        assert main and all(a["title"] and a["ylabel"] and [x for x in a["xticks"] if x] for a in main), name
        assert all(a["ylabel"] for a in t["axes"]), name  # twin axes (learning rate, tokens) labelled too
        assert "run a" in t["suptitle"] + " ".join(a["title"] for a in t["axes"]), name
    assert texts["training.png"]["axes"][0]["legend"] == ["train loss", "validation loss (evaluate)", "learning rate"]
    assert texts["domain_mix.png"]["axes"][0]["xticks"] == sorted(rep["mixture"]["domains"])
    assert texts["funnel.png"]["axes"][0]["xticks"] == ["records"] + [r["stage"] for r in rep["funnel"]
                                                                      if r["documents_out"] is not None]
    ev_sets = sorted(n for n, s in rep["evaluation"]["sets"].items() if s.get("bits_per_byte") is not None)
    assert texts["evaluation.png"]["axes"][0]["legend"] == ev_sets  # one bits/byte curve per set
    assert texts["evaluation.png"]["axes"][0]["xticks"] == ["2", "4"]  # the two checkpoints
    for name in rep["plots"]:
        data = out.read_bytes(f"plots/{name}")
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and f"](plots/{name})" in md
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.size[0] >= 600 and img.size[1] >= 350
        assert len(img.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 20  # drawn, not a blank canvas
    # the markdown holds the manifests' numbers
    filt = rep["removed"]["filter"]["by_reason"]
    f_row = next(r for r in rep["funnel"] if r["stage"] == "filter")
    assert f"| filter | {f_row['documents_in']:,} | {f_row['documents_out']:,} | {f_row['bytes_out']:,} |" in md
    assert all(f"{k}={v}" in md for k, v in filt.items() if v)
    assert all(f"`{r['manifest_sha256']}`" in md for r in rep["lineage"])
    gens = rep["evaluation"]["generations"]  # greedy and seeded top-k continuations of the profile's prompts
    assert [(g["mode"], g["seed"]) for g in gens] == [("greedy", None), ("top_k", 0)]
    for g in gens:
        how = "greedy" if g["mode"] == "greedy" else f"top-{g['top_k']}, seed {g['seed']}"
        assert f"- ({how}) **{g['prompt']}**{g['text'].replace(chr(10), ' ')}" in md
    assert "| shakespeare-last-word | 20 |" in md  # the last-word task: examples, accuracy, perplexity
    en = next(r for r in rep["language_mix"] if r["language"] == "en")
    assert "## Language mix before / after reweighting" in md and (
        f"| en | {en['normalize_docs']:,} | {en['docs_before']:,} | {en['docs_after']:,} | "
        f"{en['share_before']:.4g} | {en['share_after']:.4g} |") in md


def test_compare_two_runs_shows_what_changed(runs):
    a, b = _manifests(runs, "a"), _manifests(runs, "b")
    diff = report.compare(runs, "a", "b")
    rows = {(r["section"], r["item"]): r for r in diff["rows"]}
    assert diff["config_changed"] == ["filter"]
    cfg = rows[("config filter", "gopher_quality.max_non_alpha_words_ratio")]
    assert (cfg["a"], cfg["b"]) == (0.65, 0.8)
    for stage in STAGES:  # funnel and removed-by-reason rows: both manifests' counts, delta b - a
        for k in ("documents_out", "bytes_out"):
            if a[stage]["counts"].get(k) is not None:
                r = rows[("funnel", f"{stage} {k}")]
                assert (r["a"], r["b"], r["delta"]) == (a[stage]["counts"][k], b[stage]["counts"][k],
                                                        b[stage]["counts"][k] - a[stage]["counts"][k])
        for reason, n in (a[stage]["counts"].get("removed") or {}).items():
            assert rows[("removed", f"{stage} {reason}")]["b"] == b[stage]["counts"]["removed"][reason]
    gq = rows[("removed", "filter gopher_quality")]
    assert gq["delta"] > 0  # the stricter threshold removes more
    assert rows[("funnel", "filter documents_out")]["delta"] < 0
    assert rows[("funnel", "dedup documents_out")]["delta"] == 0  # upstream of the change: the same
    assert ("funnel", "dedup tokens") not in rows  # estimated with each run's own tokenizer: not compared
    loss = rows[("train", "final_loss")]
    assert (loss["a"], loss["b"]) == (a["train"]["metrics"]["final_loss"], b["train"]["metrics"]["final_loss"])
    en = rows[("mixture", "language en share_after")]
    assert (en["a"], en["b"]) == tuple(Storage(runs).sub(r).read_json("reweight/mixture.json")["languages"]["en"]
                                       ["share_after"] for r in "ab")
    ev_b = Storage(runs).sub("b").read_json("evaluate/report.json")["sets"]
    assert rows[("eval", "wikitext-2 bits_per_byte")]["b"] == ev_b["wikitext-2"]["bits_per_byte"]
    lw = rows[("eval", "shakespeare-last-word perplexity")]
    assert (lw["a"], lw["b"]) == tuple(Storage(runs).sub(r).read_json("evaluate/report.json")["last_word"]
                                       ["shakespeare-last-word"]["perplexity"] for r in "ab")

    text = report.render_compare(diff)
    assert re.search(r"removed: filter gopher_quality\s+%d\s+%d\s+\+%d" % (gq["a"], gq["b"], gq["delta"]), text)
    assert "funnel: dedup documents_out" not in text  # unchanged rows are left out by default
    assert "funnel: dedup documents_out" in report.render_compare(diff, all_rows=True)


def test_cli_report_and_compare(runs, capsys):
    from flows.cli import main

    assert main(["report", "--storage", runs, "--run-id", "b"]) == 0
    out = capsys.readouterr().out
    md = Storage(runs).sub("b", "report").url("report.md")
    assert f"report: {md}" in out and Storage(runs).sub("b", "report").exists("plots/funnel.png")
    shard = _manifests(runs, "b")["shard"]["counts"]
    assert re.search(r"shard\s+%s\s+%s" % (f"{shard['documents_in']:,}", f"{shard['documents_out']:,}"), out)
    assert main(["report", "--storage", runs, "--compare", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "Kiln runs 'a' vs 'b'" in out and "config filter: gopher_quality.max_non_alpha_words_ratio" in out
    assert main(["report", "--storage", runs, "--compare", "a", "nope"]) == 1
    assert "run 'nope' has no stage manifest" in capsys.readouterr().err


def _funnel_line(r: dict) -> str:
    """The regex of a funnel row as printed: stage, records (ingest) or documents in, documents out, MB, tokens."""
    def n(v, est=False):
        return "-" if v is None else ("~" if est else "") + f"{v:,}"
    mb = "-" if r["bytes_out"] is None else f"{r['bytes_out'] / 1e6:.2f}"
    docs_in = r["records_in"] if r["records_in"] is not None else r["documents_in"]
    return (rf"(?m)^{r['stage']}\s+{re.escape(n(docs_in))}\s+{re.escape(n(r['documents_out']))}\s+{re.escape(mb)}\s+"
            rf"{re.escape(n(r['tokens'], r['tokens_estimated']))}\s")


def test_run_summary_prints_the_report_funnel(runs):
    """The end-of-run table (`kiln run`, `make demo`) is the report's funnel: the same rows, the manifests' counts."""
    from stages.core import summary

    rep, s, ms = report.build(runs, "a"), summary.collect(runs, "a"), _manifests(runs, "a")
    assert [{k: v for k, v in r.items() if k != "skipped"} for r in s["stages"]] == rep["funnel"]
    text = summary.render(s)
    for r in rep["funnel"]:
        c = ms[r["stage"]]["counts"]
        assert (r["documents_out"], r["bytes_out"]) == (c.get("documents_out"), c.get("bytes_out"))
        assert re.search(_funnel_line(r), text), r["stage"]
        assert re.search(_funnel_line(r), report.render_funnel(rep)), r["stage"]  # `kiln report` prints the same
    assert "reweight" in text and f"+upsampled={ms['reweight']['counts']['added']['upsampled']}" in text


def test_kiln_run_prints_the_funnel_and_publishes_the_report(runs, capsys, prefect_api):
    """`kiln run` over the finished run "a" (every stage skipped by its manifest): the funnel printed at the end
    is the report's, and the flow run publishes the report as Prefect artifacts: report.md (markdown), the funnel
    and evaluation tables, every plot (PNG bytes equal to storage's), and the removed samples as tables that
    report.md links."""
    import asyncio
    import base64

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from flows.cli import main

    args = ["run", "--storage", runs, "--run-id", "a"]
    for k, v in RUN_OVERRIDES["a"].items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert main(args) == 0
    out = capsys.readouterr().out

    async def read():
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="kiln-")))
            return {a.key: a for a in arts}

    arts = asyncio.run(read())
    rep = report.build(runs, "a")
    for r in rep["funnel"]:
        assert re.search(_funnel_line(r) + r"\s*skip", out), r["stage"]  # skipped by its manifest, same numbers
    assert f"report: {Storage(runs).sub('a', 'report').url('report.md')}" in out

    def data(key):
        d = arts[key].data
        return json.loads(d) if isinstance(d, str) and arts[key].type == "table" else d

    assert arts["kiln-report-a"].type == "markdown" and "## Data funnel" in data("kiln-report-a")
    assert data("kiln-funnel-a") == json.loads(json.dumps(report.funnel_table(rep)))
    assert [r["set"] for r in data("kiln-eval-a")] == [r["set"] for r in report.eval_table(rep)]
    root = Storage(runs).sub("a")
    for name in ("training", "throughput", "funnel", "domain_mix", "evaluation"):
        url = data(f"kiln-plot-{name.replace('_', '-')}-a")
        assert base64.b64decode(url.split(",", 1)[1]) == root.read_bytes(f"report/plots/{name}.png")
    for stage, file in (("filter", "removed_samples.jsonl.gz"), ("dedup", "duplicates.jsonl.gz")):
        key, url = f"kiln-removed-{stage}-a", root.sub(stage).url(file)
        rows = data(key)
        assert rows == json.loads(json.dumps(report.sample_rows(url)))
        assert len(rows) == len(gzip.decompress(root.read_bytes(f"{stage}/{file}")).splitlines()) > 0
        assert report.sample_rows(url, limit=1) == report.sample_rows(url)[:1]  # capped (dedup: a row per removal)
        assert re.search(rf"samples: \[{re.escape(url)}\]\(.*Prefect artifact \[{key}\]\([^)]*/artifacts/key/{key}\)",
                         data("kiln-report-a"))
    assert {r["filter"] for r in data("kiln-removed-filter-a")} == set(rep["removed"]["filter"]["samples"][0]["by_reason"])


def test_report_of_a_run_before_the_language_mix(runs, tmp_path):
    """A run whose reweight recorded no languages (older code): the report shows normalize's counts only."""
    shutil.copytree(Storage(runs).sub("a").url(), tmp_path / "o", ignore=shutil.ignore_patterns("data", "checkpoints"))
    st = Storage(str(tmp_path)).sub("o", "reweight")
    mix, m = st.read_json("mixture.json"), st.read_json("manifest.json")
    del mix["languages"], m["metrics"]["languages"]
    st.write_json("mixture.json", mix)
    st.write_json("manifest.json", m)
    rep = report.build(str(tmp_path), "o")
    norm = Storage(runs).sub("a").read_json("normalize/manifest.json")["counts"]["languages"]
    assert "languages" not in rep["mixture"] and rep["languages"] == norm
    assert [(r["language"], r["normalize_docs"], r["docs_before"], r["share_after"]) for r in rep["language_mix"]] == \
           [(k, v, None, None) for k, v in sorted(norm.items(), key=lambda kv: (-kv[1], kv[0]))]
    md = report.render_markdown(rep)
    assert "## Language mix (normalize)" in md and "## Language mix before" not in md
    assert all(f"| {k} | {v:,} |" in md for k, v in norm.items())


def test_report_of_a_partial_run(runs, tmp_path):
    """A run stopped after dedup: the report has what exists and says it is incomplete."""
    for stage in ("ingest", "normalize", "dedup"):
        shutil.copytree(Storage(runs).sub("a", stage).url(), tmp_path / "p" / stage)
    rep = report.write(str(tmp_path), "p")
    assert not rep["complete"] and rep["stages"] == ["ingest", "normalize", "dedup"]
    assert rep["training"] is None and rep["evaluation"] is None and rep["mixture"] is None
    assert set(rep["plots"]) == {"funnel.png"}
    assert "incomplete run" in Storage(str(tmp_path)).sub("p", "report").read_bytes("report.md").decode()


def test_prefect_artifact_keys():
    from flows.pipeline import artifact_key

    assert artifact_key("report", "Tiny_Run.1") == "kiln-report-tiny-run-1"
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("eval", "nightly/2024 05 01"))


def test_report_in_s3(runs, s3_bucket):
    """The same report from a copy of run "a" in S3 (moto_server): read and written through Storage."""
    local = Storage(runs).sub("a")
    remote = Storage(s3_bucket + "/runs")
    for stage in STAGES:  # the manifests and the files the report reads
        for rel in ["manifest.json"] + [p for p in local.sub(stage).list() if not p.startswith(("data/", "checkpoints/",
                                                                                               "tokens/", "parquet/"))]:
            remote.sub("a", stage).write_bytes(rel, local.sub(stage).read_bytes(rel))
    rep = report.write(remote, "a")
    want = report.build(runs, "a")
    moved = [{**r, "removed_samples": [u.replace(local.url(), remote.sub("a").url()) for u in r["removed_samples"]]}
             for r in want["funnel"]]
    assert rep["funnel"] == moved
    assert [r["file_sha256"] for r in rep["lineage"]] == [r["file_sha256"] for r in want["lineage"]]
    out = remote.sub("a", "report")
    assert rep["files"]["report.md"] == out.url("report.md") and rep["files"]["report.md"].startswith("s3://")
    assert all(out.read_bytes(f"plots/{n}")[:4] == b"\x89PNG" for n in rep["plots"])
    link = remote.sub("a", "filter").url("removed_samples.jsonl.gz")
    assert f"samples: [{link}]" in out.read_bytes("report.md").decode()
