"""dedup: exact duplicates by content hash, then near duplicates by MinHash (datatrove blocks, FineWeb settings).

Exact: datatrove's ExactDedupSignature / ExactFindDedups / ExactDedupFilter over the whitespace-normalized
text; of a set of identical documents the first one (lowest task, then file order) is kept, across tasks.
Near: datatrove's MinhashDedupSignature / Buckets / Cluster / Filter (word 5-grams of datatrove's
simplify_text, which also maps every number to 0; 14 buckets x 8 hashes: a pair with Jaccard 0.8 is caught
with probability 0.92, 0.7 with 0.56) on what the exact pass kept; one document per cluster survives. Signatures and cluster files are scratch (``ctx.workdir``, which suits the local executor;
a cluster executor would put them in shared storage); only the kept documents are written. Counts:
``removed.exact``, ``removed.near_duplicate`` and ``near_duplicate_clusters``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageResult


class Config(Strict):
    exact: bool = True  # remove exact duplicates (same text after whitespace normalization)
    near: bool = True  # remove near duplicates (MinHash LSH)
    n_grams: int = Field(5, ge=1)  # word n-grams per shingle
    num_buckets: int = Field(14, ge=1)  # LSH bands
    hashes_per_bucket: int = Field(8, ge=1)  # rows per band
    minhash_seed: int = 1  # seed of the MinHash permutations (fixed so that indexes stay comparable)
    # words of a shingle: "split" splits datatrove's simplify_text output (already lowercased, punctuation
    # removed) on whitespace, ~25x faster than "spacy" (datatrove's spacy.blank tokenizer for `language`)
    # and the same shingles for space-delimited languages (on the sample crawl, 2 shingles of 9,200 differ)
    word_tokenizer: Literal["split", "spacy"] = "split"
    language: str = "en"  # spacy tokenizer language (spacy.blank; no model download)


def dedup_content(doc) -> str:
    """What exact dedup compares: the text with whitespace runs collapsed."""
    return " ".join(doc.text.split())


def first_wins(doc) -> int:
    """Exact-dedup priority (higher is kept): earlier tasks win, so the first copy in input order survives."""
    return 65535 - int(doc.metadata.get("_dedup_rank", 0))


class SplitWords:
    """Whitespace word tokenizer for MinHash shingles (input is datatrove's simplify_text output)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()


def _signature_block(cfg: Config, folder: str, mh_cfg):
    from datatrove.pipeline.dedup import MinhashDedupSignature

    block = MinhashDedupSignature(folder, config=mh_cfg, language=cfg.language)
    if cfg.word_tokenizer == "split":
        block.word_tokenizer = SplitWords()
    return block


def _rank_stamp_cls():
    from datatrove.pipeline.base import PipelineStep

    class RankStamp(PipelineStep):
        """Records the task rank on each document (only in the signature pass; nothing is written)."""

        name = "🏷 rank stamp"
        type = "🫂 - DEDUP"

        def run(self, data, rank: int = 0, world_size: int = 1):
            for doc in data:
                doc.metadata["_dedup_rank"] = rank
                yield doc

    return RankStamp


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)

    from stages.core.pipeline import data_result, output_steps, run_pipeline, upstream_reader

    def scratch(name: str) -> str:  # signatures, buckets, clusters: local scratch of the local executor
        return os.path.join(ctx.workdir, name)

    def read():  # a fresh reader per pipeline, over exactly the files normalize's manifest lists
        return upstream_reader(ctx, "normalize")

    def exact_filter() -> list:
        return [ExactDedupFilter(scratch("exact_dups"), config=exact_cfg)] if cfg.exact else []

    metrics: dict = {"blocks": {}}
    exact_cfg = ExactDedupConfig(content_getter=dedup_content, document_priority=first_wins)
    mh_cfg = MinhashConfig(n_grams=cfg.n_grams, num_buckets=cfg.num_buckets,
                           hashes_per_bucket=cfg.hashes_per_bucket, seed=cfg.minhash_seed)

    if cfg.exact:
        metrics["blocks"]["exact_signature"] = run_pipeline(
            ctx, [read(), _rank_stamp_cls()(), ExactDedupSignature(scratch("exact_sigs"), config=exact_cfg)],
            name="exact_signature")
        metrics["blocks"]["exact_find"] = run_pipeline(
            ctx, [ExactFindDedups(scratch("exact_sigs"), scratch("exact_dups"), config=exact_cfg)],
            name="exact_find", tasks=1)
    clusters = 0
    if cfg.near:
        metrics["blocks"]["minhash_signature"] = run_pipeline(
            ctx, [read(), *exact_filter(), _signature_block(cfg, scratch("mh_sigs"), mh_cfg)],
            name="minhash_signature")
        metrics["blocks"]["minhash_buckets"] = run_pipeline(
            ctx, [MinhashDedupBuckets(scratch("mh_sigs"), scratch("mh_buckets"), config=mh_cfg)],
            name="minhash_buckets", tasks=cfg.num_buckets)
        cl = run_pipeline(ctx, [MinhashDedupCluster(scratch("mh_buckets"), scratch("mh_remove"), config=mh_cfg,
                                                    save_cluster_id=True)], name="minhash_cluster", tasks=1)
        metrics["blocks"]["minhash_cluster"] = cl
        stats = next(iter(cl.values()))
        clusters = int(stats.get("clusters", 0))
        metrics["near_duplicate_documents"] = int(stats.get("duplicates", 0))  # members of all clusters

    steps = [read(), *exact_filter()]
    if cfg.near:
        steps.append(MinhashDedupFilter(scratch("mh_remove")))
    blocks = run_pipeline(ctx, steps + output_steps(ctx), name="dedup_filter")
    metrics["blocks"]["filter"] = blocks
    reader, *removers = list(blocks.values())[:len(steps)]  # the reader, then the enabled filters in order
    exact = removers.pop(0) if cfg.exact else {}
    near = removers.pop(0) if cfg.near else {}
    removed = {"exact": int(exact.get("dropped", 0)), "near_duplicate": int(near.get("dropped", 0))}
    return data_result(ctx, blocks, int(reader.get("documents", 0)), removed, metrics=metrics,
                       near_duplicate_clusters=clusters)
