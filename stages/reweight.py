"""Reweight: measure the domain mixture in tokens and resample it to a target mixture, exactly and reproducibly.

Domains come from ``key``: a metadata field (``domain``: the host name from ingest), or a derived key:
``registered_domain`` (eTLD+1 of ``metadata.url`` with tldextract's bundled public-suffix list, offline:
docs.python.org -> python.org), ``source`` (input file), ``language`` (normalize's lid.176 label) or
``quality_bucket`` (``metadata.quality_score`` cut at ``quality_edges``: ``q0.4-0.6``). Documents without
the key form the bucket ``(none)``.

Sizes are estimated tokens, ``n_i = bytes_i / bytes_per_token`` (the tokenizer is trained after this stage;
its stats report the real bytes per token per domain). The target share of domain i is

    p_i ∝ w_i · n_i^(1/T)

``weights`` w_i (``default_weight`` for unlisted domains) with temperature T = 1 is the configured mixture
``P(i) = w_i·|D_i| / Σ_j w_j·|D_j|``; all weights 1 with T > 1 is temperature sampling (T → ∞: uniform).
The output holds ``total_tokens`` (default: as many as the input) split by p; no domain is repeated more
than ``max_epochs`` times: a capped domain gets exactly ``max_epochs`` epochs and its excess goes to the
others in proportion to their p (water-filling; if every domain is capped the output is smaller, reported).

Realisation: domain i's target T_i is ``floor(T_i / n_i)`` full copies of every document plus a *prefix* of
its documents in a fixed pseudo-random order (a stable hash of seed and document id), the prefix whose size
is closest to the remainder. So the realised tokens of every domain are within half a document of its target
(not a Bernoulli sample's ±√n), the same input and seed always give the same documents, and another seed
another prefix. Two datatrove passes: the first measures every document's domain, size and hash (numbers
only, written per task to scratch), the second writes each document its number of times; copies after the
first get ids ``<id>#r1``, ``<id>#r2``… Writes ``mixture.json`` (per domain: documents, bytes, tokens, share
before / target / after, epochs, capped) — the train stage logs it as part of the lineage — and ``data/``.

Whatever the key, ``mixture.json`` also has the language mix before and after (``languages``: per
``metadata.language``, normalize's lid.176 label, which filter keeps; ``(none)`` without one): documents, bytes,
estimated tokens and share of estimated tokens, the output's counted with every reweighting copy. Gathered
like the domain counts after: block stats (``lang_docs:<lang>``, ``lang_bytes:<lang>``) of both passes, summed
over tasks by ``run_pipeline`` whatever the executor; the measured totals are checked against the documents read.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Annotated

from pydantic import Field

from stages.core.config import Edges, Strict
from stages.core.runner import StageContext, StageError, StageResult

UNKNOWN = "(none)"  # bucket for documents without the domain key
DERIVED_KEYS = ("registered_domain", "source", "language", "quality_bucket")
_COPY = re.compile(r"#r\d+$")


class Config(Strict):
    # metadata field that defines a domain, or a derived key: registered_domain | source | language | quality_bucket
    key: str = "domain"
    quality_edges: Edges = [0.2, 0.4, 0.6, 0.8]  # quality_bucket: cut points of metadata.quality_score
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)  # domain -> weight
    default_weight: float = Field(1.0, ge=0)  # weight of domains not listed in `weights`
    temperature: float = Field(1.0, gt=0)  # p_i ∝ w_i·n_i^(1/T): 1 = configured weights, >1 flattens
    max_epochs: float | None = Field(4.0, gt=0)  # no domain repeated more often than this (null: no cap)
    total_tokens: int | None = Field(None, ge=1)  # output size in estimated tokens (null: the input's)
    bytes_per_token: float = Field(4.0, gt=0)  # token estimate before the tokenizer exists


def stable_unit(*parts) -> float:
    """A deterministic uniform number in [0, 1) from ``parts`` (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def base_id(doc_id: str) -> str:
    """The id of the original document behind a reweighting copy (``abc#r2`` -> ``abc``)."""
    return _COPY.sub("", doc_id)


def language_of(metadata: dict) -> str:
    """The document's language label (``UNKNOWN`` when it has none), the same bucket as ``key: language``."""
    value = metadata.get("language")
    return str(value) if value not in (None, "") else UNKNOWN


def domain_of(metadata: dict, cfg: Config, _tld=[]) -> str:  # noqa: B006 (the extractor, built once)
    """The document's domain under ``cfg.key`` (``UNKNOWN`` when it has none)."""
    if cfg.key == "registered_domain":
        if not _tld:
            import tldextract

            _tld.append(tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None))  # bundled list, offline
        value = _tld[0](metadata.get("url") or "").top_domain_under_public_suffix
    elif cfg.key == "quality_bucket":
        q = metadata.get("quality_score")
        if q is None:
            return UNKNOWN
        edges = [-math.inf, *cfg.quality_edges, math.inf]
        k = next(i for i in range(len(edges) - 1) if q < edges[i + 1])
        lo, hi = edges[k], edges[k + 1]
        value = f"q{'' if lo == -math.inf else lo}-{'' if hi == math.inf else hi}"
    else:
        value = metadata.get(cfg.key)
    return str(value) if value not in (None, "") else UNKNOWN


