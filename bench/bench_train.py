"""Training speed: Kiln's train stage beside a nanoGPT-style baseline, same shape, batch, threads and data.

Shape (issue 6): 4 layers, 4 heads, d_model 256, context 256, batch 8 sequences (2,048 tokens per step),
vocabulary 8,192 (the tiny profile's pipeline on the sample crawl, tokenizer at 8,192), bf16 autocast, this
machine's cores (2) as threads in total.

- peak: square bf16 matmuls on all cores (stages/train/flops.py), measured before and after; the larger one
  is the peak both models' MFU is computed against (the conservative choice).
- baseline: nanoGPT's ``model.py`` GPT-2 (learned positions, LayerNorm with bias, GELU MLP x4, tied head,
  dropout 0) with ``torch.compile``, AdamW as nanoGPT configures it on CPU (not fused), bf16 autocast, in this
  process on all cores; batches from the same token shards by the same sampler.
- Kiln: ``run_stage("train")`` (torchrun, gloo) at the same shape and global batch, one rank with all cores and
  two ranks with one core each; the stage's own options (``train.compile``, fused head + loss, fused AdamW).
- tokens/s of both: steady state, from the end of the warm-up steps (which include compilation) to the last
  step, data loading included; rounds interleaved, the best round of each. FLOPs per token = 6·N + 12·L·d·T
  (each model's own N; the two differ by 0.2%).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WORK = HERE / "_work" / "train"
TINY = HERE.parent / "configs" / "tiny.yaml"
L, H, C, T, B, V = 4, 4, 256, 256, 8, 8192
STEPS, WARM = 60, 10  # optimizer steps per measurement; the first WARM are not timed
ROUNDS = int(os.environ.get("KILN_BENCH_ROUNDS", 2))


def fig(value, unit: str, what: str) -> dict:
    return {"value": value, "unit": unit, "what": what}


def nanogpt(vocab: int):
    """nanoGPT's GPT (karpathy/nanoGPT model.py, bias=True, dropout=0), compacted."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            b, t, c = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))  # (b, H, t, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(C), SelfAttention(), nn.LayerNorm(C), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)
            self.lm_head = nn.Linear(C, vocab, bias=False)
            self.wte.weight = self.lm_head.weight
            self.apply(self._init)
            for n, p in self.named_parameters():
                if n.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * L))

        @staticmethod
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

        def optimizer(self):  # nanoGPT's configure_optimizers: decay on >= 2-D params, fused only on CUDA
            decay = [p for p in self.parameters() if p.dim() >= 2]
            rest = [p for p in self.parameters() if p.dim() < 2]
            return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=6e-4, betas=(0.9, 0.95))

    return GPT()


