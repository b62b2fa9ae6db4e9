"""Model-based quality filter (DCLM recipe): a fastText classifier trained inside the run, then a score per document.

Training set. Positives: a reference corpus of clean prose named in the profile (``quality.positives``; for the
sample the 181 article bodies of the extraction benchmark, ``ground-truth.json``). Negatives: documents of the
upstream stage (``dedup``'s output: what the filter stage reads), sampled without replacement in the order of
``blake2b(seed, id)`` (deterministic, independent of file order and of the number of tasks). A crawl document
that is also a positive (same URL, or the same text up to case and whitespace) is never a negative. Both classes
are split by the same kind of hash into train and held-out parts (``heldout_fraction``); the model that filters
is the one trained on the train parts, so the held-out precision/recall describe it. DCLM trains on all; here
the held-out part is the price of an honest figure.

Model: ``fasttext.train_supervised`` with word bigrams (``wordNgrams=2``, DCLM's setting), softmax over two
labels, ``thread=1`` and a fixed ``seed``: with one thread fastText is deterministic (same training file and
parameters -> byte-identical ``model.bin``; checked by a test). Score = probability of the positive label.

Flakiness. ``train_supervised`` raises ``RuntimeError: Encountered NaN`` intermittently here, mostly on the
second and later trainings in one process (../shared/notes/environment.md: one training per fresh process was
stable 28/28). So every training runs in a fresh Python process, and a NaN (or a child killed by a signal) is
retried with the same seed up to ``attempts`` times; a retry that succeeds writes the same bytes as a first
attempt would. Other failures and the last NaN are a StageError quoting fastText's message. The variable
``KILN_QUALITY_INJECT_NAN=n`` makes the first n attempts train with ``lr=1e30``, which makes fastText itself
raise the NaN: the retry path is tested on a real fastText failure, not a mock.

Text. ``preprocess`` is the one function used at training and scoring time: lowercase, words and single
punctuation marks (``\\w+|[^\\w\\s]``) separated by single spaces on one line (fastText splits on whitespace
only, so ``"data."`` and ``"data"`` would otherwise be different words), capped at ``max_words``.

Keep rule: ``threshold`` (score >= threshold) or ``top_percent`` (DCLM keeps ~10%): the cutoff is the score of
the ceil(n * top_percent / 100)-th best of the n upstream documents (those the optional ``prefilter`` accepts),
computed once in ``train_quality``; ties at the cutoff are all kept.

What the classifier learns on the sample (measured by bench/bench_quality.py on the 2,382 dedup documents of the
sample crawl): the positives are news and magazine articles, the negatives are Python / Django / PostgreSQL
reference documentation. The classes differ in topic and register far more than in "quality", so the classifier
learns *news-like prose vs software documentation* (code tokens, API names, "django"/"postgresql" weigh towards
the negative label). Its held-out precision 0.97 / recall 0.92 (36 + 36 examples; the misses are two Portuguese
articles and a sports box score) measures that separation, not an ability to tell good documentation from bad.
Scores within the crawl are low (median 0.004-0.02 per domain) and the ranking is the useful part: a sample of
181 negatives does not cover every kind of page, and pages with little documentation vocabulary score as
positives. Without a prefilter the top of the ranking is index stubs (``genindex-S``: 9 characters, the
PostgreSQL book index, ``contents.html``) that the heuristic filters drop anyway; after the stage's heuristic
filters (``prefilter``) it is FAQ, how-to, tutorial and installation pages, and the top 10% keeps 17% of Django,
10% of Python and 7% of PostgreSQL pages. With a reference corpus from the crawl's own domain (DCLM: OpenHermes +
ELI5 vs RefinedWeb) the same code would learn quality rather than topic.

Report (``quality/report.json``): corpus sizes, held-out precision/recall/F1 at 0.5 and at the cutoff, training
attempts, the cutoff and the number of upstream documents at or above it, and per domain
(``metadata["domain"]``, else the URL's host): documents, mean, p10/p50/p90 of the score, share kept, and how
many of its documents were training negatives. No wall-clock time in it (two identical runs write the same
bytes; bench/bench_chaos.py compares them strictly): the fastText training and scoring seconds go to the filter
manifest's ``metrics.quality_seconds``.

The cutoff is computed on the upstream text; the block must see the same text to reproduce those scores, so it
belongs after filters that only keep/drop and before anything that rewrites text (PII redaction, C4 line
removal). Cost on the sample: training ~2 s (fastText process), scoring ~1,200-1,500 docs/s on one core
(preprocessing included; documents average 9 kB), the model 15.6 MB (dim 32, 100k buckets).
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Callable, Literal

from pydantic import Field, model_validator

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError

POS, NEG = "__label__hq", "__label__cc"
INJECT_NAN_ENV = "KILN_QUALITY_INJECT_NAN"
_WORD = re.compile(r"\w+|[^\w\s]")


class ReferenceCorpus(Strict):
    """The positives. ``json``: an object {key: record} or a list of records (the extraction benchmark's
    ``ground-truth.json``: {key: {"articleBody", "url"}}); ``jsonl``: one record per line (``.gz`` allowed);
    ``text``: one document per file. Paths may be globs, local or s3://; relative paths resolve against the
    profile's folder."""

    paths: list[str] = ["../../shared/data/extraction-benchmark/ground-truth.json"]
    format: Literal["json", "jsonl", "text"] = "json"
    text_field: str | None = None  # default: "articleBody" for json, "text" for jsonl (and the key for text)
    id_field: str = "id"  # jsonl; json uses the key (object) or the position (list)
    url_field: str = "url"  # a crawl document with the same URL is never a negative