def targets(sizes: dict[str, float], weight: dict[str, float], temperature: float, max_epochs: float | None,
            total: float) -> tuple[dict[str, float], dict[str, float], set[str]]:
    """(target share p_i, target size T_i, capped domains): p_i ∝ w_i·n_i^(1/T), T_i = p_i·total, with
    T_i ≤ max_epochs·n_i and the excess of capped domains spread over the others by p (water-filling)."""
    raw = {d: weight[d] * sizes[d] ** (1 / temperature) if sizes[d] > 0 else 0.0 for d in sizes}
    mass = sum(raw.values())
    if mass <= 0:
        raise StageError(f"reweight: every domain present ({', '.join(sorted(sizes))}) has weight 0")
    p = {d: r / mass for d, r in raw.items()}
    goal, free, left, capped = {}, {d for d in p if p[d] > 0}, total, set()
    while free:
        mass_free = sum(p[d] for d in free)
        over = {d for d in free if max_epochs is not None and left * p[d] / mass_free > max_epochs * sizes[d]}
        if not over:
            goal.update({d: left * p[d] / mass_free for d in free})
            break
        for d in over:
            goal[d] = max_epochs * sizes[d]
            left -= goal[d]
        free -= over
        capped |= over
    return p, {d: goal.get(d, 0.0) for d in sizes}, capped


def plan_domain(units, sizes, goal: float) -> tuple[int, float]:
    """(full copies, hash cutoff) realising ``goal`` bytes from documents of ``sizes`` (numpy arrays): every
    document ``copies`` times, plus once more if its hash unit ≤ cutoff, the cutoff chosen so the extra
    documents (taken in hash order) come closest to the remainder."""
    import numpy as np

    total = float(sizes.sum())
    if total <= 0 or goal <= 0:
        return 0, -1.0
    copies = int(goal // total)
    rest = goal - copies * total
    order = np.argsort(units, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(sizes[order], dtype=np.float64)])
    k = int(np.argmin(np.abs(cum - rest)))
    return copies, float(units[order[k - 1]]) if k else -1.0


