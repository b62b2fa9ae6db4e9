"""Whole-pipeline timing: every stage of the tiny profile on the full sample crawl (2,391 pages),
run one after another on this machine's cores, from a cold artifact folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from stages import STAGES
from stages.core.config import load_config
from stages.core.runner import run_stage

REPO = Path(__file__).resolve().parents[1]


def run() -> dict:
    work = REPO / "bench" / "_work" / "pipeline"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    figures, t0 = {}, time.time()
    manifests = {}
    for stage in STAGES:
        m = run_stage(stage, cfg, str(work), "bench")
        manifests[stage] = m
        figures[f"pipeline.{stage}.seconds"] = {"value": m["wall_time_s"], "unit": "s",
                                                "what": f"{stage} stage, tiny profile, sample crawl"}
    figures["pipeline.total.seconds"] = {"value": round(time.time() - t0, 1), "unit": "s",
                                         "what": "whole DAG (no Prefect), tiny profile, sample crawl"}
    ing = manifests["ingest"]["counts"]
    figures["pipeline.ingest.docs_per_s"] = {"value": round(ing["documents_out"] / manifests["ingest"]["wall_time_s"], 1),
                                             "unit": "docs/s", "what": "ingest (WARC read + main-text extraction, default extractor)"}
    tr = manifests["train"]
    if "tokens_per_s" in tr.get("metrics", {}):
        figures["pipeline.train.tokens_per_s"] = {"value": tr["metrics"]["tokens_per_s"], "unit": "tokens/s",
                                                  "what": "training throughput, tiny model, 2 ranks gloo"}
    if "mfu" in tr.get("metrics", {}):
        figures["pipeline.train.mfu"] = {"value": tr["metrics"]["mfu"], "unit": "",
                                         "what": "tiny model MFU vs the measured bf16 matmul peak (d128: small matmuls)"}
        figures["pipeline.train.peak_gflops"] = {"value": round(tr["metrics"]["peak_flops"] / 1e9, 1),
                                                 "unit": "GFLOP/s", "what": "measured bf16 matmul peak, 2 threads"}
    return figures
