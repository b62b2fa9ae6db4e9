"""fastText quality classifier (stages/filter/quality.py) on the sample: training time, held-out precision / recall /
F1, scoring speed, score distribution per domain, and what the DCLM-style top 10% keeps.

Input: ../shared/data/crawl through Kiln's ingest, normalize and dedup stages with the tiny profile (cached in
bench/_work/quality/store by run_stage's fingerprint: re-run only when a config changes; delete the folder after a
change of stage code). Positives: the 181 reference article bodies of ../shared/data/extraction-benchmark
(``quality.positives`` defaults). Negatives: 181 dedup documents sampled by hash (negatives_per_positive 1).
Defaults of ``QualityConfig`` (dim 32, bucket 100k, 20 epochs, lr 0.5, bigrams, 20% held out, top 10%).

Two runs: ``train_quality`` over all dedup documents (the plain ``quality.*`` figures), and with the filter
stage's heuristic chain as ``prefilter`` (datatrove's Gopher repetition / Gopher quality / C4 / FineWeb with the
tiny profile's thresholds: 1,382 of 2,382 documents pass), whose negatives and top 10% come from the documents the
quality block would actually see there (``quality.prefiltered.*``; its train time includes the heuristics, ~25 s).

- ``train_seconds``: ``train_quality`` end to end (reading, sampling, the training subprocess(es), scoring every
  dedup document for the cutoff and report, writing the artifacts); ``fasttext_seconds``: the training
  subprocess alone, including Python start-up and retries.
- ``docs_per_s``: the datatrove block (``quality_block``) run in this process on one core over all dedup
  documents (preprocess + fastText predict in batches of 256), model already loaded.
- precision / recall at score 0.5 on the held-out 20% (36 positives, 36 negatives): on this sample they measure
  how well news prose separates from software documentation (see the module docstring), not quality in general.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

WORK = HERE / "_work" / "quality"
TINY = REPO / "configs" / "tiny.yaml"


def fig(value, unit: str, what: str) -> dict:
    return {"value": value, "unit": unit, "what": what}


def dedup_docs(storage: Path = WORK / "store", run_id: str = "crawl"):
    """The tiny profile's ingest -> normalize -> dedup of the sample crawl (cached by run_stage)."""
    from stages.core.config import load_config
    from stages.core.runner import run_stage

    cfg = load_config(TINY, overrides={"dedup.index": None})
    for stage in ("ingest", "normalize", "dedup"):
        m = run_stage(stage, cfg, str(storage), run_id)
        print(f"{stage}: {m['counts'].get('documents_out')} documents"
              f"{' (cached)' if m.get('skipped') else ''}", flush=True)
    return cfg, m


def heuristics_prefilter(cfg):
    """The filter stage's heuristic chain with the tiny profile's thresholds (datatrove's Gopher repetition, Gopher
    quality, C4, FineWeb filters with Kiln's regex word tokenizer), as a ``train_quality`` prefilter."""
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    from stages.filter import fast_word_tokenizer
    from stages.filter.quality import datatrove_prefilter

    tok, f = fast_word_tokenizer(), cfg.filter
    return datatrove_prefilter([
        GopherRepetitionFilter(language=tok),
        GopherQualityFilter(max_non_alpha_words_ratio=f.gopher_quality.max_non_alpha_words_ratio, language=tok),
        C4QualityFilter(filter_curly_bracket=f.c4_quality.filter_curly_bracket, language=tok),
        FineWebQualityFilter(char_duplicates_ratio=f.fineweb_quality.char_duplicates_ratio, language=tok)])


def measure(cfg, root, prefilter=None) -> dict:
    """train_quality + the block over the documents it scored; timings and the kept documents."""
    from datatrove.data import Document

    from stages.core.runner import StageContext, read_manifest
    from stages.filter.quality import QualityConfig, iter_upstream, quality_block, train_quality

    qc = QualityConfig(enabled=True)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quality-") as tmp:
        ctx = StageContext("filter", "crawl", cfg, root, root.sub("filter-quality-bench"),
                           {"dedup": read_manifest(root, "dedup")}, tmp)
        t0 = time.perf_counter()
        res = train_quality(qc, ctx, prefilter=prefilter)
        train_s = time.perf_counter() - t0
        docs = [Document(text=d.get("text") or "", id=str(d.get("id")), metadata=d.get("metadata") or {})
                for _, _, d in iter_upstream(ctx, "dedup") if prefilter is None or prefilter(d)]
        block = quality_block(qc, res["model_path"], res["cutoff"])
        list(block.run(iter(docs[:10])))  # loads the model
        t0 = time.perf_counter()
        kept = list(block.run(iter(docs)))
        score_s = time.perf_counter() - t0
    return {"res": res, "rep": res["report"], "train_s": train_s, "score_s": score_s, "docs": docs, "kept": kept}


