"""Chinchilla planner: compute-optimal model size and tokens, and what the current dataset holds against them.

Hoffmann et al. (2022): for a training budget of C FLOPs the loss-optimal model has N parameters and sees
D ≈ 20·N tokens, with C ≈ 6·N·D (forward + backward). Hence from a budget ``N = sqrt(C / 120)``,
``D = 20·N``; from a size ``D = 20·N``, ``C = 6·N·D``. ``kiln plan`` prints these, the profile's own model
(parameters counted on the meta device, no memory) and the training tokens of a run's shards.
"""

from __future__ import annotations

import math

TOKENS_PER_PARAM = 20.0
FLOPS_PER_PARAM_TOKEN = 6.0


def chinchilla(compute: float | None = None, params: float | None = None) -> dict:
    """{"compute", "params", "tokens"} from either a FLOP budget or a parameter count."""
    if (compute is None) == (params is None):
        raise ValueError("give exactly one of compute (FLOPs) or params")
    if compute is not None:
        if compute <= 0:
            raise ValueError("compute must be > 0 FLOPs")
        n = math.sqrt(compute / (FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM))
        return {"compute": float(compute), "params": n, "tokens": TOKENS_PER_PARAM * n}
    if params <= 0:
        raise ValueError("params must be > 0")
    d = TOKENS_PER_PARAM * params
    return {"compute": FLOPS_PER_PARAM_TOKEN * params * d, "params": float(params), "tokens": d}


def profile_params(model_cfg: dict, vocab_size: int) -> int:
    """Parameters of the profile's GPT (tied embedding counted once), built on the meta device."""
    import torch

    from stages.train.model import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig.from_dict({**model_cfg, "vocab_size": vocab_size})).num_params()


def human(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def plan(cfg, compute: float | None, params: float | None, shard_manifest: dict | None,
         tokenizer_manifest: dict | None) -> dict:
    """The planner's numbers for the CLI (see module docstring). With neither compute nor params, the
    profile's model size is the target."""
    vocab = (tokenizer_manifest or {}).get("metrics", {}).get("vocab_size") or cfg.tokenizer.vocab_size
    n_profile = profile_params(cfg.train.model.model_dump(), vocab)
    target = chinchilla(compute, params) if (compute or params) else chinchilla(params=n_profile)
    out = {"target": target, "profile": {"params": n_profile, "vocab_size": vocab,
                                         "tokens_optimal": TOKENS_PER_PARAM * n_profile}}
    if shard_manifest is not None:
        tokens = int(shard_manifest["counts"]["tokens_train"])
        out["dataset"] = {"tokens_train": tokens, "share_of_target": tokens / target["tokens"],
                          "epochs_for_target": target["tokens"] / tokens if tokens else math.inf}
    return out


def render(p: dict, where: str) -> str:
    t, m = p["target"], p["profile"]
    lines = ["Chinchilla (≈20 tokens per parameter, C ≈ 6·N·D):",
             f"  compute  C = {t['compute']:.3e} FLOPs",
             f"  params   N = {human(t['params'])} ({t['params']:,.0f})",
             f"  tokens   D = {human(t['tokens'])} ({t['tokens']:,.0f})",
             f"profile model: {human(m['params'])} parameters (vocabulary {m['vocab_size']:,}); compute-optimal "
             f"with {human(m['tokens_optimal'])} tokens"]
    d = p.get("dataset")
    if d is None:
        lines.append(f"dataset: no shard manifest in {where} (run the stages up to shard first)")
    else:
        lines.append(f"dataset: {d['tokens_train']:,} training tokens in {where}: {d['share_of_target']:.2%} of D "
                     f"({d['epochs_for_target']:,.1f} epochs of it would reach D)")
    return "\n".join(lines)
