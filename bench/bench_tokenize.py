"""Tokenizer training and sharding: train time, bytes per token, and the shard stage's tokenization speed beside
raw sentencepiece batch encoding of the same text with the same threads.

Input: the sample crawl through the tiny profile's ingest -> normalize -> dedup -> filter -> reweight (cached in
bench/_work/tokenize/store; run_stage skips stages whose inputs and config did not change).

- tokenizer: the tokenizer stage (sentencepiece BPE, the profile's vocabulary and sample cap), its training
  seconds (from stats.json) and bytes/token on held-out documents.
- raw sentencepiece: all reweighted texts in memory, one ``encode(texts, num_threads=cores)`` call: MB/s of
  UTF-8 text (best of 3).
- shard stage: run_stage("shard") end to end (read JSONL, encode, write token shards + index, Parquet with
  zstd, manifest with sha256 of every file), MB/s of the same text (best of 3). The issue's goal: ≥ 0.9x raw.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WORK = HERE / "_work" / "tokenize"
TINY = HERE.parent / "configs" / "tiny.yaml"


def fig(value, unit: str, what: str) -> dict:
    return {"value": value, "unit": unit, "what": what}


def run() -> dict:
    import sentencepiece as spm

    from stages.core.config import load_config
    from stages.core.runner import run_stage
    from stages.core.storage import Storage

    cfg = load_config(TINY)
    store, run_id = str(WORK / "store"), "bench"
    for stage in ("ingest", "normalize", "dedup", "filter", "reweight"):
        run_stage(stage, cfg, store, run_id)
    tok_m = run_stage("tokenizer", cfg, store, run_id, force=True)
    stats = Storage(store).sub(run_id, "tokenizer").read_json("stats.json")
    rw = Storage(store).sub(run_id, "reweight")
    texts = [json.loads(line)["text"] for rel in rw.list("data", suffix=".jsonl.gz")
             for line in gzip.decompress(rw.read_bytes(rel)).splitlines()]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    sp = spm.SentencePieceProcessor(model_proto=Storage(store).sub(run_id, "tokenizer").read_bytes("tokenizer.model"))
    cores = len(os.sched_getaffinity(0))

    raw, stage = [], []
    for _ in range(3):
        t = time.perf_counter()
        ids = sp.encode(texts, num_threads=cores)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        m = run_stage("shard", cfg, store, run_id, force=True)
        stage.append(time.perf_counter() - t)
    n_tok = sum(map(len, ids))
    raw_mbs, stage_mbs = mb / min(raw), mb / min(stage)
    print(f"tokenizer: {stats['train_seconds']:.2f} s to train on {stats['sample_bytes'] / 1e6:.1f} MB, "
          f"{stats['bytes_per_token']:.2f} bytes/token held out, byte fallback {stats['byte_fallback_share']:.4f}, "
          f"HF export agreement {stats.get('hf_agreement')}")
    print(f"text: {mb:.1f} MB, {len(texts):,} documents, {n_tok:,} tokens; {cores} cores")
    print(f"raw sentencepiece encode ({cores} threads): {raw_mbs:.2f} MB/s   shard stage: {stage_mbs:.2f} MB/s   "
          f"ratio {stage_mbs / raw_mbs:.2f} (goal ≥ 0.9)")
    return {
        "tokenize.train_seconds": fig(stats["train_seconds"], "s", "tokenizer: sentencepiece BPE training time"),
        "tokenize.sample_mb": fig(round(stats["sample_bytes"] / 1e6, 2), "MB", "tokenizer: training sample"),
        "tokenize.bytes_per_token": fig(stats["bytes_per_token"], "B/token", "tokenizer: held-out bytes per token"),
        "tokenize.hf_agreement": fig(stats.get("hf_agreement"), "",
                                     "tokenizer: share of held-out docs the HF export encodes identically"),
        "tokenize.raw_mb_per_s": fig(round(raw_mbs, 2), "MB/s", f"raw sentencepiece batch encode, {cores} threads"),
        "tokenize.shard_mb_per_s": fig(round(stage_mbs, 2), "MB/s", "shard stage end to end, same text"),
        "tokenize.shard_vs_raw": fig(round(stage_mbs / raw_mbs, 3), "x", "shard stage / raw encode (goal ≥ 0.9)"),
        "tokenize.tokenizer_stage_seconds": fig(tok_m["wall_time_s"], "s", "tokenizer stage wall time"),
    }


if __name__ == "__main__":
    run()
