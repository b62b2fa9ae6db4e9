"""Pieces of bench_dedup that do not depend on any deduplicator: the input pages, the exact ground truth, the
removal metrics and the planted near-duplicate pairs.

Ground truth (``exact_pairs``): every document's set of word 5-grams (words: ``truth_words``), compared
exactly (n-grams are tuples of word ids made unique with ``np.unique(axis=0)``, no hashing); the
intersection sizes of all pairs that share at least one shingle come from one sparse product A·Aᵀ of the
document×shingle incidence matrix (an inverted index over shingles), so pairs without a common shingle are
never scored (their Jaccard is 0).

Removal metrics (``removal_scores``), for a method that removed the set R of documents, against the graph
G_t of ground-truth pairs with J ≥ t (components C of G_t with ≥ 2 documents):
- document precision = |R ∩ ⋃C| / |R|: a removed document is a true positive when it has at least one
  ground-truth partner with J ≥ t (1.0 when nothing was removed);
- document recall = Σ_C min(|R ∩ C|, |C| − 1) / Σ_C (|C| − 1): of the documents that should go (all but one per
  component), the fraction removed; removing a whole component counts |C| − 1, not |C|;
- pair recall = fraction of ground-truth pairs (J ≥ t) with at least one of the two documents removed (the
  output no longer holds both);
- pair precision = of the (removed document, document it was removed for) pairs the method reports, the
  fraction with J ≥ t (is each removal justified by the document the method names?).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WORK = REPO / "bench" / "_work" / "dedup"
TINY = REPO / "configs" / "tiny.yaml"

def truth_words(text: str) -> list[str]:
    """Words of the ground truth: the engine's reference definition (``stages.dedup.minhash.words``: NFKC,
    lowercase, ``\\w+`` runs), so that scores measure LSH + verification rather than a definition mismatch. The
    engine's shingles use a separate vectorized tokenizer; the n-grams here are exact (no hashing)."""
    from stages.dedup.minhash import words

    return words(text)


# ---------------------------------------------------------------------------------------------------------
# input: the sample crawl through Kiln's ingest stage (trafilatura), cached by run_stage's fingerprint

def crawl_pages(storage: Path = WORK / "store", run_id: str = "crawl") -> tuple[list[dict], list[Path], dict]:
    """(documents in file order, their JSONL files, the ingest manifest) of ../shared/data/crawl extracted by
    Kiln's ingest stage with trafilatura (the extractor of the issue's figures). run_stage skips the work when
    an identical ingest (same config) is already in ``storage``. Call from under ``if __name__ == "__main__"``
    (datatrove's worker pools)."""
    from stages.core.config import load_config
    from stages.core.runner import run_stage

    cfg = load_config(TINY)
    if "extractor" in type(cfg.ingest.extract).model_fields:
        cfg = load_config(TINY, overrides={"ingest.extract.extractor": "trafilatura"})
    manifest = run_stage("ingest", cfg, str(storage), run_id)
    files = sorted((storage / run_id / "ingest" / "data").glob("*.jsonl.gz"))
    return read_jsonl(files), files, manifest


def read_jsonl(files: Iterable[Path]) -> list[dict]:
    docs = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs.extend(json.loads(line) for line in fh if line.strip())
    return docs


# ---------------------------------------------------------------------------------------------------------
# exact ground truth

