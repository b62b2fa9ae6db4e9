"""Dedup decisions over a whole snapshot (one task): exact, URL, then near duplicates with verification.

Inputs are the per-document arrays of the signature step (all tasks concatenated, in input order) and the
documents of earlier snapshots (``PriorDocs``). Only numbers are held in memory: hashes, dates, lengths,
band keys; shingle sets are memory-mapped (this run) or fetched by ranged reads (the index) for the
candidate pairs only.

Rules, in order (each one only sees the documents the previous ones kept):
1. exact: same content hash as an earlier snapshot's document -> removed (matched: that document); within
   the snapshot, of identical texts the *first* is kept (earliest crawl date, then input order).
2. url: same URL as an earlier snapshot's document -> removed; within the snapshot the first is kept.
3. near: LSH candidate pairs (a shared band key; within the snapshot and against the index) are verified
   with the true Jaccard of their shingle sets; pairs below ``threshold`` are rejected (LSH false
   positives). Verified pairs are edges of a union-find; in each cluster with an earlier-snapshot member
   every document of this snapshot is removed (earlier snapshots were published already); otherwise one
   document is kept by ``keep``: ``longest`` (most characters), ``first`` (earliest crawl date, then input
   order) or ``quality`` (highest ``metadata["quality_score"]``; documents without one rank below, then
   longest); ties by input order. Every removed document records a verified partner (``matched``, with
   their true Jaccard >= threshold): its most similar neighbour one step closer to the kept document, so in
   a chain A~B~C with A kept, C points to B and B to A; ``kept`` is the cluster's kept document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from stages.dedup.index import ARRAYS, SHINGLES, PriorDocs, load_npz
from stages.dedup.minhash import candidate_pairs, cross_pairs, jaccard

KEEP, EXACT, URL, NEAR = 0, 1, 2, 3
REASONS = {EXACT: "exact", URL: "url", NEAR: "near"}


class ScratchTables:
    """The per-task document tables of this run, concatenated in task order (global id = input order)."""

    def __init__(self, folders: list[str]):
        self.folders = folders
        parts = [load_npz(open(os.path.join(f, ARRAYS), "rb").read()) for f in folders]
        self.sizes = np.array([len(p["content_hash"]) for p in parts], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.sizes)])
        self.arrays = {k: np.concatenate([p[k] for p in parts]) for k in
                       ("content_hash", "url_hash", "date", "length", "quality", "band_keys")}
        self.offsets = [p["offsets"] for p in parts]
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.first[-1])

    def locate(self, i: int) -> tuple[int, int]:
        task = int(np.searchsorted(self.first, i, side="right") - 1)
        return task, i - int(self.first[task])

    def task_shingles(self, task: int) -> np.ndarray:
        if task not in self._maps:
            path = os.path.join(self.folders[task], SHINGLES)
            self._maps[task] = (np.memmap(path, dtype="<u8", mode="r") if os.path.getsize(path)
                                else np.empty(0, dtype=np.uint64))
        return self._maps[task]

    def shingles(self, i: int) -> np.ndarray:
        task, row = self.locate(i)
        off = self.offsets[task]
        return self.task_shingles(task)[off[row]:off[row + 1]]

    def nonempty(self) -> np.ndarray:
        return np.concatenate([np.diff(o) > 0 for o in self.offsets]) if self.offsets else np.empty(0, bool)

    def doc_rows(self, task: int, rows: np.ndarray) -> list[dict]:
        """{"id", "url", "date"} of the given rows of a task (its strings file is read once per call)."""
        with open(os.path.join(self.folders[task], "docs.json")) as f:
            cols = json.load(f)
        return [{k: cols[k][r] for k in cols} for r in np.asarray(rows, dtype=np.int64).tolist()]


@dataclass
class Decisions:
    reason: np.ndarray  # int8 per document: KEEP, EXACT, URL, NEAR
    matched: np.ndarray  # int64: the kept document matched (< n: this run; n + k: prior document k), -1
    jaccard: np.ndarray  # float64: true Jaccard with `matched` (near duplicates), NaN otherwise
    cluster: np.ndarray  # int64: near-duplicate cluster number, -1
    kept: np.ndarray  # int64: near duplicates: the kept document of the cluster (same coding as matched), -1
    counts: dict = field(default_factory=dict)


def _first_order(date: np.ndarray) -> np.ndarray:
    """Rank of each document by (crawl date, input order): 0 = first."""
    order = np.lexsort((np.arange(date.size), date))
    rank = np.empty(date.size, dtype=np.int64)
    rank[order] = np.arange(date.size)
    return rank


def _dedup_key(key: np.ndarray, alive: np.ndarray, rank: np.ndarray, prior_keys: np.ndarray,
               reason: np.ndarray, matched: np.ndarray, code: int, n: int) -> dict:
    """Remove alive docs whose ``key`` (non-zero) matches an earlier snapshot or an earlier-ranked doc."""
    counts = {"prior": 0, "within": 0}
    cand = np.flatnonzero(alive & (key != 0))
    if prior_keys.size and cand.size:
        order = np.argsort(prior_keys, kind="stable")
        sk = prior_keys[order]
        pos = np.searchsorted(sk, key[cand])
        pos[pos == sk.size] = 0
        hit = sk[pos] == key[cand]
        reason[cand[hit]] = code
        matched[cand[hit]] = n + order[pos[hit]]
        counts["prior"] = int(hit.sum())
        cand = cand[~hit]
    if cand.size > 1:
        by = cand[np.lexsort((rank[cand], key[cand]))]  # grouped by key, first-ranked first
        k = key[by]
        first = np.empty(by.size, dtype=bool)
        first[0] = True
        np.not_equal(k[1:], k[:-1], out=first[1:])
        keeper = by[np.flatnonzero(first)[np.cumsum(first) - 1]]
        dup = ~first
        reason[by[dup]] = code
        matched[by[dup]] = keeper[dup]
        counts["within"] = int(dup.sum())
    return counts


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        p = self.parent.setdefault(x, x)
        while p != x:
            gp = self.parent[p]
            self.parent[x] = gp
            x, p = p, gp
            p = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [sorted(g) for _, g in sorted(out.items())]


def _keep_order(members: np.ndarray, keep: str, length: np.ndarray, quality: np.ndarray,
                rank: np.ndarray) -> int:
    """The member kept by the rule (ties: input order, i.e. the lowest id)."""
    if keep == "first":
        return int(members[np.argmin(rank[members])])
    q = quality[members]
    has_q = ~np.isnan(q)
    if keep == "quality" and has_q.any():
        keys = (members, -length[members], -np.where(has_q, q, -np.inf), ~has_q)
    else:
        keys = (members, -length[members])
    return int(members[np.lexsort(keys)[0]])


def decide(tables: ScratchTables, prior: PriorDocs, *, exact: bool, url: bool, near: bool, threshold: float,
           keep: str) -> Decisions:
    a = tables.arrays
    n = len(tables)
    reason = np.zeros(n, dtype=np.int8)
    matched = np.full(n, -1, dtype=np.int64)
    jac = np.full(n, np.nan)
    cluster = np.full(n, -1, dtype=np.int64)
    kept_of = np.full(n, -1, dtype=np.int64)
    rank = _first_order(a["date"])
    counts: dict = {"index": {"prior_documents": len(prior)}}
    if exact:
        c = _dedup_key(a["content_hash"], reason == KEEP, rank, prior.content_hash, reason, matched, EXACT, n)
        counts["index"]["exact"] = c["prior"]
    if url:
        c = _dedup_key(a["url_hash"], reason == KEEP, rank, prior.url_hash, reason, matched, URL, n)
        counts["index"]["url"] = c["prior"]
    near_counts = {"candidate_pairs": 0, "verified_pairs": 0, "rejected_candidates": 0, "clusters": 0,
                   "skipped_no_words": 0}
    if near:
        nonempty = tables.nonempty()
        near_counts["skipped_no_words"] = int((~nonempty & (reason == KEEP)).sum())
        alive = np.flatnonzero((reason == KEEP) & nonempty)
        within = alive[candidate_pairs(a["band_keys"][alive])] if alive.size else np.empty((0, 2), np.int64)
        prior_ok = np.flatnonzero(prior.end > prior.start)
        across = cross_pairs(a["band_keys"][alive], prior.band_keys[prior_ok]) if prior_ok.size else \
            np.empty((0, 2), np.int64)
        if across.size:
            across = np.stack([alive[across[:, 0]], n + prior_ok[across[:, 1]]], axis=1)
        pairs = np.concatenate([within, across]).astype(np.int64)
        prior_sets = prior.shingles(pairs[pairs[:, 1] >= n, 1] - n) if across.size else {}

        def sh(i: int) -> np.ndarray:
            return tables.shingles(i) if i < n else prior_sets[i - n]

        uf, edge_j = _UnionFind(), {}
        adj: dict[int, list[int]] = {}
        for i, j in pairs.tolist():
            s = jaccard(sh(i), sh(j))
            if s >= threshold:
                uf.union(i, j)
                edge_j[(i, j)] = s
                adj.setdefault(i, []).append(j)
                adj.setdefault(j, []).append(i)
        near_counts.update(candidate_pairs=int(len(pairs)), verified_pairs=len(edge_j),
                           rejected_candidates=int(len(pairs)) - len(edge_j))
        counts["index"]["candidate_pairs"] = int(len(across))
        counts["index"]["verified_pairs"] = sum(1 for (_, j) in edge_j if j >= n)
        near_from_index = 0
        groups = uf.groups()
        for cid, group in enumerate(groups):
            g = np.array(group, dtype=np.int64)
            cur, old = g[g < n], g[g >= n]
            cluster[cur] = cid
            kept = old if old.size else np.array([_keep_order(cur, keep, a["length"], a["quality"], rank)])
            # breadth-first from the kept document(s) over verified edges: every removed document points
            # to a neighbour one step closer to the kept one (the most similar such neighbour), so each
            # reported pair is a verified pair (J >= threshold) and following matched_id reaches the kept
            # document; kept_of[i] is that document.
            frontier = sorted(kept.tolist())
            depth = {k: 0 for k in frontier}
            root = {k: k for k in frontier}
            while frontier:
                nxt = []
                for u in frontier:
                    for v in adj.get(u, ()):
                        if v not in depth:
                            depth[v] = depth[u] + 1
                            nxt.append(v)
                for v in sorted(set(nxt)):
                    best = max((edge_j[(min(u, v), max(u, v))], -u) for u in adj[v] if depth.get(u) == depth[v] - 1)
                    u = -best[1]
                    root[v] = root[u]
                    if v < n:
                        reason[v], matched[v], jac[v], kept_of[v] = NEAR, u, best[0], root[u]
                        near_from_index += bool(old.size)
                frontier = sorted(set(nxt))
        near_counts["clusters"] = len(groups)
        counts["index"]["near"] = near_from_index
        counts["index"]["shingle_sets_fetched"] = prior.fetched_sets
        counts["index"]["bytes_fetched"] = prior.fetched_bytes
        counts["index"]["ranged_reads"] = prior.reads
    counts["near"] = near_counts
    counts["removed"] = {name: int((reason == code).sum()) for code, name in REASONS.items()}
    return Decisions(reason, matched, jac, cluster, kept_of, counts)
