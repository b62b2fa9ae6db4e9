"""filter: drop documents by language, URL, datatrove's heuristic filters and a quality classifier; redact PII.

Order: language (stages/filter/language.py) → url → gopher_repetition → gopher_quality → c4_quality →
fineweb_quality (stages/filter/heuristics.py: datatrove's filters, each switchable and parameterized in the
profile) → quality (stages/filter/quality.py: a fastText classifier trained in this stage on the documents the
heuristics kept, so its negatives and its top-percent pool are the documents it will judge; two passes, the
first one's survivors in a scratch folder of the stage removed at the end) → PII (stages/filter/pii.py: typed
placeholders for emails, phones, IPs, cards, IBANs, SSNs, secrets; counts per kind in ``counts.redacted``).
The heuristic filters run in one
block (``FilterChain``) that picks per-domain thresholds (``filter.per_domain``) and records, per filter:
documents removed (``counts.removed``), the filter's own reasons (``counts.removed_reasons``, also
``metrics.reasons``), whitespace words and UTF-8 bytes removed (``counts.removed_words`` / ``removed_bytes``),
estimated tokens removed (``counts.removed_tokens_est`` = bytes / 4, the usual ~4 bytes per BPE token of
English web text; no tokenizer exists yet at this stage of the DAG), bytes C4 cut from kept documents with
``remove_lines`` (``metrics.bytes_cut``), seconds per filter (``metrics.seconds``; the quality classifier's
training and scoring: ``metrics.quality_seconds``, never in an output file), and a deterministic sample
of removed documents in ``removed_samples.jsonl.gz`` (filter, reason, id, url, domain, language, words, bytes,
first lines with email / public IP addresses replaced).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError, StageResult
from stages.filter.heuristics import (C4Quality, FineWebQuality, GopherQuality, GopherRepetition, URL,  # noqa: F401
                                      build_heuristic, fast_word_tokenizer, merge_samples, shared_word_tokenizer)
from stages.filter.language import Language, build_language_filter
from stages.filter.pii import PIIConfig
from stages.filter.quality import QualityConfig

ORDER = ("language", "url", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
SAMPLES = "removed_samples.jsonl.gz"
_TASK_SAMPLES = "removed_samples_tasks"
_PASS1 = "heuristics_pass"  # scratch: documents that passed the heuristics (quality classifier on)


class Config(Strict):
    # words for the filters' statistics: "regex" (see fast_word_tokenizer) or "spacy" (datatrove's default
    # spacy.blank tokenizer for `spacy_language`, 4-10x slower on this crawl: it rebuilds its lexicon per document)
    word_tokenizer: Literal["regex", "spacy"] = "regex"
    spacy_language: str = "en"
    language: Language = Language()
    url: URL = URL()
    gopher_repetition: GopherRepetition = GopherRepetition()
    gopher_quality: GopherQuality = GopherQuality()
    c4_quality: C4Quality = C4Quality()
    fineweb_quality: FineWebQuality = FineWebQuality()
    # {domain: {filter: {setting: value}}}: overrides for documents whose metadata.domain is the domain or one
    # of its subdomains (the longest listed match wins), e.g. {docs.python.org: {gopher_quality:
    # {max_non_alpha_words_ratio: 0.6}}}; validated like the sections themselves (unknown keys rejected)
    per_domain: dict[str, dict[str, dict[str, Any]]] = {}
    samples_per_filter: int = Field(20, ge=0)  # removed documents kept per filter in removed_samples.jsonl.gz
    sample_lines: int = Field(5, ge=1)  # first lines of each sampled document (at most 600 characters)
    # fastText quality classifier trained in the run (stages/filter/quality.py); after the heuristics
    quality: QualityConfig = QualityConfig()
    pii: PIIConfig = PIIConfig()  # typed-placeholder redaction of the survivors (stages/filter/pii.py)
    min_documents_out: int = Field(1, ge=1)  # fewer survivors is an error naming the filter that removed most

    @model_validator(mode="after")
    def _check_per_domain(self):
        for domain, sections in self.per_domain.items():
            for key in sections:
                if key not in ORDER:
                    raise ValueError(f"per_domain.{domain}: unknown filter '{key}' (one of {', '.join(ORDER)})")
            domain_config(self, domain)  # validates each merged section (unknown settings, types)
        return self


def domain_config(cfg: Config, domain: str) -> Config:
    """``cfg`` with ``per_domain[domain]``'s settings merged into its filter sections."""
    update = {}
    for key, settings in cfg.per_domain.get(domain, {}).items():
        section = getattr(cfg, key)
        update[key] = type(section).model_validate({**section.model_dump(), **settings})
    return cfg.model_copy(update={**update, "per_domain": {}})