def _blocks():
    """datatrove blocks defined lazily: importing this module must stay cheap."""
    from datatrove.pipeline.base import PipelineStep

    class DomainMeasure(PipelineStep):
        """Per document: domain, UTF-8 bytes and hash unit, written per task to ``scratch/<rank>.npz``;
        stats ``docs:<domain>``, ``bytes:<domain>``, ``lang_docs:<language>``, ``lang_bytes:<language>``."""

        name = "domain measure"
        type = "📊 - STATS"

        def __init__(self, cfg: Config, seed: int, scratch: str):
            super().__init__()
            self.cfg, self.seed, self.scratch = cfg, seed, scratch

        def run(self, data, rank: int = 0, world_size: int = 1):
            import numpy as np

            doms, units, sizes = [], [], []
            for doc in data:
                dom = domain_of(doc.metadata, self.cfg)
                size = len(doc.text.encode("utf-8"))
                doms.append(dom)
                units.append(stable_unit("reweight", self.seed, doc.id))
                sizes.append(size)
                self.stat_update(f"docs:{dom}")
                self.stat_update(f"bytes:{dom}", value=size)
                lang = language_of(doc.metadata)
                self.stat_update(f"lang_docs:{lang}")
                self.stat_update(f"lang_bytes:{lang}", value=size)
            os.makedirs(self.scratch, exist_ok=True)
            np.savez(os.path.join(self.scratch, f"{rank:05d}.npz"), domain=np.array(doms, dtype=str),
                     unit=np.array(units, dtype=np.float64), size=np.array(sizes, dtype=np.int64))
            yield from ()  # the last block of its pipeline: nothing goes on

    class DomainSampler(PipelineStep):
        """Emits each document ``copies + (unit ≤ cutoff)`` times (plan per domain); copies after the first
        get ``#rN`` ids; stats ``docs:<domain>`` / ``bytes:<domain>`` and ``lang_docs:<language>`` /
        ``lang_bytes:<language>`` of the output (copies included)."""

        name = "domain sampler"
        type = "🔻 - FILTER"

        def __init__(self, cfg: Config, plan: dict[str, tuple[int, float]], seed: int):
            super().__init__()
            self.cfg, self.plan, self.seed = cfg, plan, seed

        def run(self, data, rank: int = 0, world_size: int = 1):
            from dataclasses import replace

            for doc in data:
                dom = domain_of(doc.metadata, self.cfg)
                copies, cutoff = self.plan.get(dom, (0, -1.0))
                n = copies + (stable_unit("reweight", self.seed, doc.id) <= cutoff)
                if n == 0:
                    self.stat_update("downsampled")
                    continue
                self.stat_update("upsampled", value=n - 1)
                size = len(doc.text.encode("utf-8"))
                self.stat_update(f"docs:{dom}", value=n)
                self.stat_update(f"bytes:{dom}", value=n * size)
                lang = language_of(doc.metadata)
                self.stat_update(f"lang_docs:{lang}", value=n)
                self.stat_update(f"lang_bytes:{lang}", value=n * size)
                yield doc
                for k in range(1, n):
                    yield replace(doc, id=f"{doc.id}#r{k}", metadata=dict(doc.metadata))

    return DomainMeasure, DomainSampler


def _per_domain(block: dict, prefix: str = "") -> dict[str, dict[str, int]]:
    """{value: {"docs", "bytes"}} from a block's ``<prefix>docs:<value>`` / ``<prefix>bytes:<value>`` stats."""
    out: dict[str, dict[str, int]] = {}
    for stat, value in block.items():
        kind, _, dom = stat.partition(":")
        if kind in (f"{prefix}docs", f"{prefix}bytes") and dom:
            out.setdefault(dom, {"docs": 0, "bytes": 0})[kind[len(prefix):]] = int(value)
    return out


def language_mix(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], bpt: float) -> dict:
    """Per language (most estimated tokens before first): documents, bytes, estimated tokens and share of
    estimated tokens before and after reweighting."""
    zero = {"docs": 0, "bytes": 0}
    tot_b = sum(v["bytes"] for v in before.values())
    tot_a = sum(v["bytes"] for v in after.values())
    out = {}
    for lang in sorted(set(before) | set(after), key=lambda x: (-before.get(x, zero)["bytes"], x)):
        b, a = before.get(lang, zero), after.get(lang, zero)
        out[lang] = {"docs_before": b["docs"], "docs_after": a["docs"], "bytes_before": b["bytes"],
                     "bytes_after": a["bytes"], "est_tokens_before": round(b["bytes"] / bpt),
                     "est_tokens_after": round(a["bytes"] / bpt),
                     "share_before": round(b["bytes"] / tot_b, 6) if tot_b else 0.0,
                     "share_after": round(a["bytes"] / tot_a, 6) if tot_a else 0.0}
    return out