def baseline_tokens_per_s(shards_store, train_shards: list[str], threads: int, seed: int) -> tuple[float, int, float]:
    """nanoGPT baseline: steady tokens/s, FLOPs/token, final loss."""
    import torch

    from stages.core.storage import Storage
    from stages.train.data import BatchSampler, WindowDataset, micro_batches, open_shards

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ds = WindowDataset(open_shards(Storage(shards_store), train_shards, V), T + 1)
    sampler = BatchSampler(len(ds), B, seed)
    model = nanogpt(V)
    n = sum(p.numel() for n_, p in model.named_parameters() if "ln_" not in n_ and "bias" not in n_)
    flops_tok = 6 * (n - T * C) + 12 * L * C * T  # matmul weights (position table is a lookup) + attention
    opt = model.optimizer()
    cmodel = torch.compile(model)
    t0 = None
    for step in range(STEPS):
        if step == WARM:
            t0 = time.perf_counter()
        for x, y in micro_batches(ds, sampler.rank_batch(step, 0, 1), B):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = cmodel(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (STEPS - WARM) * B * T / (time.perf_counter() - t0), flops_tok, loss.item()


def kiln_run(cfg_overrides: dict, store: str, run_id: str) -> dict:
    from stages.core.config import load_config
    from stages.core.runner import run_stage
    from stages.core.storage import Storage

    cfg = load_config(TINY, cfg_overrides)
    m = run_stage("train", cfg, store, run_id, force=True)
    rows = [json.loads(line) for line in Storage(store).sub(run_id, "train").read_bytes("metrics.jsonl").splitlines()]
    first = next(r for r in rows if r["step"] >= WARM)
    last = rows[-1]
    tps = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {"tokens_per_s": tps, "flops_per_token": m["metrics"]["flops_per_token"], "final_loss": last["loss"],
            "peak_in_stage": m["metrics"].get("peak_flops")}


def run() -> dict:
    import torch

    from stages.core.config import load_config
    from stages.core.runner import run_stage
    from stages.core.storage import Storage
    from stages.train.flops import measure_matmul_peak

    cores = len(os.sched_getaffinity(0))
    store, run_id = str(WORK / "store"), "bench"
    data = {"tokenizer.vocab_size": V}
    cfg = load_config(TINY, data)
    for stage in ("ingest", "normalize", "dedup", "filter", "reweight", "tokenizer", "shard"):
        run_stage(stage, cfg, store, run_id)  # cached: skipped while inputs and config are unchanged
    shard = Storage(store).sub(run_id, "shard")
    train_shards = sorted(p for p in shard.list("tokens/train") if p.endswith(".bin"))

    shape = {"train.model.d_model": C, "train.model.n_layers": L, "train.model.n_heads": H, "train.model.seq_len": T,
             "train.global_batch": B, "train.steps": STEPS, "train.warmup_steps": WARM, "train.log_every": 5,
             "train.checkpoint_every": 0, "train.dtype": "bf16", "train.verify_shards": False, **data}
    variants = {"1rank": {"train.nproc": 1, "train.micro_batch": B, "train.threads": cores},
                "2rank": {"train.nproc": 2, "train.micro_batch": B // 2, "train.threads": max(1, cores // 2)}}
    compile_ok = "compile" in type(cfg.train).model_fields
    if compile_ok:
        shape["train.compile"] = True

    peaks = [measure_matmul_peak("bf16", cores, seconds=2.0)]
    base, kiln = [], {k: [] for k in variants}
    for r in range(ROUNDS):
        base.append(baseline_tokens_per_s(shard.url(), train_shards, cores, cfg.run.seed + r))
        print(f"round {r}: nanoGPT baseline {base[-1][0]:,.0f} tokens/s", flush=True)
        for name, v in variants.items():
            kiln[name].append(kiln_run({**shape, **v}, store, run_id))
            print(f"round {r}: kiln {name} {kiln[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    peaks.append(measure_matmul_peak("bf16", cores, seconds=2.0))
    peak = max(peaks)
    torch.set_num_threads(cores)

    b_tps, b_flops, _ = max(base)
    best_name = max(kiln, key=lambda k: max(x["tokens_per_s"] for x in kiln[k]))
    k = max(kiln[best_name], key=lambda x: x["tokens_per_s"])
    k_mfu, b_mfu = k["tokens_per_s"] * k["flops_per_token"] / peak, b_tps * b_flops / peak
    ratio = k["tokens_per_s"] / b_tps
    print(f"bf16 matmul peak ({cores} threads): {peak / 1e9:.0f} GFLOP/s")
    print(f"nanoGPT baseline (torch.compile, bf16): {b_tps:,.0f} tokens/s, {b_tps * b_flops / 1e9:.0f} GFLOP/s, "
          f"MFU {b_mfu:.1%}")
    for name in kiln:
        best = max(x["tokens_per_s"] for x in kiln[name])
        print(f"kiln train stage {name}: {best:,.0f} tokens/s")
    print(f"kiln best ({best_name}): {k['tokens_per_s']:,.0f} tokens/s, "
          f"{k['tokens_per_s'] * k['flops_per_token'] / 1e9:.0f} GFLOP/s")
    print(f"ratio to baseline: {ratio:.2f}x (goal >= 1.2)   MFU vs measured bf16 peak: {k_mfu:.1%} (goal >= 50%)")
    out = {
        "train.peak_gflops": fig(round(peak / 1e9, 1), "GFLOP/s", f"bf16 matmul peak, {cores} threads (square 1024)"),
        "train.baseline_tokens_per_s": fig(round(b_tps), "tokens/s",
                                           "nanoGPT GPT-2 baseline, torch.compile + bf16, L4 H4 d256 T256 B8 V8192"),
        "train.baseline_mfu": fig(round(b_mfu, 3), "", "baseline MFU vs the measured bf16 peak"),
        "train.kiln_tokens_per_s": fig(round(k["tokens_per_s"]), "tokens/s",
                                       f"Kiln train stage ({best_name}), same shape, batch and threads"),
        "train.kiln_mfu": fig(round(k_mfu, 3), "", "Kiln train stage MFU vs the measured bf16 peak (goal ≥ 0.5)"),
        "train.kiln_vs_baseline": fig(round(ratio, 3), "x", "Kiln / nanoGPT baseline tokens/s (goal ≥ 1.2)"),
    }
    for name in kiln:
        out[f"train.kiln_{name}_tokens_per_s"] = fig(round(max(x["tokens_per_s"] for x in kiln[name])), "tokens/s",
                                                     f"Kiln train stage, {name}")
    return out


if __name__ == "__main__":
    run()
