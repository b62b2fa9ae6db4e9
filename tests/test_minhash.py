"""The MinHash engine (stages/dedup/minhash.py) on real text: determinism across processes, exact Jaccard,
signature agreement vs Jaccard, the LSH detection curve on planted pairs, candidate pairs vs brute force,
edge cases (empty, short, non-Latin). Statistical tests use fixed seeds and bounds of 4+ standard errors, so
a correct engine fails them with probability well below 1e-3 and a biased one (correlated permutations,
broken band keys) fails them."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest

from conftest import ROOT, SHARED, real_docs

from stages.dedup.minhash import MinHasher, candidate_pairs, cross_pairs, jaccard, lsh_probability, words

MH = MinHasher()  # FineWeb's 14 x 8 over word 5-grams


@lru_cache(maxsize=1)
def bodies() -> list[str]:
    """Real article bodies (extraction benchmark) of at least 150 words."""
    return [d["text"] for d in real_docs(181) if len(words(d["text"])) >= 150]


@lru_cache(maxsize=1)
def warc_texts() -> dict[str, str]:
    """Main text of real Common Crawl pages (mostly Chinese, some Russian/German/Dutch): {url: text}."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from warcio.archiveiterator import ArchiveIterator

    out = {}
    with open(SHARED / "warc" / "warcfile.warc.gz", "rb") as fh:
        for rec in ArchiveIterator(fh):
            if rec.rec_type == "response":
                body = rec.content_stream().read()
                out[rec.rec_headers.get_header("WARC-Target-URI")] = extract_plain_text(
                    bytes_to_str(body, detect_encoding(body)), main_content=True)
    return out


def edited(ws: list[str], s: float, vocab: list[str], rng: np.random.Generator) -> list[str]:
    """Random word edits (substitute / delete / insert) at the rate that gives 5-gram Jaccard ~s."""
    q = 1 - (2 * s / (1 + s)) ** (1 / 5)
    out = []
    for w in ws:
        if rng.random() >= q:
            out.append(w)
        elif (k := rng.integers(3)) == 0:
            out.append(vocab[rng.integers(len(vocab))])
        elif k == 2:
            out.extend((vocab[rng.integers(len(vocab))], w))
    return out