def build_filters(cfg: Config, tokenizer=None, cache: dict | None = None) -> list[tuple[str, object]]:
    """(key, datatrove filter) for each enabled filter, in chain order. All filters share ``tokenizer`` (one
    word split per document); ``cache`` reuses the instance of an identical section (per-domain lists)."""
    if tokenizer is None:
        tokenizer = shared_word_tokenizer(cfg.word_tokenizer, cfg.spacy_language)
    cache = {} if cache is None else cache
    out = []
    for key in ORDER:
        section = getattr(cfg, key)
        if not section.enabled:
            continue
        ident = (key, section.model_dump_json())
        if ident not in cache:
            cache[ident] = build_language_filter(section) if key == "language" else \
                build_heuristic(key, section, tokenizer)
        out.append((key, cache[ident]))
    return out


def build_chain(cfg: Config) -> tuple[list, dict[str, list]]:
    """The default filter list and {domain: its filter list} for ``per_domain``."""
    tokenizer = shared_word_tokenizer(cfg.word_tokenizer, cfg.spacy_language)
    cache: dict = {}
    default = build_filters(cfg, tokenizer, cache)
    per_domain = {d.lower(): build_filters(domain_config(cfg, d), tokenizer, cache) for d in cfg.per_domain}
    return default, per_domain


def add_filter(filters: list, per_domain: dict[str, list], key: str, block) -> None:
    """Append filter ``block`` under ``key`` to the default list and to every per-domain list (in place)."""
    filters.append((key, block))
    for lst in per_domain.values():
        lst.append((key, block))


def chain_keys(filters: list, per_domain: dict[str, list]) -> list[str]:
    """The filter keys of the default and per-domain lists: ORDER first, then added filters in their order."""
    seen: dict[str, None] = {}
    for lst in (filters, *per_domain.values()):
        for key, _ in lst:
            seen.setdefault(key)
    rank = {k: (ORDER.index(k) if k in ORDER else len(ORDER), i) for i, k in enumerate(seen)}
    return sorted(seen, key=rank.get)


def chain_counts(chain_stats: dict, keys: list[str]) -> tuple[dict, dict]:
    """(counts, metrics) of the filter chain's block stats for filter ``keys``."""
    g = lambda k: chain_stats.get(k, 0)  # noqa: E731
    removed = {k: int(g(f"{k}/dropped")) for k in keys}
    words = {k: int(g(f"{k}/words")) for k in keys}
    nbytes = {k: int(g(f"{k}/bytes")) for k in keys}
    reasons = {k: {s[len(k) + 8:]: int(v) for s, v in sorted(chain_stats.items()) if s.startswith(f"{k}/reason/")}
               for k in keys}
    counts = {"removed": removed, "removed_reasons": reasons, "removed_words": words, "removed_bytes": nbytes,
              "removed_tokens_est": {k: round(v / 4) for k, v in nbytes.items()},
              "domain_overridden": int(g("domain_overridden"))}
    metrics = {"reasons": reasons, "seconds": {k: round(float(g(f"{k}/seconds")), 3) for k in keys},
               "bytes_cut": {k: int(g(f"{k}/bytes_cut")) for k in keys if g(f"{k}/bytes_cut")}}
    return counts, metrics


