"""evaluate: scoring formulas against hand computations, each token scored once, the report end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import SHARED, load_tiny, seed_files
from lm_upstream import build_upstream
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.evaluate import doc_windows, eval_docs, score_docs, score_stream, split_documents


class Bigram(nn.Module):
    """Known logits: the next-token distribution depends only on the current token (a V x V table), so a
    document's total NLL is a sum over its consecutive pairs, whatever the windowing, iff every token is
    scored exactly once with its true predecessor as input."""

    def __init__(self, V: int, seed: int = 0):
        super().__init__()
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.calls = []

    def forward(self, x, y, reduction="none"):
        self.calls.append(x.shape)
        logits = self.table[x]  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        return logits, nll.view_as(y)


def _hand_nll(table: np.ndarray, prev: list[int], nxt: list[int]) -> float:
    logp = table - np.log(np.exp(table).sum(axis=1, keepdims=True))  # log-softmax by hand
    return float(-sum(logp[a, b] for a, b in zip(prev, nxt)))


def test_windows_score_every_token_once():
    ids = list(range(10, 27))  # 17 tokens
    for T in (1, 4, 16, 17, 64):
        xs, ys = doc_windows(ids, eos_id=2, T=T)
        assert sum(ys, []) == ids  # every target exactly once, in order
        assert all(len(x) == len(y) <= T for x, y in zip(xs, ys))
        assert [x[0] for x in xs] == [2] + [ids[len(sum(ys[:k], [])) - 1] for k in range(1, len(xs))]


def test_score_docs_matches_hand_computation():
    V, eos = 11, 2
    model = Bigram(V)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V, n).tolist() for n in (1, 5, 9, 23)]
    table = model.table.numpy()
    for T in (3, 8, 50):
        totals = score_docs(model, docs, eos, T, batch_size=3)
        for d, total in zip(docs, totals):
            assert total == pytest.approx(_hand_nll(table, [eos] + d[:-1], d), rel=1e-9)
    # stream: tokens[1:] each scored once
    stream = rng.integers(0, V, 40)
    nll, n = score_stream(model, stream, T=7, batch_size=2)
    assert n == 39 and nll == pytest.approx(_hand_nll(table, stream[:-1], stream[1:]), rel=1e-9)


def test_bits_per_byte_with_uniform_model(tmp_path):
    """Uniform logits: loss = ln V per token, perplexity = V, bits/byte = tokens * log2(V) / bytes."""
    import sentencepiece as spm

    from lm_upstream import shakespeare_docs, train_spm

    class Uniform(Bigram):
        def forward(self, x, y, reduction="none"):
            return super().forward(torch.zeros_like(x), y)

    V = 400
    docs = shakespeare_docs(60_000)
    model_path, tok = train_spm(docs, tmp_path, V)
    sp = spm.SentencePieceProcessor(model_file=model_path)
    model = Uniform(V)
    model.table.zero_()
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "Ünïcode — bytes ≠ chars", "x"]
    r = eval_docs(model, texts, sp, tok["eos_id"], T=16, max_tokens=10_000, batch_size=4)
    n_tok = sum(len(sp.encode(t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (r["tokens"], r["bytes"], r["documents"]) == (n_tok, n_bytes, 3)
    assert r["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert r["perplexity"] == pytest.approx(V, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(n_tok * math.log2(V) / n_bytes, rel=1e-5)
    # the budget keeps whole documents and skips those that would pass it
    lens = [len(sp.encode(t)) for t in texts]
    assert lens[1] > lens[2]
    r2 = eval_docs(model, texts, sp, tok["eos_id"], T=16, max_tokens=lens[0] + lens[2], batch_size=4)
    assert (r2["documents"], r2["tokens"], r2["bytes"]) == (2, lens[0] + lens[2], len(texts[0].encode()) + 1)


def test_wikitext_split_into_articles():
    text = (SHARED / "eval" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    docs = split_documents(text, "wikitext")
    titles = [ln for ln in text.splitlines() if ln.startswith(" = ") and not ln.startswith(" = = ")]
    assert len(docs) == len(titles) > 50
    assert docs[0].startswith("= Homarus gammarus =") and all(d.startswith("= ") for d in docs)
    assert "= = Description = =" in docs[0] and "\n\n" not in docs[0]
    assert len(split_documents(text, "paragraphs")) > len(docs)


@pytest.fixture
def trained(tmp_path):
    """Upstream artifacts from real text plus a 'train' output holding a freshly initialised GPT."""
    from stages.train.checkpoint import save_model
    from stages.train.model import GPT, GPTConfig

    storage = str(tmp_path / "store")
    facts = build_upstream(storage, "run1", tmp_path / "build", max_bytes=200_000, vocab_size=400)
    torch.manual_seed(0)
    gcfg = GPTConfig(vocab_size=400, seq_len=32, d_model=32, n_layers=1, n_heads=2)
    ckpt = Storage(tmp_path / "ckpt")
    save_model(ckpt, "final", GPT(gcfg), gcfg, {"step": 7, "tokens": 1234})
    seed_files(storage, "run1", "train", {p: ckpt.read_bytes(p) for p in ckpt.list()},
               counts={"steps": 7, "tokens_trained": 1234})
    return storage, facts


def test_evaluate_report(trained):
    import sentencepiece as spm

    storage, facts = trained
    wiki = {"name": "wikitext-2", "path": "../../shared/data/eval/wikitext-2/valid.txt", "max_tokens": 3000}
    cfg = load_tiny(None, {"evaluate.val_tokens": 3000, "evaluate.doc_tokens": 2500, "evaluate.sets": [wiki]})
    m = run_stage("evaluate", cfg, storage, "run1")
    report = Storage(storage).sub("run1", "evaluate").read_json("report.json")
    sets = report["sets"]
    assert set(sets) == {"validation", "validation_docs", "wikitext-2"}
    for name, s in sets.items():
        assert {"tokens", "bytes", "loss", "perplexity", "bits_per_byte"} <= set(s)
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]), rel=1e-4)
        assert s["loss"] == pytest.approx(math.log(400), abs=0.5)  # an untrained model is near uniform
    assert sets["validation"]["tokens"] == 3000 and sets["validation"]["bytes"] is None
    # the docs set: whole validation texts in order, those that fit the budget, counted exactly
    sp = spm.SentencePieceProcessor(model_file=facts["tokenizer"]["model_path"])
    texts, n = [], 0
    for t in facts["validation"]["texts"]:
        if n + len(sp.encode(t)) <= 2500:
            texts.append(t)
            n += len(sp.encode(t))
    assert sets["validation_docs"]["documents"] == len(texts) >= 2
    assert sets["validation_docs"]["tokens"] == n
    assert sets["validation_docs"]["bytes"] == sum(len(t.encode()) for t in texts)
    d = sets["validation_docs"]
    assert d["bits_per_byte"] == pytest.approx(d["loss"] * d["tokens"] / d["bytes"] / math.log(2), rel=1e-4)
    # WikiText's first article alone passes the 3000-token budget: it is scored whole, nothing else
    first = split_documents((SHARED / "eval" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"), "wikitext")[0]
    w = sets["wikitext-2"]
    assert (w["documents"], w["tokens"], w["bytes"]) == (1, len(sp.encode(first)), len(first.encode()))
    assert report["step"] == 7 and m["metrics"]["val_bits_per_byte"] == d["bits_per_byte"]


def test_evaluate_missing_inputs_fail_clearly(trained):
    storage, _ = trained
    bad = load_tiny(None, {"evaluate.sets": [{"name": "nope", "path": "/nonexistent/valid.txt"}],
                           "evaluate.val_tokens": 100, "evaluate.doc_tokens": 100})
    with pytest.raises(StageError, match=r"eval set 'nope' at /nonexistent/valid.txt"):
        run_stage("evaluate", bad, storage, "run1")
    with pytest.raises(StageError, match="no checkpoint 'step_9'"):
        run_stage("evaluate", load_tiny(None, {"evaluate.checkpoint": "step_9"}), storage, "run1")


def test_train_then_evaluate_on_s3(s3_bucket, tmp_path):
    """The real chain on S3 (moto_server): shards and tokenizer in a bucket, a 2-rank torchrun run writing
    its checkpoints there, then evaluate reading them; the trained model beats an untrained one."""
    storage = f"{s3_bucket}/kiln"
    build_upstream(storage, "s3run", tmp_path / "build", max_bytes=150_000, vocab_size=400)
    cfg = load_tiny(None, {"train.model.d_model": 64, "train.model.n_layers": 2, "train.model.n_heads": 2,
                           "train.model.seq_len": 64, "train.global_batch": 8, "train.micro_batch": 4,
                           "train.steps": 25, "train.warmup_steps": 5, "train.lr": 1e-2, "train.checkpoint_every": 0,
                           "train.dtype": "fp32", "evaluate.val_tokens": 2000, "evaluate.doc_tokens": 2000,
                           "evaluate.sets": []})
    t = run_stage("train", cfg, storage, "s3run")
    assert {"final/model.pt", "checkpoints/step_000025/model.pt", "metrics.jsonl"} <= {o["path"] for o in t["outputs"]}
    assert t["location"].startswith("s3://")
    m = run_stage("evaluate", cfg, storage, "s3run")
    sets = Storage(storage).sub("s3run", "evaluate").read_json("report.json")["sets"]
    assert set(sets) == {"validation", "validation_docs"}
    assert m["metrics"]["val_loss"] < math.log(400) - 0.5  # trained: well below uniform
    assert abs(sets["validation"]["loss"] - t["metrics"]["final_loss"]) < 1.0  # held-out near train loss