class QualityConfig(Strict):
    enabled: bool = False
    positives: ReferenceCorpus = ReferenceCorpus()
    negatives_per_positive: float = Field(1.0, gt=0)  # negatives sampled from the crawl per positive
    max_negatives: int | None = Field(None, ge=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(0.5, gt=0)  # 0.1 (DCLM, 400k examples) barely moves 300 long documents: scores stay ~0.5
    dim: int = Field(32, ge=1)
    word_ngrams: int = Field(2, ge=1)  # DCLM: bigrams
    min_count: int = Field(1, ge=1)
    bucket: int = Field(100_000, ge=1)  # hashed n-gram rows: model size ~ (vocab + bucket) x dim x 4 bytes
    max_words: int = Field(2000, ge=1)  # preprocess cap, training and scoring
    seed: int = 1
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    attempts: int = Field(4, ge=1)  # trainings (fresh processes) before giving up on NaN
    keep: Literal["threshold", "top_percent"] = "top_percent"
    threshold: float = Field(0.5, ge=0, le=1)
    top_percent: float = Field(10.0, gt=0, le=100)

    @model_validator(mode="after")
    def _paths(self):
        if self.enabled and not self.positives.paths:
            raise ValueError("quality.positives.paths is empty")
        return self


# --------------------------------------------------------------------------------------------------------------
# text and scores

def preprocess(text: str, max_words: int = 2000) -> str:
    """fastText input: lowercase, words and punctuation marks separated by single spaces, one line, capped."""
    words = _WORD.findall(text[: max_words * 24].lower())  # the character cap only bounds the regex's work
    return " ".join(words[:max_words])


def score_texts(model, texts: list[str]) -> list[float]:
    """Probability of the positive label for preprocessed texts, rounded to 6 digits (what is stored and
    compared with the cutoff)."""
    labels, probs = model.predict(texts, k=-1)
    return [round(float(dict(zip(ls, ps)).get(POS, 0.0)), 6) for ls, ps in zip(labels, probs)]


def _key(seed: int, *parts) -> bytes:
    return hashlib.blake2b((f"{seed}\x00" + "\x00".join(map(str, parts))).encode(), digest_size=8).digest()


def _same_text(text: str) -> str:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).hexdigest()


