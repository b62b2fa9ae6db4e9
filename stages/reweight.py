"""Reweight: measure the domain mixture and resample it to configured per-domain weights.

Two datatrove pipelines over the filter output. The first counts documents and UTF-8 bytes per domain
(the ``key`` metadata field). The target share of domain i is ``w_i·|D_i| / Σ_j w_j·|D_j|``; the second
pass realises it by sampling: every document of domain i gets the multiplier
``m_i = w_i·N / Σ_j w_j·|D_j|`` (N = all documents, so the output stays ~N documents) and is written
``floor(m_i)`` times plus once more with probability ``frac(m_i)``, decided by a stable hash of
(seed, document id) — the same input and seed always give the same sample. Repeated copies get ids
``<id>#r1``, ``<id>#r2``... Writes ``mixture.json`` (before / target / realised shares) and ``data/``.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError, StageResult

UNKNOWN = "(none)"  # bucket for documents without the domain key
_COPY = re.compile(r"#r\d+$")


class Config(Strict):
    key: str = "domain"  # metadata field that defines a domain
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)  # domain -> document weight
    default_weight: float = Field(1.0, ge=0)  # weight of domains not listed in `weights`


def stable_unit(*parts) -> float:
    """A deterministic uniform number in [0, 1) from ``parts`` (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def base_id(doc_id: str) -> str:
    """The id of the original document behind a reweighting copy (``abc#r2`` -> ``abc``)."""
    return _COPY.sub("", doc_id)


def copies_for(multiplier: float, seed: int, doc_id: str) -> int:
    """floor(m) copies, plus one more with probability frac(m), decided by a stable hash."""
    whole = math.floor(multiplier)
    return whole + (stable_unit("reweight", seed, doc_id) < multiplier - whole)


def _domain(doc, key: str) -> str:
    value = doc.metadata.get(key)
    return str(value) if value not in (None, "") else UNKNOWN


def _blocks():
    """datatrove blocks defined lazily: importing this module must stay cheap."""
    from datatrove.pipeline.base import PipelineStep

    class DomainStats(PipelineStep):
        """Counts documents and bytes per domain (stats ``docs:<domain>``, ``bytes:<domain>``); no change."""

        name = "domain stats"
        type = "📊 - STATS"

        def __init__(self, key: str):
            super().__init__()
            self.key = key

        def run(self, data, rank: int = 0, world_size: int = 1):
            for doc in data:
                dom = _domain(doc, self.key)
                self.stat_update(f"docs:{dom}")
                self.stat_update(f"bytes:{dom}", value=len(doc.text.encode("utf-8")))
                yield doc

    class DomainSampler(PipelineStep):
        """Emits each document ``copies_for(m_domain)`` times; copies after the first get ``#rN`` ids."""

        name = "domain sampler"
        type = "🔻 - FILTER"

        def __init__(self, key: str, multipliers: dict[str, float], default: float, seed: int):
            super().__init__()
            self.key, self.multipliers, self.default, self.seed = key, multipliers, default, seed

        def run(self, data, rank: int = 0, world_size: int = 1):
            from dataclasses import replace

            for doc in data:
                n = copies_for(self.multipliers.get(_domain(doc, self.key), self.default), self.seed, doc.id)
                if n == 0:
                    self.stat_update("downsampled")
                    continue
                self.stat_update("upsampled", value=n - 1)
                yield doc
                for k in range(1, n):
                    yield replace(doc, id=f"{doc.id}#r{k}", metadata=dict(doc.metadata))

    return DomainStats, DomainSampler


def _per_domain(block: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for stat, value in block.items():
        kind, _, dom = stat.partition(":")
        if kind in ("docs", "bytes") and dom:
            out.setdefault(dom, {"docs": 0, "bytes": 0})[kind] = int(value)
    return out


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import block_stats, data_result, output_steps, run_pipeline, upstream_reader

    DomainStats, DomainSampler = _blocks()
    src = ctx.input("filter").datafolder("data")
    if not ctx.input_files("filter", prefix="data/"):
        raise StageError(f"reweight: the filter manifest in {ctx.input('filter').url()} lists no data/ files")

    # pass 1: the mixture as it is
    stats1 = run_pipeline(ctx, [upstream_reader(ctx, "filter", add_file_path=False), DomainStats(cfg.key)], name="measure")
    before = _per_domain(block_stats(stats1, "domain stats"))
    n_docs = sum(d["docs"] for d in before.values())
    if n_docs == 0:
        raise StageError(f"reweight: no documents in {src.path}")
    weight = {dom: cfg.weights.get(dom, cfg.default_weight) for dom in before}
    mass = sum(weight[dom] * d["docs"] for dom, d in before.items())
    if mass <= 0:
        raise StageError(f"reweight: every domain present ({', '.join(sorted(before))}) has weight 0")
    mult = {dom: weight[dom] * n_docs / mass for dom in before}

    # pass 2: sample to the target mixture
    sampler = DomainSampler(cfg.key, mult, cfg.default_weight * n_docs / mass, ctx.cfg.run.seed)
    steps = [upstream_reader(ctx, "filter", add_file_path=False), sampler, DomainStats(cfg.key), *output_steps(ctx)]
    stats2 = run_pipeline(ctx, steps, name="sample")
    after = _per_domain(block_stats(stats2, "domain stats"))
    n_out = sum(d["docs"] for d in after.values())

    domains = {}
    for dom in sorted(before, key=lambda d: (-before[d]["docs"], d)):
        b, a = before[dom], after.get(dom, {"docs": 0, "bytes": 0})
        domains[dom] = {
            "weight": weight[dom], "multiplier": round(mult[dom], 6),
            "docs": b["docs"], "bytes": b["bytes"], "est_tokens_bytes_div_4": b["bytes"] // 4,
            "share_before": round(b["docs"] / n_docs, 6),
            "share_target": round(weight[dom] * b["docs"] / mass, 6),
            "docs_after": a["docs"], "bytes_after": a["bytes"],
            "share_after": round(a["docs"] / n_out, 6),
        }
    unused = sorted(set(cfg.weights) - set(before))
    mixture = {"key": cfg.key, "seed": ctx.cfg.run.seed, "default_weight": cfg.default_weight,
               "documents_in": n_docs, "documents_out": n_out,
               "note": "shares are shares of documents; est_tokens is bytes/4, an estimate",
               "weights_for_absent_domains": unused, "domains": domains}
    ctx.out.write_json("mixture.json", mixture)

    sampler = block_stats(stats2, "domain sampler")
    metrics = {"domains": len(domains),
               "max_share_error": max(abs(d["share_after"] - d["share_target"]) for d in domains.values()),
               "mixture": {d: {k: v[k] for k in ("share_before", "share_target", "share_after")}
                           for d, v in domains.items()},
               "blocks": {"measure": stats1, "sample": stats2}}
    return data_result(ctx, stats2, n_docs, {"downsampled": int(sampler.get("downsampled", 0))},
                       extra_outputs=("mixture.json",), metrics=metrics,
                       added={"upsampled": int(sampler.get("upsampled", 0))})