def show(label: str, m: dict) -> None:
    rep, h, n, kept = m["rep"], m["rep"]["heldout"]["at_0.5"], len(m["docs"]), m["kept"]
    ps, ng = rep["positives"], rep["negatives"]
    print(f"\n== {label}: {n} documents scored; {ps['documents']} positives ({ps['train']} train / "
          f"{ps['heldout']} held out), {ng['sampled']} negatives of a pool of {ng['pool']} ({ng['prefiltered_out']} "
          f"prefiltered out, {ng['excluded_as_positive']} excluded as positives)")
    print(f"training: {m['train_s']:.2f} s end to end, fastText subprocess {m['res']['seconds']['train']:.2f} s, "
          f"{rep['training']['attempts']} attempt(s), model {rep['training']['model_bytes'] / 1e6:.1f} MB")
    print(f"held-out at 0.5: precision {h['precision']}  recall {h['recall']}  F1 {h['f1']}  "
          f"(tp {h['tp']} fp {h['fp']} fn {h['fn']} tn {h['tn']})")
    print(f"scoring: {n / m['score_s']:.0f} docs/s (1 core); top 10% cutoff {m['res']['cutoff']:.4f}: "
          f"keeps {len(kept)} of {n}")
    print(f"{'domain':26s} {'docs':>5s} {'mean':>7s} {'p10':>7s} {'p50':>7s} {'p90':>7s} {'kept':>5s} {'share':>6s} "
          f"{'neg':>4s}")
    for dom, d in rep["domains"].items():
        print(f"{dom:26s} {d['documents']:5d} {d['mean']:7.4f} {d['p10']:7.4f} {d['p50']:7.4f} {d['p90']:7.4f} "
              f"{d['kept']:5d} {d['kept_share']:6.3f} {d['training_negatives']:4d}")
    print("top-scored (score, url):")
    for d in sorted(kept, key=lambda d: -d.metadata["quality_score"])[:10]:
        print(f"  {d.metadata['quality_score']:.4f}  {d.metadata.get('url')}")
    print("lowest kept:")
    for d in sorted(kept, key=lambda d: d.metadata["quality_score"])[:3]:
        print(f"  {d.metadata['quality_score']:.4f}  {d.metadata.get('url')}")


def run() -> dict:
    from stages.core.storage import Storage

    cfg, _ = dedup_docs()
    root = Storage(str(WORK / "store")).sub("crawl")
    plain = measure(cfg, root)
    show("all dedup documents (train_quality without prefilter)", plain)
    pre = measure(cfg, root, heuristics_prefilter(cfg))
    show("after the heuristic filters (prefilter: tiny profile's Gopher/C4/FineWeb)", pre)

    figures: dict = {}
    for tag, m, what in (("quality", plain, "quality classifier"),
                         ("quality.prefiltered", pre, "quality classifier after heuristics")):
        rep, h, n = m["rep"], m["rep"]["heldout"]["at_0.5"], len(m["docs"])
        figures |= {
            f"{tag}.train_seconds": fig(round(m["train_s"], 2), "s", f"{what}: train_quality end to end"),
            f"{tag}.fasttext_seconds": fig(m["res"]["seconds"]["train"], "s", f"{what}: fastText training process"),
            f"{tag}.train_attempts": fig(rep["training"]["attempts"], "", f"{what}: training attempts"),
            f"{tag}.precision": fig(h["precision"], "", f"{what}: held-out precision at 0.5 (news vs crawl docs)"),
            f"{tag}.recall": fig(h["recall"], "", f"{what}: held-out recall at 0.5"),
            f"{tag}.f1": fig(h["f1"], "", f"{what}: held-out F1 at 0.5"),
            f"{tag}.heldout_examples": fig(h["tp"] + h["fp"] + h["fn"] + h["tn"], "docs", f"{what}: held-out examples"),
            f"{tag}.docs_per_s": fig(round(n / m["score_s"], 1), "docs/s", f"{what}: block scoring in-process, 1 core"),
            f"{tag}.cutoff_top10": fig(m["res"]["cutoff"], "", f"{what}: score cutoff of the top 10%"),
            f"{tag}.kept_top10": fig(len(m["kept"]), "docs", f"{what}: top 10% kept of {n} documents"),
        }
        for dom, d in rep["domains"].items():
            figures[f"{tag}.kept_share.{dom}"] = fig(d["kept_share"], "", f"{what}: top 10%, share of {dom} kept")
    figures["quality.model_mb"] = fig(round(plain["rep"]["training"]["model_bytes"] / 1e6, 1), "MB",
                                      "quality classifier: model.bin size")
    return figures


if __name__ == "__main__":
    run()