def external_inputs(cfg: Config, _kiln_cfg) -> dict:
    """Files outside the DAG this stage reads, by content (part of its fingerprint): the quality reference corpus."""
    if not cfg.quality.enabled:
        return {}
    from stages.filter.quality import reference_fingerprint

    return {"quality_positives": reference_fingerprint(cfg.quality.positives, _kiln_cfg)}


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from stages.core.pipeline import (block_stats, check_upstream_read, data_result, output_steps, run_pipeline,
                                      upstream_reader)
    from stages.filter.heuristics import _chain_cls
    from stages.filter.pii import pii_block, pii_counts
    from stages.filter.quality import QualityFilter, train_quality

    filters, per_domain = build_chain(cfg)
    keys = chain_keys(filters, per_domain)
    ctx.out.rm(_TASK_SAMPLES)
    Chain = _chain_cls()
    chain = Chain(filters, per_domain, ctx.out.datafolder(f"{_TASK_SAMPLES}/heuristics"), cfg.samples_per_filter,
                  cfg.sample_lines)  # sample heads: PII always replaced
    pii = [pii_block(cfg.pii)] if cfg.pii.enabled else []
    quality_counts, quality_outputs, qchain, quality_seconds = {}, [], None, {}
    if not cfg.quality.enabled:
        blocks = run_pipeline(ctx, [upstream_reader(ctx, "dedup"), chain, *pii, *output_steps(ctx)], name="filter")
        chain_stats = block_stats(blocks, chain.name)
    else:
        # two passes: the heuristics' survivors (scratch in the stage's folder) are the pool the classifier is
        # trained on (negatives) and ranked in (top_percent); then scoring, PII and the output
        pass1 = run_pipeline(ctx, [upstream_reader(ctx, "dedup"), chain,
                                   JsonlWriter(ctx.out.datafolder(_PASS1), output_filename="${rank}.jsonl.gz")],
                             name="filter_heuristics")
        chain_stats = block_stats(pass1, chain.name)
        rels = ctx.out.list(_PASS1, suffix=".jsonl.gz")
        q = train_quality(cfg.quality, ctx, source=(ctx.out, rels))
        quality_counts, quality_outputs, quality_seconds = q["counts"], q["outputs"], q["seconds"]
        qchain = Chain([("quality", QualityFilter(q["model_path"], q["cutoff"], cfg.quality.max_words))], {},
                       ctx.out.datafolder(f"{_TASK_SAMPLES}/quality"), cfg.samples_per_filter, cfg.sample_lines)
        paths_file = os.path.join(ctx.workdir, "pass1.txt")
        with open(paths_file, "w") as f:
            f.writelines(r[len(_PASS1) + 1:] + "\n" for r in rels)
        # add_file_path=False: datatrove's default put the scratch file's absolute path (storage root, run id) into
        # every kept document's metadata: other bytes for the same data in another folder (like upstream_reader)
        reader = JsonlReader(ctx.out.datafolder(_PASS1), paths_file=paths_file, add_file_path=False)
        blocks = run_pipeline(ctx, [reader, qchain, *pii, *output_steps(ctx)], name="filter_quality")
        qstats = block_stats(blocks, qchain.name)
        blocks = {**blocks, **{f"heuristics/{k}": v for k, v in pass1.items()}}
        ctx.out.rm(_PASS1)
        keys = [*keys, "quality"]
        chain_stats = {**chain_stats, **{k: v for k, v in qstats.items() if k != "documents"}}
    task_files = [ctx.out.read_bytes(p) for p in ctx.out.list(_TASK_SAMPLES, suffix=".jsonl")]
    ctx.out.write_bytes(SAMPLES, merge_samples(task_files, keys, cfg.samples_per_filter))
    ctx.out.rm(_TASK_SAMPLES)
    check_upstream_read(ctx, "dedup", int(chain_stats.get("documents", 0)))
    counts, metrics = chain_counts(chain_stats, keys)
    removed = counts.pop("removed")
    redacted = pii_counts(block_stats(blocks, "📞 PII redaction")) if cfg.pii.enabled else {}
    result = data_result(ctx, blocks, int(chain_stats.get("documents", 0)), removed,
                         extra_outputs=(SAMPLES, *quality_outputs),
                         metrics={"blocks": blocks, **metrics, **({"quality_seconds": quality_seconds} if
                                                                  quality_seconds else {})}, **counts,
                         redacted=redacted, **({"quality": quality_counts} if quality_counts else {}))
    kept = result.counts["documents_out"]
    if 0 < kept < cfg.min_documents_out:
        worst = max(removed, key=removed.get) if removed else "none"
        raise StageError(f"filter kept {kept} of {result.counts['documents_in']} documents "
                         f"(< filter.min_documents_out={cfg.min_documents_out}); most removed by '{worst}': "
                         f"loosen filter.{worst}")
    return result