def planted(n_pairs: int, lo: float, hi: float, seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """n_pairs (original, edited) shingle-set pairs from disjoint ~150-word windows of real bodies, with
    targets uniform in [lo, hi]; returns (actual Jaccard of each pair, pairs)."""
    rng = np.random.default_rng(seed)
    windows = [ws[k:k + 150] for ws in map(words, bodies()) for k in range(0, len(ws) - 149, 150)]
    assert len(windows) >= n_pairs
    vocab = sorted({w for win in windows for w in win})
    pairs = []
    for k in rng.permutation(len(windows))[:n_pairs]:
        a = windows[k]
        b = edited(a, rng.uniform(lo, hi), vocab, rng)
        pairs.append((MH.shingles(" ".join(a)), MH.shingles(" ".join(b))))
    return np.array([jaccard(a, b) for a, b in pairs]), pairs


# ---------------------------------------------------------------------------------------------------------

def test_signature_is_the_same_in_another_process():
    text = bodies()[0] + "\n" + next(iter(warc_texts().values()))
    code = ("import json, sys; from stages.dedup.minhash import MinHasher; m = MinHasher(); "
            "s = m.signature(m.shingles(sys.stdin.read())); "
            "print(json.dumps([s.tolist(), m.band_keys(s).tolist()]))")
    proc = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, cwd=ROOT,
                          check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    sig, keys = json.loads(proc.stdout)
    mine = MH.signature(MH.shingles(text))
    assert sig == mine.tolist()
    assert keys == MH.band_keys(mine).tolist()
    assert len(set(sig)) > 100  # 112 distinct minima: real permutations, not copies of one


def test_jaccard_is_exact_on_small_sets():
    rng = np.random.default_rng(0)
    for _ in range(300):
        universe = rng.integers(0, 2**64, 40, dtype=np.uint64)
        a = np.unique(rng.choice(universe, rng.integers(0, 30)))
        b = np.unique(rng.choice(universe, rng.integers(0, 30)))
        sa, sb = set(a.tolist()), set(b.tolist())
        want = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
        assert jaccard(a, b) == pytest.approx(want, abs=1e-12)
    x = np.array([1, 5, 2**64 - 1], dtype=np.uint64)
    assert jaccard(x, x) == 1.0
    assert jaccard(x, np.array([2, 3], dtype=np.uint64)) == 0.0
    assert jaccard(x, x[:1]) == pytest.approx(1 / 3)
    assert jaccard(np.empty(0, np.uint64), x) == 0.0


def test_signature_agreement_estimates_jaccard():
    """Per pair, the share of the 112 minima two texts share is Binomial(112, J)/112 for min-wise permutations:
    each pair within 5 standard errors, and the total over all pairs within 4 (catches a bias of ~0.01)."""
    jac, pairs = planted(150, 0.05, 0.98, seed=1)
    k = MH.num_hashes
    agree = np.array([(MH.signature(a) == MH.signature(b)).sum() for a, b in pairs])
    sd = np.sqrt(k * jac * (1 - jac))
    assert np.all(np.abs(agree - k * jac) <= 5 * sd + 1)
    z = (agree.sum() - k * jac.sum()) / np.sqrt((sd ** 2).sum())
    assert abs(z) < 4, z
    # whole real articles, mostly unrelated (J ~ 0, some share boilerplate): same agreement rule
    sh = [MH.shingles(t) for t in bodies()[:40]]
    sig = [MH.signature(x) for x in sh]
    for i, j in itertools.combinations(range(len(sh)), 2):
        jj = jaccard(sh[i], sh[j])
        assert abs((sig[i] == sig[j]).sum() - k * jj) <= 5 * np.sqrt(k * jj * (1 - jj)) + 1, (i, j, jj)


def test_lsh_detection_follows_the_banding_curve():
    """400 planted pairs around the steep part of 1 - (1 - s^8)^14: hits per similarity bin agree with the
    curve within 4 standard errors, and overall within 3.5."""
    jac, pairs = planted(400, 0.45, 0.95, seed=2)
    hit = np.array([(MH.band_keys(MH.signature(a)) == MH.band_keys(MH.signature(b))).any() for a, b in pairs])
    p = np.array([lsh_probability(s, MH.bands, MH.rows) for s in jac])
    var = p * (1 - p)
    for lo, hi in ((0.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 1.01)):
        m = (jac >= lo) & (jac < hi)
        assert m.sum() >= 40, (lo, m.sum())
        assert abs(hit[m].sum() - p[m].sum()) <= 4 * np.sqrt(var[m].sum()) + 1, (lo, hit[m].mean(), p[m].mean())
    assert abs(hit.sum() - p.sum()) <= 3.5 * np.sqrt(var.sum())
    assert hit[jac >= 0.9].all()
    assert lsh_probability(0.8, 14, 8) == pytest.approx(1 - (1 - 0.8 ** 8) ** 14) == pytest.approx(0.92355, abs=1e-5)


def brute_force(keys: np.ndarray) -> set[tuple[int, int]]:
    return {(i, j) for i, j in itertools.combinations(range(len(keys)), 2) if (keys[i] == keys[j]).any()}


def test_candidate_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    for n, bands, values in ((1, 14, 5), (2, 3, 2), (60, 14, 40), (150, 4, 300), (200, 14, 10**9)):
        keys = rng.integers(0, values, (n, bands)).astype(np.uint64)
        got = candidate_pairs(keys)
        assert got.dtype == np.int64 and got.shape[1] == 2
        pairs = {tuple(p) for p in got.tolist()}
        assert len(pairs) == len(got)  # unique
        assert all(i < j for i, j in pairs)
        assert pairs == brute_force(keys), (n, bands)
    keys = np.arange(20, dtype=np.uint64).reshape(10, 2)  # no shared key in any band
    assert candidate_pairs(keys).shape == (0, 2)
    big = np.full((5, 14), 7, dtype=np.uint64)  # everyone shares every band: each pair once
    assert candidate_pairs(big).tolist() == [list(p) for p in itertools.combinations(range(5), 2)]


def test_cross_pairs_match_brute_force():
    """New documents against an index: every (new, indexed) pair sharing a key in some band, once."""
    rng = np.random.default_rng(4)
    for na, nb, values in ((30, 50, 20), (1, 200, 50), (80, 1, 5), (40, 40, 10**9)):
        a = rng.integers(0, values, (na, 14)).astype(np.uint64)
        b = rng.integers(0, values, (nb, 14)).astype(np.uint64)
        got = cross_pairs(a, b)
        want = {(i, j) for i in range(na) for j in range(nb) if (a[i] == b[j]).any()}
        assert {tuple(p) for p in got.tolist()} == want and len(got) == len(want)
    assert cross_pairs(np.empty((0, 14), np.uint64), b).shape == (0, 2)


def test_short_and_empty_texts():
    assert MH.shingles("").size == 0
    assert MH.shingles("  ... !? ").size == 0  # no word characters
    empty = MH.shingles("")
    assert jaccard(empty, empty) == 0.0  # wordless documents are never verified near duplicates of each other
    assert words("Hello, WORLD! ﬁne") == ["hello", "world", "fine"]  # NFKC + lowercase
    one = MH.shingles("just three words")
    assert one.size == 1 and one.dtype == np.uint64
    assert np.array_equal(one, MH.shingles("Just, three... WORDS"))  # same words, same shingle
    assert not np.array_equal(one, MH.shingles("three just words"))  # order matters
    assert MH.shingles("one two three four five").size == 1
    assert MH.shingles("one two three four five six").size == 2
    assert MH.shingles("a b a b a b a b a b").size == 2  # unique shingles only
    s = MH.shingles("one two three four five six seven")
    assert np.all(s[1:] > s[:-1])  # sorted unique
    assert jaccard(MH.shingles("alpha beta gamma"), MH.shingles("alpha beta gamma delta")) == 0.0


def test_non_latin_text():
    texts = warc_texts()
    zh = next(t for u, t in texts.items() if "003338.cn" in u)
    ru = next(t for u, t in texts.items() if "01spb.ru" in u)
    for t in (zh, ru):
        ws = words(t)
        assert len(ws) >= 20
        sh = MH.shingles(t)
        # the vectorized word split agrees with the re reference on real non-Latin text
        assert np.array_equal(sh, MH.shingles(" ".join(ws)))
        assert sh.size == len({tuple(ws[k:k + 5]) for k in range(len(ws) - 4)})
    assert any("\u4e00" <= ch <= "\u9fff" for w in words(zh) for ch in w)  # Han characters kept in words
    assert "компании" in words(ru)
    # a near-duplicate of the Chinese page (one paragraph dropped) is found, an unrelated page is not
    lines = zh.splitlines()
    mid = min(range(len(lines) // 3, 2 * len(lines) // 3), key=lambda k: (len(lines[k].strip()) < 10, len(lines[k])))
    cut = "\n".join(lines[:mid] + lines[mid + 1:])  # drop the shortest real line of the middle third
    a, b, c = (MH.signature(MH.shingles(x)) for x in (zh, cut, ru))
    assert jaccard(MH.shingles(zh), MH.shingles(cut)) > 0.9
    assert (MH.band_keys(a) == MH.band_keys(b)).any()
    assert not (MH.band_keys(a) == MH.band_keys(c)).any()


def test_batch_forms_match_single():
    texts = bodies()[:5] + [""]
    sigs = MH.signatures(texts)
    assert sigs.shape == (6, MH.num_hashes) and sigs.dtype == np.uint64
    for t, s in zip(texts, sigs):
        assert np.array_equal(s, MH.signature(MH.shingles(t)))
    keys = MH.band_keys(sigs)
    assert keys.shape == (6, MH.bands)
    assert np.array_equal(keys[2], MH.band_keys(sigs[2]))
    assert not np.array_equal(MinHasher(seed=2).signature(MH.shingles(texts[0])), sigs[0])