def _domain(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    if meta.get("domain"):
        return str(meta["domain"])
    url = str(meta.get("url") or "")
    return url.split("/")[2] if url.count("/") >= 2 else "unknown"


# --------------------------------------------------------------------------------------------------------------
# reading

def read_reference(corpus: ReferenceCorpus, cfg_root) -> list[dict]:
    """The positives as [{"id", "text", "url"}] (empty texts skipped), in file then record order."""
    from stages.core.config import resolve_path
    from stages.core.storage import expand_inputs, open_input

    files = []
    for p in corpus.paths:
        resolved = resolve_path(cfg_root, p)
        matches = expand_inputs([resolved])
        if not matches:
            raise StageError(f"filter.quality.positives: '{p}' matches no file (resolved to {resolved})")
        files += matches
    field = corpus.text_field or {"json": "articleBody", "jsonl": "text", "text": "text"}[corpus.format]
    out = []
    for f in dict.fromkeys(files):
        with open_input(f) as fh:
            raw = fh.read()
        if f.endswith(".gz"):
            raw = gzip.decompress(raw)
        base = os.path.basename(f)
        try:
            if corpus.format == "text":
                records = [(base, {field: raw.decode("utf-8", "replace")})]
            elif corpus.format == "jsonl":
                records = [(r.get(corpus.id_field, f"{base}#{i}"), r)
                           for i, line in enumerate(raw.decode("utf-8").splitlines()) if line.strip()
                           for r in [json.loads(line)]]
            else:
                obj = json.loads(raw)
                items = obj.items() if isinstance(obj, dict) else enumerate(obj)
                records = [(k, r if isinstance(r, dict) else {field: r}) for k, r in items]
        except (ValueError, AttributeError) as e:
            raise StageError(f"filter.quality.positives: {f} is not valid {corpus.format} ({e})") from None
        for k, r in records:
            text = r.get(field)
            if isinstance(text, str) and text.strip():
                out.append({"id": f"{base}:{k}", "text": text, "url": r.get(corpus.url_field)})
    if not out:
        raise StageError(f"filter.quality.positives: no text in {len(files)} file(s) "
                         f"(format {corpus.format}, text field '{field}')")
    return out


def reference_fingerprint(corpus: ReferenceCorpus, cfg_root) -> str:
    """sha256 of the reference corpus as read (texts and urls): a changed file re-runs the stage."""
    h = hashlib.sha256()
    for d in read_reference(corpus, cfg_root):
        h.update(json.dumps([d["id"], d["text"], d["url"]]).encode())
    return h.hexdigest()


def iter_upstream(ctx: StageContext, upstream: str, source=None):
    """(file, line number, document) of every document the upstream manifest lists (local or s3), or of the
    files of ``source`` = (Storage, [relative paths])."""
    store, rels = source if source is not None else \
        (ctx.input(upstream), ctx.input_files(upstream, prefix="data/", suffix=".jsonl.gz"))
    for rel in rels:
        with store.open(rel) as raw, gzip.open(raw) as f:  # streamed: task files can be large
            for i, line in enumerate(f):
                if line.strip():
                    yield rel, i, json.loads(line)


# --------------------------------------------------------------------------------------------------------------
# training in a fresh process

# The training process: one fastText training, the model written atomically. Plain code (no import of Kiln) so
# that it starts fast and does not depend on what the stage packages import.
_CHILD = """
import json, os, sys
import fasttext
train_file, model_file, params = sys.argv[1:4]
model = fasttext.train_supervised(input=train_file, verbose=0, thread=1, loss="softmax", **json.loads(params))
model.save_model(model_file + ".part")
os.replace(model_file + ".part", model_file)
"""


def train_model(train_file: str, model_file: str, params: dict, attempts: int) -> dict:
    """Train in fresh processes until one succeeds (NaN or a signal: retried, same seed). Returns
    {"attempts", "nan_retries", "seconds"}; raises StageError with fastText's message otherwise."""
    poison = int(os.environ.get(INJECT_NAN_ENV, "0") or 0)
    t0, last = time.perf_counter(), ""
    if os.path.exists(model_file):
        os.remove(model_file)  # only a model this call trained counts as success
    for attempt in range(1, attempts + 1):
        p = dict(params, lr=1e30) if attempt <= poison else params  # injected: fastText's own NaN
        proc = subprocess.run([sys.executable, "-c", _CHILD, train_file, model_file, json.dumps(p)],
                              capture_output=True, text=True)
        if proc.returncode == 0 and os.path.exists(model_file):
            return {"attempts": attempt, "nan_retries": attempt - 1, "seconds": round(time.perf_counter() - t0, 3)}
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if "Encountered NaN" not in proc.stderr and proc.returncode >= 0:
            raise StageError(f"filter.quality: fastText training failed: {last}")
    raise StageError(f"filter.quality: fastText training failed {attempts} times in fresh processes "
                     f"(last: {last}); raise filter.quality.attempts or lower filter.quality.lr")


# --------------------------------------------------------------------------------------------------------------
# the stage part

def _prf(scores: list[float], labels: list[bool], cut: float) -> dict:
    tp = sum(s >= cut and y for s, y in zip(scores, labels))
    fp = sum(s >= cut and not y for s, y in zip(scores, labels))
    fn = sum(s < cut and y for s, y in zip(scores, labels))
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
    rnd = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"threshold": cut, "precision": rnd(p), "recall": rnd(r), "f1": rnd(f1), "tp": tp, "fp": fp, "fn": fn,
            "tn": len(labels) - tp - fp - fn}


