"""dedup: exact, URL and near-duplicate removal within a snapshot and against earlier snapshots.

Three datatrove pipelines (the same blocks run on other executors; see ``blocks.py``):

1. signature (one task per input shard): per document the content hash (whitespace collapsed), URL, crawl
   date, length, optional ``quality_score``, word n-gram shingles and MinHash band keys (``minhash.py``),
   written as a per-task document table to local scratch;
2. cluster (one task, in-process): exact -> URL (first by crawl date) -> near duplicates: LSH candidate pairs,
   each verified with the true Jaccard of the shingle sets before anything is removed, union-find over the
   verified pairs, one document kept per cluster by ``keep`` (rules in ``cluster.py``); also against the
   persistent index of earlier snapshots (``index.py``), whose shingle sets are fetched by ranged reads;
3. filter (per task): drops the removed documents and writes ``data/`` as before.

Inputs below ``inprocess_below_mb`` run the signature and filter pipelines in this process (one task after
the other) instead of starting a datatrove worker pool for each.

Outputs: ``data/*.jsonl.gz`` and ``duplicates.jsonl.gz`` (one row per removed document: id, url, reason
exact|url|near, matched_id, matched_url, matched_snapshot, jaccard, cluster, kept_id; for near duplicates
matched is a verified partner (J >= threshold) one step closer to the cluster's kept document kept_id). With ``index`` set, the kept
documents become this snapshot's segment of the index, committed (one atomic write of ``index.json``) after
``data/`` is written; re-running a snapshot replaces its segment and removes segments of the snapshot that a killed
attempt wrote but never committed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Literal

from pydantic import Field, field_validator

from stages.core.config import Strict
from stages.core.runner import NAME_RULE, StageContext, StageError, StageResult, name_problem


class Config(Strict):
    exact: bool = True  # remove exact duplicates (same text after whitespace collapsing); first one kept
    url: bool = True  # remove documents whose URL was seen before; first by crawl date kept
    near: bool = True  # remove near duplicates (MinHash LSH candidates verified by true Jaccard)
    threshold: float = Field(0.8, gt=0, le=1)  # true Jaccard of the shingle sets for a near duplicate
    n_grams: int = Field(5, ge=1)  # words per shingle
    bands: int = Field(14, ge=1)  # LSH bands (FineWeb: 14 x 8; J=0.8 is a candidate with p=0.92, 0.7: 0.56)
    rows: int = Field(8, ge=1)  # MinHash values per band
    seed: int = 1  # MinHash permutation seed (part of the index's settings)
    # which near duplicate of a cluster is kept: longest (most characters), first (earliest crawl date, then
    # input order) or quality (highest metadata.quality_score, else longest); ties by input order
    keep: Literal["longest", "first", "quality"] = "longest"
    # persistent cross-snapshot index: a folder relative to the storage root, or a URL (s3://bucket/prefix);
    # null = dedup within this run only
    index: str | None = "index/dedup"
    snapshot: str | None = None  # this run's name in the index (default: the run id); a folder name, as run ids
    # inputs smaller than this (MB of normalize's compressed data/) run the signature and filter pipelines in
    # this process, one task after the other: a datatrove worker pool (forkserver) costs ~1 s to start here;
    # on the 6 MB sample crawl 2 workers win a little (3.0 s vs 3.25 s in-process, quiet machine, 2 cores)
    inprocess_below_mb: float = Field(2.0, ge=0)

    @field_validator("snapshot")
    @classmethod
    def _one_folder_name(cls, v: str | None) -> str | None:
        if v is not None and name_problem(v, "dedup.snapshot"):
            raise ValueError(f"must be {NAME_RULE}")
        return v


def _storage_root(ctx: StageContext) -> str:
    """The storage root the run folder lives in (``<root>/<run_id>``)."""
    uri = ctx.root.uri
    return uri[:-len(ctx.run_id)].rstrip("/") if uri.endswith(ctx.run_id) else os.path.dirname(uri)


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import (block_stats, check_upstream_read, data_result, output_steps, run_pipeline,
                                      upstream_reader)
    from stages.dedup.blocks import DUPLICATES, cluster_block_cls, filter_block_cls, signature_block_cls
    from stages.dedup.index import DedupIndex, index_storage
    from stages.dedup.minhash import MinHasher

    scratch = os.path.join(ctx.workdir, "dedup")
    tasks = ctx.cfg.run.tasks
    params = MinHasher(cfg.n_grams, cfg.bands, cfg.rows, cfg.seed).params()
    snapshot = cfg.snapshot or ctx.run_id
    index = DedupIndex(index_storage(cfg.index, _storage_root(ctx)).uri) if cfg.index else None
    if index is not None and (why := index.check_params(index.load(), params)):
        raise StageError(why)
    segment = index.new_segment_path(snapshot) if index else None
    seconds = {}
    size = sum(o["bytes"] for o in ctx.inputs["normalize"]["outputs"] if o["path"].startswith("data/"))
    workers = 1 if size < cfg.inprocess_below_mb * 1e6 else None  # None: run.workers

    t = time.perf_counter()
    sig = run_pipeline(ctx, [upstream_reader(ctx, "normalize"),
                             signature_block_cls()(scratch, cfg.n_grams, cfg.bands, cfg.rows, cfg.seed)],
                       name="dedup_signature", workers=workers)
    seconds["signature"] = time.perf_counter() - t
    documents_in = int(block_stats(sig, "🔏 dedup signature").get("documents", 0))
    check_upstream_read(ctx, "normalize", documents_in)  # before anything reaches the index

    t = time.perf_counter()
    rules = dict(exact=cfg.exact, url=cfg.url, near=cfg.near, threshold=cfg.threshold, keep=cfg.keep)
    cl = run_pipeline(ctx, [cluster_block_cls()(scratch, tasks, ctx.out.uri, rules, params,
                                                index.uri if index else None, snapshot, segment)],
                      name="dedup_cluster", tasks=1)
    seconds["cluster"] = time.perf_counter() - t
    with open(os.path.join(scratch, "counts.json")) as f:
        counts = json.load(f)

    t = time.perf_counter()
    filt = run_pipeline(ctx, [upstream_reader(ctx, "normalize"), filter_block_cls()(scratch), *output_steps(ctx)],
                        name="dedup_filter", workers=workers)
    seconds["filter"] = time.perf_counter() - t
    dropped = block_stats(filt, "🧹 dedup filter")
    removed = counts.pop("removed")
    if int(dropped.get("dropped", 0)) != sum(removed.values()):
        raise StageError(f"dedup: the filter dropped {dropped.get('dropped', 0)} documents, the cluster step "
                         f"decided {sum(removed.values())}")

    index_counts = counts.pop("index")
    if index is not None:
        t = time.perf_counter()
        replaced, orphans = index.commit_locked(
            snapshot, {"path": segment, "documents": index_counts.get("added_documents", 0)}, params,
            purpose=f"dedup commit of snapshot {snapshot} (run {ctx.run_id})")
        seconds["index_commit"] = time.perf_counter() - t
        index_counts.update(uri=index.uri, snapshot=snapshot, segments_read=len(index.prior_segments(
            index.load(), snapshot)), replaced_segment=bool(replaced))
    metrics = {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "in_process": workers == 1,
               "index_orphans_removed": len(orphans) if index is not None else 0,
               "cluster_memory": counts.get("memory"), "blocks": {"signature": sig, "cluster": cl, "filter": filt}}
    return data_result(ctx, filt, documents_in, removed, extra_outputs=(DUPLICATES,), metrics=metrics,
                       near=counts["near"], index=index_counts if index is not None else None,
                       snapshot=snapshot,
                       # a snapshot that is all duplicates (a nightly refresh with nothing new) is a result, not a failure
                       all_duplicates=documents_in > 0 and sum(removed.values()) == documents_in)