def shingle_ids(texts: list[str], n: int = 5, words: Callable[[str], list[str]] = truth_words) -> list[np.ndarray]:
    """Per text, the sorted unique ids of its word n-grams, exact (equal ids <=> equal n-grams; no hashing).
    A text of fewer than n words is one shingle of all its words; an empty one has none."""
    per_doc = [words(t) for t in texts]
    flat = [w for ws in per_doc for w in ws]
    index = {w: k + 1 for k, w in enumerate(dict.fromkeys(flat))}  # word ids from 1; 0 pads short texts
    ids = np.fromiter(map(index.__getitem__, flat), np.int64, len(flat))
    lens = np.array([len(ws) for ws in per_doc], np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    ids = np.concatenate([ids, np.zeros(n, np.int64)])
    owner = np.repeat(np.arange(len(texts)), lens)
    pos = np.arange(len(flat)) - starts[owner]  # position of each word in its text
    # an n-gram starts at every word with at least n - 1 words after it in its text, or at the first word of a
    # short text (then padded with 0s: it never equals a full n-gram)
    first = ((lens[owner] - pos) >= n) | ((pos == 0) & (lens[owner] < n))
    at, own = np.nonzero(first)[0], owner[first]
    grams = np.stack([np.where(pos[at] + c < lens[own], ids[at + c], 0) for c in range(n)], axis=1)
    keys = [grams[:, c] if c + 1 == n else (grams[:, c] << 32) | grams[:, c + 1] for c in range(0, n, 2)]
    order = np.lexsort(keys[::-1])
    same = np.ones(len(order) - 1, bool) if len(order) else np.ones(0, bool)
    for key in keys:
        ks = key[order]
        same &= ks[1:] == ks[:-1]
    gid = np.empty(len(order), np.int64)
    gid[order] = np.cumsum(np.concatenate([[True], ~same])[:len(order)]) - 1
    pair = np.unique(own * (int(gid.max(initial=0)) + 1) + gid)  # sorted by (text, n-gram id), unique
    base = int(gid.max(initial=0)) + 1
    t_of, g_of = pair // base, pair % base
    bounds = np.searchsorted(t_of, np.arange(len(texts) + 1))
    return [g_of[bounds[k]:bounds[k + 1]] for k in range(len(texts))]


def exact_pairs(sets: list[np.ndarray], min_j: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, J) with i < j of every pair sharing at least one shingle and J ≥ min_j: exact Jaccard."""
    import scipy.sparse as sp

    sizes = np.array([len(s) for s in sets])
    rows = np.repeat(np.arange(len(sets)), sizes)
    cols = np.concatenate(sets) if len(rows) else np.empty(0, np.int64)
    a = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(len(sets), int(cols.max(initial=-1)) + 1))
    inter = sp.triu(a @ a.T, k=1).tocoo()
    i, j, c = inter.row.astype(np.int64), inter.col.astype(np.int64), inter.data
    jac = c / (sizes[i] + sizes[j] - c)
    keep = jac >= min_j
    return i[keep], j[keep], jac[keep]


def pair_lookup(i: np.ndarray, j: np.ndarray, jac: np.ndarray) -> dict[tuple[int, int], float]:
    return {(int(a), int(b)): float(x) for a, b, x in zip(i, j, jac)}


# ---------------------------------------------------------------------------------------------------------
# metrics of a removal

def components(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected-component label of each of n nodes."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    p = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
    g = sp.coo_matrix((np.ones(len(p)), (p[:, 0], p[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def removal_scores(n: int, removed: Iterable[int], truth: dict[tuple[int, int], float], t: float,
                   claimed: Iterable[tuple[int, int]] | None = None) -> dict[str, float]:
    """Document- and pair-level precision/recall of removing ``removed`` (indices among n documents) against
    the ground-truth pairs with J ≥ t (``truth``: {(i, j): J} with i < j). ``claimed``: (removed, matched)
    pairs for pair precision (omitted: not computed). Definitions in the module docstring."""
    rem = set(int(r) for r in removed)
    edges = [p for p, x in truth.items() if x >= t]
    label = components(n, edges)
    size = Counter(label.tolist())
    dup = {k for k in range(n) if size[label[k]] > 1}
    hit = Counter(label[k] for k in rem if k in dup)
    removable = sum(s - 1 for s in size.values() if s > 1)
    out = {
        "removed": len(rem), "truth_pairs": len(edges), "truth_removable": removable,
        "true_positives": len(rem & dup),
        "precision": len(rem & dup) / len(rem) if rem else 1.0,
        "recall": sum(min(h, size[c] - 1) for c, h in hit.items()) / removable if removable else 1.0,
        "pair_recall": sum(a in rem or b in rem for a, b in edges) / len(edges) if edges else 1.0,
    }
    if claimed is not None:
        cl = [(min(a, b), max(a, b)) for a, b in claimed]
        out["pair_precision"] = sum(truth.get(p, 0.0) >= t for p in cl) / len(cl) if cl else 1.0
    return out


def keep_first_per_cluster(n: int, pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of ``pairs`` into clusters; of each cluster the lowest index stays. Returns (removed, kept)."""
    label = components(n, pairs)
    first: dict[int, int] = {}
    out = []
    for k in range(n):
        if label[k] in first:
            out.append((k, first[label[k]]))
        else:
            first[label[k]] = k
    return [(r, k) for r, k in out]


# ---------------------------------------------------------------------------------------------------------
# planted near-duplicates

def base_chunks(texts: Iterable[str], words: Callable[[str], list[str]], shingles: Callable[[str], np.ndarray],
                rng: np.random.Generator, min_words: int = 80, max_words: int = 400,
                max_seen: float = 0.05, limit: int | None = None) -> list[list[str]]:
    """Disjoint windows of real text (min..max words, length drawn at random), as word lists, each sharing at
    most ``max_seen`` of its shingles with all the windows accepted before it: planted pairs built from them
    are independent and cannot collide with one another (a 5% overlap is a Jaccard ≤ 0.05 with any other
    window, where 14x8 LSH fires with probability ~1e-9). Stops after ``limit`` windows."""
    seen: set[int] = set()
    out = []
    for text in texts:
        ws = words(text)
        pos = 0
        while len(ws) - pos >= min_words:
            w = int(rng.integers(min_words, max_words + 1))
            chunk = ws[pos:pos + w]
            pos += len(chunk)
            if len(chunk) < min_words:
                break
            sh = shingles(" ".join(chunk))
            hs = set(sh.tolist())
            if len(hs & seen) <= max_seen * len(hs):
                out.append(chunk)
                seen |= hs
                if limit is not None and len(out) >= limit:
                    return out
    return out


def edit_words(ws: list[str], target: float, vocab: list[str], rng: np.random.Generator, n: int = 5) -> list[str]:
    """A copy of ``ws`` with random word edits (a third each: substitute a random vocabulary word, delete,
    insert one) at a rate that makes the n-gram Jaccard about ``target``: an n-gram survives when none of its
    words is edited, f = (1 − q)^n, and J = f / (2 − f) for equal sizes, so q = 1 − (2s / (1 + s))^(1/n)."""
    q = 1.0 - (2 * target / (1 + target)) ** (1.0 / n)
    out = []
    for w in ws:
        if rng.random() >= q:
            out.append(w)
            continue
        kind = rng.integers(3)
        if kind == 0:
            out.append(vocab[rng.integers(len(vocab))])
        elif kind == 2:
            out.extend((vocab[rng.integers(len(vocab))], w))
    return out


def poisson_binomial_p(k: int, p: np.ndarray) -> float:
    """Two-sided exact p-value of observing k successes of independent Bernoulli(p_i) trials:
    2·min(P(X ≤ k), P(X ≥ k)), capped at 1 (distribution by dynamic programming)."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for pi in p:
        dist[1:] = dist[1:] * (1 - pi) + dist[:-1] * pi
        dist[0] *= 1 - pi
    return float(min(1.0, 2 * min(dist[:k + 1].sum(), dist[k:].sum())))


def curve_table(jac: np.ndarray, hit: np.ndarray, expected: np.ndarray, edges: np.ndarray) -> list[dict]:
    """Per similarity bin [lo, hi): pairs, mean expected rate (mean of the per-pair probability), measured
    rate, z = (hits − Σp) / sqrt(Σp(1 − p)) and the exact Poisson-binomial two-sided p-value."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (jac >= lo) & (jac < hi)
        if not m.any():
            continue
        p, k = expected[m], int(hit[m].sum())
        var = float((p * (1 - p)).sum())
        z = (k - p.sum()) / np.sqrt(var) if var > 0 else (0.0 if k == round(p.sum()) else float("inf"))
        rows.append({"lo": float(lo), "hi": float(hi), "pairs": int(m.sum()), "expected": float(p.mean()),
                     "measured": k / m.sum(), "z": float(z), "p_value": poisson_binomial_p(k, p)})
    return rows