def _split(items: list[dict], seed: int, tag: str, fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the first round(n * fraction) by hash are held out (at least one when fraction > 0
    and n >= 2)."""
    order = sorted(items, key=lambda d: _key(seed, "heldout", tag, d["id"]))
    k = round(len(order) * fraction)
    if fraction > 0 and len(order) >= 2:
        k = min(max(k, 1), len(order) - 1)
    return order[k:], order[:k]


def _line(label: str, text: str) -> str:
    return f"{label} {text}\n"


def datatrove_prefilter(filters: list) -> Callable[[dict], bool]:
    """A ``prefilter`` for ``train_quality`` from datatrove filter blocks (anything with ``.filter(Document)``
    returning a bool or (bool, reason)): True when every filter keeps the document (run on a copy)."""
    from datatrove.data import Document

    def keep(doc: dict) -> bool:
        for f in filters:
            d = Document(text=doc.get("text") or "", id=str(doc.get("id")), metadata=dict(doc.get("metadata") or {}))
            res = f.filter(d)
            if not (res if isinstance(res, bool) else res[0]):
                return False
        return True

    return keep


def train_quality(cfg: QualityConfig, ctx: StageContext, upstream: str = "dedup",
                  prefilter: Callable[[dict], bool] | None = None, source=None) -> dict:
    """Train the classifier on the reference corpus vs a sample of ``upstream``'s documents, score every upstream
    document once (cutoff and report), write ``quality/model.bin`` and ``quality/report.json`` to ``ctx.out``.

    ``prefilter`` (optional, called with each upstream document as a dict): the documents it rejects are neither
    negatives nor part of the cutoff and the report (``datatrove_prefilter`` wraps datatrove filters; used by the
    benchmark to compare). Negatives should come from the pool the classifier will judge (DCLM's negatives are
    RefinedWeb, itself heuristically filtered), so that top_percent is a share of that pool; without that, short
    stubs and index pages that the heuristics drop anyway take part (and score high here).

    ``source`` (optional): (Storage, [relative .jsonl.gz paths]) to read instead of ``upstream``'s manifest files.
    The filter stage passes the documents that survived its heuristic pass (no second run of the heuristics).

    Returns {"model_path": local model file in ctx.workdir, "cutoff": float, "report": dict (report.json's
    content), "counts": headline numbers for the manifest, "seconds": {"train": the fastText process(es),
    "score": scoring every upstream document} (wall clock, kept out of the report), "outputs": [the two files]}."""
    import fasttext
    import numpy as np

    mw = cfg.max_words
    pos = read_reference(cfg.positives, ctx.cfg)
    pos_text = {_same_text(d["text"]) for d in pos}
    pos_url = {d["url"] for d in pos if d.get("url")}

    # negatives: the n_neg smallest blake2b(seed, id) among upstream documents that are not positives
    pool = excluded = 0
    heap: list[tuple[bytes, str, str]] = []  # max-heap by negated key bytes
    n_neg = max(1, round(len(pos) * cfg.negatives_per_positive))
    n_neg = min(n_neg, cfg.max_negatives or n_neg)
    rejected: set[str] = set()
    for rel, i, doc in iter_upstream(ctx, upstream, source):
        text = doc.get("text") or ""
        if not text.strip():
            continue
        did = str(doc.get("id") or f"{rel}#{i}")
        if prefilter is not None and not prefilter(doc):
            rejected.add(did)
            continue
        pool += 1
        if (doc.get("metadata") or {}).get("url") in pos_url or _same_text(text) in pos_text:
            excluded += 1
            continue
        neg_key = bytes(255 - b for b in _key(cfg.seed, "negative", did))
        item = (neg_key, did, text)
        if len(heap) < n_neg:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    negs = [{"id": did, "text": t} for _, did, t in sorted(heap, reverse=True)]
    if not negs:
        raise StageError(f"filter.quality: no negatives: '{upstream}' has {pool} non-empty documents, "
                         f"{excluded} of them also positives")

    pos_train, pos_held = _split(pos, cfg.seed, "pos", cfg.heldout_fraction)
    neg_train, neg_held = _split(negs, cfg.seed, "neg", cfg.heldout_fraction)
    if not pos_train or not neg_train:
        raise StageError(f"filter.quality: too few examples to train ({len(pos)} positives, {len(negs)} negatives)")
    lines = [(_key(cfg.seed, "order", POS, d["id"]), _line(POS, preprocess(d["text"], mw))) for d in pos_train]
    lines += [(_key(cfg.seed, "order", NEG, d["id"]), _line(NEG, preprocess(d["text"], mw))) for d in neg_train]
    train_file = os.path.join(ctx.workdir, "quality-train.txt")
    with open(train_file, "w", encoding="utf-8") as f:
        f.writelines(line for _, line in sorted(lines))
    model_path = os.path.join(ctx.workdir, "quality-model.bin")
    params = {"epoch": cfg.epochs, "lr": cfg.lr, "dim": cfg.dim, "wordNgrams": cfg.word_ngrams,
              "minCount": cfg.min_count, "bucket": cfg.bucket, "seed": cfg.seed}
    training = train_model(train_file, model_path, params, cfg.attempts)
    train_seconds = training.pop("seconds")
    model = fasttext.load_model(model_path)

    # held-out evaluation
    held = pos_held + neg_held
    held_scores = score_texts(model, [preprocess(d["text"], mw) for d in held]) if held else []
    held_labels = [True] * len(pos_held) + [False] * len(neg_held)

    # every upstream document once: cutoff and distribution per domain
    trained_neg = {d["id"] for d in neg_train}
    by_domain: dict[str, list[float]] = {}
    neg_in_domain: dict[str, int] = {}
    t0, n_scored, batch = time.perf_counter(), 0, []

    def flush():
        for (dom, did, _), s in zip(batch, score_texts(model, [t for _, _, t in batch])):
            by_domain.setdefault(dom, []).append(s)
            neg_in_domain[dom] = neg_in_domain.get(dom, 0) + (did in trained_neg)
        batch.clear()

    for rel, i, doc in iter_upstream(ctx, upstream, source):
        did = str(doc.get("id") or f"{rel}#{i}")
        if did in rejected:
            continue
        batch.append((_domain(doc), did, preprocess(doc.get("text") or "", mw)))
        n_scored += 1
        if len(batch) >= 512:
            flush()
    if batch:
        flush()
    score_seconds = time.perf_counter() - t0
    all_scores = np.array(sorted((s for v in by_domain.values() for s in v), reverse=True))
    if cfg.keep == "threshold" or not len(all_scores):
        cutoff = float(cfg.threshold)
    else:
        cutoff = float(all_scores[max(1, math.ceil(len(all_scores) * cfg.top_percent / 100)) - 1])
    kept = int((all_scores >= cutoff).sum())

    domains = {}
    for dom in sorted(by_domain):
        v = np.array(by_domain[dom])
        q = np.quantile(v, [0.1, 0.5, 0.9])
        domains[dom] = {"documents": len(v), "mean": round(float(v.mean()), 4), "p10": round(float(q[0]), 4),
                        "p50": round(float(q[1]), 4), "p90": round(float(q[2]), 4),
                        "kept": int((v >= cutoff).sum()), "kept_share": round(float((v >= cutoff).mean()), 4),
                        "training_negatives": neg_in_domain.get(dom, 0)}

    with open(model_path, "rb") as f:
        model_bytes = f.read()
    report = {
        "positives": {"files": cfg.positives.paths, "format": cfg.positives.format, "documents": len(pos),
                      "train": len(pos_train), "heldout": len(pos_held),
                      # the corpus's content (not part of the stage fingerprint, which sees only the config)
                      "sha256": hashlib.sha256("\x00".join(d["text"] for d in pos).encode()).hexdigest()},
        "negatives": {"upstream": upstream, "prefiltered_out": len(rejected), "pool": pool,
                      "excluded_as_positive": excluded, "sampled": len(negs), "train": len(neg_train),
                      "heldout": len(neg_held)},
        "heldout": {"at_0.5": _prf(held_scores, held_labels, 0.5), "at_cutoff": _prf(held_scores, held_labels, cutoff)},
        "training": {**training, "params": params, "model_bytes": len(model_bytes),
                     "model_sha256": hashlib.sha256(model_bytes).hexdigest(), "labels": [POS, NEG]},
        "keep": {"rule": cfg.keep, "threshold": cfg.threshold, "top_percent": cfg.top_percent, "cutoff": cutoff,
                 "scored": n_scored, "kept": kept},
        "domains": domains,
    }
    ctx.out.write_bytes("quality/model.bin", model_bytes)
    ctx.out.write_json("quality/report.json", report)
    h = report["heldout"]["at_0.5"]
    counts = {"quality_precision": h["precision"], "quality_recall": h["recall"], "quality_cutoff": cutoff,
              "quality_upstream_kept": kept, "quality_train_attempts": training["attempts"]}
    return {"model_path": model_path, "cutoff": cutoff, "report": report, "counts": counts,
            "seconds": {"train": train_seconds, "score": round(score_seconds, 3)},
            "outputs": ["quality/model.bin", "quality/report.json"]}


# --------------------------------------------------------------------------------------------------------------
# the datatrove block

class QualityFilter:
    """The classifier as a filter of the stage's filter chain (``filter(doc) -> (keep, reason)``, like datatrove's
    filters): sets ``metadata["quality_score"]``; below ``cutoff`` the document goes with reason ``below_cutoff``.
    The fastText model is loaded once per worker process (not pickled)."""

    def __init__(self, model_path: str, cutoff: float, max_words: int = 2000):
        self.model_path, self.cutoff, self.max_words, self._model = model_path, float(cutoff), max_words, None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    def filter(self, doc) -> bool | tuple[bool, str]:
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self.model_path)
        score = score_texts(self._model, [preprocess(doc.text or "", self.max_words)])[0]
        doc.metadata["quality_score"] = score
        return True if score >= self.cutoff else (False, "below_cutoff")


def _quality_cls():
    from datatrove.pipeline.base import PipelineStep

    class QualityScore(PipelineStep):
        """``QualityFilter`` as a standalone datatrove block (stats: total, kept, dropped); the stage itself runs
        the filter inside its filter chain, so removals are counted and sampled like the heuristics'."""

        type = "🔻 - FILTER"
        name = "🏅 fastText quality"

        def __init__(self, model_path: str, cutoff: float, max_words: int = 2000):
            super().__init__()
            self.quality = QualityFilter(model_path, cutoff, max_words)

        def run(self, data, rank: int = 0, world_size: int = 1):
            for doc in data:
                self.stat_update("total")
                with self.track_time():
                    keep = self.quality.filter(doc) is True
                self.stat_update("kept" if keep else "dropped")
                if keep:
                    yield doc

    return QualityScore


def quality_block(cfg: QualityConfig, model_path: str, cutoff: float):
    """The datatrove block scoring with the model ``train_quality`` wrote (a local file) and keeping score >= cutoff."""
    return _quality_cls()(model_path, float(cutoff), cfg.max_words)