def run(cfg: Config, ctx: StageContext) -> StageResult:
    import numpy as np

    from stages.core.pipeline import (block_stats, check_upstream_read, data_result, output_steps, run_pipeline,
                                      upstream_reader)


    DomainMeasure, DomainSampler = _blocks()
    if not ctx.input_files("filter", prefix="data/"):
        raise StageError(f"reweight: the filter manifest in {ctx.input('filter').url()} lists no data/ files")
    seed = ctx.cfg.run.seed

    # pass 1: the mixture as it is (numbers per document to scratch)
    scratch = os.path.join(ctx.workdir, "measure")
    stats1 = run_pipeline(ctx, [upstream_reader(ctx, "filter", add_file_path=False),
                                DomainMeasure(cfg, seed, scratch)], name="measure")
    parts = [np.load(os.path.join(scratch, f)) for f in sorted(os.listdir(scratch))]
    doms = np.concatenate([p["domain"] for p in parts])
    units = np.concatenate([p["unit"] for p in parts])
    sizes = np.concatenate([p["size"] for p in parts])
    check_upstream_read(ctx, "filter", int(doms.size))
    if doms.size == 0:
        raise StageError(f"reweight: no documents in {ctx.input('filter').url('data')}")
    names = sorted(set(doms.tolist()))
    by = {d: np.flatnonzero(doms == d) for d in names}
    nbytes = {d: float(sizes[i].sum()) for d, i in by.items()}
    weight = {d: cfg.weights.get(d, cfg.default_weight) for d in names}
    total = cfg.total_tokens * cfg.bytes_per_token if cfg.total_tokens else sum(nbytes.values())
    p, goal, capped = targets(nbytes, weight, cfg.temperature, cfg.max_epochs, total)
    plan = {d: plan_domain(units[by[d]], sizes[by[d]].astype(np.float64), goal[d]) for d in names}

    # pass 2: write every document its number of times
    steps = [upstream_reader(ctx, "filter", add_file_path=False), DomainSampler(cfg, plan, seed), *output_steps(ctx)]
    stats2 = run_pipeline(ctx, steps, name="sample")
    after = _per_domain(block_stats(stats2, "domain sampler"))
    out_bytes = sum(a["bytes"] for a in after.values())
    in_bytes = sum(nbytes.values())

    bpt = cfg.bytes_per_token
    langs_in = _per_domain(block_stats(stats1, "domain measure"), "lang_")
    if sum(v["docs"] for v in langs_in.values()) != doms.size:  # the stats and the scratch files saw the same
        raise StageError(f"reweight: language counts of the measuring pass cover "
                         f"{sum(v['docs'] for v in langs_in.values())} documents, {doms.size} were measured")
    languages = language_mix(langs_in, _per_domain(block_stats(stats2, "domain sampler"), "lang_"), bpt)
    domains = {}
    for d in sorted(names, key=lambda d: (-nbytes[d], d)):
        a = after.get(d, {"docs": 0, "bytes": 0})
        domains[d] = {
            "weight": weight[d], "docs": int(by[d].size), "bytes": int(nbytes[d]), "est_tokens": round(nbytes[d] / bpt),
            "share_before": round(nbytes[d] / in_bytes, 6), "share_target": round(goal[d] / sum(goal.values()), 6),
            "share_unconstrained": round(p[d], 6), "capped": d in capped,
            "epochs_target": round(goal[d] / nbytes[d], 4) if nbytes[d] else 0.0,
            "docs_after": a["docs"], "bytes_after": a["bytes"], "est_tokens_after": round(a["bytes"] / bpt),
            "share_after": round(a["bytes"] / out_bytes, 6) if out_bytes else 0.0,
            "epochs": round(a["bytes"] / nbytes[d], 4) if nbytes[d] else 0.0,
        }
    max_err = max(abs(v["share_after"] - v["share_target"]) for v in domains.values())
    mixture = {"key": cfg.key, "seed": seed, "temperature": cfg.temperature, "max_epochs": cfg.max_epochs,
               "default_weight": cfg.default_weight, "bytes_per_token": bpt,
               "documents_in": int(doms.size), "documents_out": sum(a["docs"] for a in after.values()),
               "est_tokens_in": round(in_bytes / bpt), "est_tokens_target": round(sum(goal.values()) / bpt),
               "est_tokens_out": round(out_bytes / bpt), "max_share_error": round(max_err, 6),
               "note": "shares are shares of estimated tokens (UTF-8 bytes / bytes_per_token); epochs = times a "
                       "domain's tokens are seen",
               "weights_for_absent_domains": sorted(set(cfg.weights) - set(names)), "domains": domains,
               "languages": languages}
    ctx.out.write_json("mixture.json", mixture)

    sampler = block_stats(stats2, "domain sampler")
    metrics = {"domains": len(domains), "max_share_error": mixture["max_share_error"],
               "mixture": {d: {k: v[k] for k in ("share_before", "share_target", "share_after", "epochs")}
                           for d, v in domains.items()},
               "languages": {x: {k: v[k] for k in ("docs_before", "docs_after", "share_before", "share_after")}
                             for x, v in languages.items()},
               "blocks": {"measure": stats1, "sample": stats2}}
    return data_result(ctx, stats2, int(doms.size), {"downsampled": int(sampler.get("downsampled", 0))},
                       extra_outputs=("mixture.json",), metrics=metrics,
                       added={"upsampled": int(sampler.get("upsampled", 0))})
