"""evaluate: lm-eval conventions (rolling windows, word/byte metrics, WikiText pages, LAMBADA) against hand
computations on models with known logits, eval sets from the real shared files, checkpoint series, the report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import SHARED, load_tiny, seed_files
from lm_upstream import build_upstream, shakespeare_docs, train_spm
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.eval_tasks import (count_words, encode_pair, generate, last_word_split, read_jsonl, rolling_windows,
                               split_documents, wikitext_detokenize, wikitext_pages)
from stages.evaluate import eval_docs, eval_last_word, prepare_docs, prepare_last_word, score_docs, score_stream

WIKI = SHARED / "eval" / "wikitext-2" / "valid.txt"
PTB = SHARED / "eval" / "ptb" / "ptb.valid.txt"
SHAKESPEARE = SHARED / "eval" / "tinyshakespeare" / "input.txt"


class Bigram(nn.Module):
    """Known logits: the next-token distribution depends only on the current token (a V x V table), so a
    document's total NLL is a sum over its consecutive pairs, whatever the windowing, iff every token is
    scored exactly once with its true predecessor as input."""

    def __init__(self, V: int, seed: int = 0):
        super().__init__()
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def forward(self, x, y=None, reduction="none"):
        logits = self.table[x]  # (B, T, V)
        if y is None:
            return logits, None
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        return logits, nll.view_as(y)


class Uniform(Bigram):
    def __init__(self, V: int):
        super().__init__(V)
        self.table.zero_()


def _logp(table: np.ndarray) -> np.ndarray:
    return table - np.log(np.exp(table).sum(axis=1, keepdims=True))  # log-softmax by hand


def _hand_nll(table: np.ndarray, prev, nxt) -> float:
    logp = _logp(table)
    return float(-sum(logp[a, b] for a, b in zip(prev, nxt)))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    import sentencepiece as spm

    model_path, tok = train_spm(shakespeare_docs(60_000), tmp_path_factory.mktemp("spm"), 400)
    return spm.SentencePieceProcessor(model_file=model_path), tok


# -- windows -------------------------------------------------------------------------------------------------
def test_rolling_windows_are_lm_eval_windows():
    """lm-eval's own gold case (tests/test_utils.py: 34 tokens, max_seq_len 10, context_len 1), after
    make_disjoint_window: the last window reads the 10 tokens before its last prediction, scores 4."""
    got = rolling_windows(list(range(34)), prefix_id=-100, T=10)
    assert got == [([-100] + list(range(9)), list(range(10))),
                   (list(range(9, 19)), list(range(10, 20))),
                   (list(range(19, 29)), list(range(20, 30))),
                   (list(range(23, 33)), [-100] * 6 + list(range(30, 34)))]
    for n in (1, 5, 16, 17, 33):
        ids = list(range(100, 100 + n))
        seq = [7] + ids
        for T in (1, 4, 16, 17, 64):
            wins = rolling_windows(ids, 7, T)
            assert [t for _, y in wins for t in y if t != -100] == ids  # every token once, in order
            for x, y in wins:
                assert len(x) == len(y) <= T
                j = seq.index(y[-1])
                assert x == seq[j - len(x): j]  # the true tokens right before the last target, contiguous
    assert rolling_windows([], 7, 4) == []


LM_EVAL_WHEEL = Path("/opt/pypi-more/files/lm_eval-0.4.13-py3-none-any.whl")


@pytest.mark.skipif(not LM_EVAL_WHEEL.exists(), reason="lm-eval's wheel is not on this machine")
def test_same_as_lm_eval_code(tmp_path):
    """lm-eval 0.4.13's own functions, read from its wheel on this machine (not installed, not a dependency):
    rolling windows as HFLM feeds them to the model, the WikiText detokenizer and word/byte counts."""
    import importlib.util
    import random
    import zipfile

    def load(member):
        with zipfile.ZipFile(LM_EVAL_WHEEL) as z:
            path = z.extract(member, tmp_path)
        spec = importlib.util.spec_from_file_location(member.replace("/", "_")[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    lu, pw = load("lm_eval/utils.py"), load("lm_eval/tasks/wikitext/preprocess_wikitext.py")
    rng = random.Random(0)
    for _ in range(500):
        n, T = rng.randint(1, 200), rng.randint(1, 40)
        ids = [rng.randint(0, 999) for _ in range(n)]
        theirs = []
        for ctx, cont in map(lu.make_disjoint_window, lu.get_rolling_token_windows(ids, -7, T, 1)):
            inp = (ctx + cont)[-(T + 1):][:-1]  # HFLM._loglikelihood_tokens: the model's input, last len(cont) scored
            theirs.append((inp, [-100] * (len(inp) - len(cont)) + cont))
        assert rolling_windows(ids, -7, T) == theirs
    for page in wikitext_pages(WIKI.read_text(encoding="utf-8")):
        assert wikitext_detokenize(page) == pw.wikitext_detokenizer({"page": page})
        r = pw.process_results({"page": page}, (-1.0,))
        assert (r["word_perplexity"][1], r["bits_per_byte"][1]) == (count_words(page), len(page.encode()))


def test_score_docs_matches_hand_computation_for_any_window():
    """Bigram logits: each document's NLL is its pair sum (EOS before the first token) for every context
    length, so bits/byte does not move when the same text is windowed differently."""
    V, eos = 11, 2
    model = Bigram(V)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V, n).tolist() for n in (1, 5, 9, 23)]
    table = model.table.numpy()
    hand = [_hand_nll(table, [eos] + d[:-1], d) for d in docs]
    for T in (1, 2, 3, 8, 22, 23, 50):
        totals = score_docs(model, docs, eos, T, batch_size=3)
        assert totals == pytest.approx(hand, rel=1e-12)
    stream = rng.integers(0, V, 40)
    nll, n = score_stream(model, stream, T=7, batch_size=2)
    assert n == 39 and nll == pytest.approx(_hand_nll(table, stream[:-1], stream[1:]), rel=1e-12)


class Table(Bigram):
    """A bigram model with given next-token probabilities (logits = their logs)."""

    def __init__(self, probs):
        super().__init__(len(probs))
        self.table = torch.tensor(probs, dtype=torch.float64).log()


def test_metrics_exact_numbers_on_a_hand_model():
    """Every metric in exact numbers, computed on paper. Vocabulary 0-3, EOS = 3, next-token probabilities
    powers of 2, so each token costs a whole number of bits. Document A = tokens [0, 1, 2] (3 words, 12 bytes):
    p(0|EOS) = 1/2, p(1|0) = 1/4, p(2|1) = 1/8 -> 1 + 2 + 3 = 6 bits. Document B = [2, 2] (2 words, 8 bytes):
    p(2|EOS) = 1/8, p(2|2) = 1/2 -> 3 + 1 = 4 bits. Summed over documents: 10 bits over 5 tokens, 5 words,
    20 bytes: bits_per_byte = 10/20 = 0.5, byte_perplexity = 2^0.5, word_perplexity = 2^(10/5) = 4,
    token perplexity = 2^(10/5) = 4, loss = 2 ln 2 nats, loglikelihood = -10 ln 2. Any context length."""
    probs = [[1 / 8, 1 / 4, 1 / 2, 1 / 8],   # after 0
             [1 / 2, 1 / 8, 1 / 8, 1 / 4],   # after 1
             [1 / 8, 1 / 4, 1 / 2, 1 / 8],   # after 2
             [1 / 2, 1 / 4, 1 / 8, 1 / 8]]   # after EOS (3)
    docs = [([0, 1, 2], 3, 12), ([2, 2], 2, 8)]
    for T in (1, 2, 3, 16):
        r = eval_docs(Table(probs), docs, eos_id=3, T=T, batch_size=1)
        assert (r["documents"], r["tokens"], r["words"], r["bytes"]) == (2, 5, 5, 20)
        assert r["loglikelihood"] == pytest.approx(-10 * math.log(2), abs=1e-12)
        assert (r["bits_per_byte"], r["word_perplexity"], r["perplexity"]) == (0.5, 4.0, 4.0)
        assert (r["byte_perplexity"], r["loss"]) == (1.414214, 1.386294)  # 2^0.5 and 2 ln 2, rounded to 6 places
    assert score_docs(Table(probs), [d[0] for d in docs], 3, T=2) == pytest.approx([6 * math.log(2), 4 * math.log(2)])
    # the validation stream: tokens[1:] each predicted from its predecessor, the first token only read
    nll, n = score_stream(Table(probs), [3, 0, 1, 2, 2], T=2)  # 1 + 2 + 3 + 1 bits
    assert n == 4 and nll == pytest.approx(7 * math.log(2), abs=1e-12)


def test_bits_per_byte_unchanged_when_the_text_is_windowed_differently(sp_tok):
    """The same real text (Tiny Shakespeare speeches through the real tokenizer) cut into windows of 1 token up to
    the longest document, scored in batches of 1 to 9 windows: a model whose prediction depends on the previous token only
    must give the same bits per byte for every split iff every token is scored once with its true predecessor
    (the first one after EOS). It does, to the last digit, and equals the pair sum computed with numpy."""
    sp, tok = sp_tok
    paras = _passages(8)
    docs = prepare_docs(paras, sp, 100_000)
    model = Bigram(sp.get_piece_size(), seed=7)
    table = model.table.numpy()
    nll = sum(_hand_nll(table, [tok["eos_id"]] + d[0][:-1], d[0]) for d in docs)
    n_bytes = sum(len(p.encode()) for p in paras)
    longest = max(len(d[0]) for d in docs)
    splits, bpb = set(), set()
    for T, bs in ((1, 9), (2, 1), (3, 4), (7, 2), (16, 3), (longest // 2 + 1, 5), (longest, 2)):
        splits.add(sum(len(rolling_windows(d[0], tok["eos_id"], T)) for d in docs))
        r = eval_docs(model, docs, tok["eos_id"], T, bs)
        assert r["loglikelihood"] == pytest.approx(-nll, rel=1e-12) and r["bytes"] == n_bytes
        bpb.add(r["bits_per_byte"])
    assert len(splits) == 7 and longest // 2 > 16  # seven different splits, down to every document in one window
    assert bpb == {round(nll / n_bytes / math.log(2), 6)}
    # a real GPT sees more context in longer windows, so its bits/byte may move with T (the invariance is a
    # property of the windowing, shown above); what must not move it is how the same windows are batched
    # (padding after a window is causal-masked)
    from stages.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=sp.get_piece_size(), seq_len=32, d_model=32, n_layers=1, n_heads=2)).double().eval()
    one = [eval_docs(gpt, docs, tok["eos_id"], 32, bs)["loglikelihood"] for bs in (1, 3, 16)]
    assert one == pytest.approx([one[0]] * 3, rel=1e-12)
    assert eval_docs(gpt, docs, tok["eos_id"], 8, 4)["loglikelihood"] != pytest.approx(one[0], rel=1e-6)


def test_lm_eval_metrics_by_hand(sp_tok):
    """word_perplexity, byte_perplexity and bits_per_byte summed over documents, against numpy, for real
    text through the real tokenizer; a uniform model gives them in closed form."""
    sp, tok = sp_tok
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", " Ünïcode — bytes ≠ chars \n", "x"]
    V = sp.get_piece_size()
    docs = prepare_docs(texts, sp, 10_000)
    ids = [sp.encode(t) for t in texts]
    words = [len(re.split(r"\s+", t)) for t in texts]
    assert [d[1] for d in docs] == words == [10, 7, 1]  # " a ... \n": leading and trailing '' counted
    nbytes = [len(t.encode("utf-8")) for t in texts]
    model = Bigram(V, seed=3)
    table = model.table.numpy()
    nll = sum(_hand_nll(table, [tok["eos_id"]] + i[:-1], i) for i in ids)
    for T in (4, 64):
        r = eval_docs(model, docs, tok["eos_id"], T, batch_size=2)
        assert (r["documents"], r["tokens"], r["words"], r["bytes"]) == (3, sum(map(len, ids)), sum(words), sum(nbytes))
        assert r["loglikelihood"] == pytest.approx(-nll, rel=1e-12)
        assert r["word_perplexity"] == pytest.approx(math.exp(nll / sum(words)), rel=1e-6)
        assert r["byte_perplexity"] == pytest.approx(math.exp(nll / sum(nbytes)), rel=1e-6)
        assert r["bits_per_byte"] == pytest.approx(nll / sum(nbytes) / math.log(2), rel=1e-6)
        assert r["loss"] == pytest.approx(nll / r["tokens"], abs=1e-6)
    u = eval_docs(Uniform(V), docs, tok["eos_id"], 16)
    n_tok = sum(map(len, ids))
    assert u["perplexity"] == pytest.approx(V, rel=1e-6)
    assert u["bits_per_byte"] == pytest.approx(n_tok * math.log2(V) / sum(nbytes), rel=1e-6)
    assert u["word_perplexity"] == pytest.approx(V ** (n_tok / sum(words)), rel=1e-6)
    # the budget keeps whole documents and skips those that would pass it
    lens = [len(i) for i in ids]
    kept = prepare_docs(texts, sp, lens[0] + lens[2])
    assert [d[0] for d in kept] == [ids[0], ids[2]]


# -- documents -----------------------------------------------------------------------------------------------
def test_wikitext_pages_and_detokenizer_as_lm_eval():
    text = WIKI.read_text(encoding="utf-8")
    pages = wikitext_pages(text)
    titles = [ln for ln in text.split("\n") if re.fullmatch(r" = [^=].* = ", ln)]
    assert len(pages) == len(titles) == 60
    assert "\n".join([" "] + pages) == text  # every line kept, in order (only the blank first line is no page)
    assert pages[0].startswith(" = Homarus gammarus = \n \n") and "\n \n = = Description = = \n" in pages[0]
    assert split_documents(text, "wikitext") == pages
    # lm-eval's detokenizer on a real sentence of the first page
    src = "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) , and bears a"
    assert src in pages[0]
    assert wikitext_detokenize(src) == "It may grow to a length of 60 cm (24 in) and a mass of 6 kilograms (13 lb), and bears a"
    assert wikitext_detokenize(" 0 @.@ 7 – 2 @.@ 2 kg \n = = Description = = \n") == " 0.7 – 2.2 kg\n== Description ==\n"
    assert count_words(pages[0]) == len(pages[0].split()) + 2  # leading ' ' and trailing '\n ' count as words


def test_plain_text_formats_and_jsonl(tmp_path):
    ptb = PTB.read_text(encoding="utf-8")
    lines = split_documents(ptb, "lines")
    assert len(lines) == 3370 and lines[0] == " consumers may want to move their telephones a little closer to the tv set "
    shake = SHAKESPEARE.read_text(encoding="utf-8")
    paras = split_documents(shake, "paragraphs")
    assert paras[0] == "First Citizen:\nBefore we proceed any further, hear me speak." and len(paras) > 7000
    assert split_documents(shake, "whole") == [shake]
    # JSONL: bad lines are counted and skipped, never fatal
    recs = [json.dumps({"text": p, "id": i}) for i, p in enumerate(paras[:5])]
    recs[4] = json.dumps({"text": paras[4] + "\u2028"}, ensure_ascii=False)  # a line break inside a string
    raw = "\n".join([recs[0], "{not json", recs[1], json.dumps({"body": "x"}), json.dumps([1, 2]), "", recs[2],
                     json.dumps({"text": 3}), recs[3], recs[4]])
    texts, skipped = read_jsonl(raw, "text", "x.jsonl")
    assert texts == paras[:4] + [paras[4] + "\u2028"] and skipped == 4


# -- last word ------------------------------------------------------------------------------------------------
def _passages(n: int) -> list[str]:
    """Real passages: Tiny Shakespeare speeches as one line each."""
    return [" ".join(p.split()) for p in split_documents(SHAKESPEARE.read_text(encoding="utf-8"), "paragraphs")[:n]]


def test_last_word_split_and_encoding(sp_tok):
    sp, _ = sp_tok
    assert last_word_split("First Citizen: Before we proceed any further, hear me speak.") == (
        "First Citizen: Before we proceed any further, hear me", " speak.")
    assert last_word_split("single") is None and last_word_split("ends with space ") is None
    ctx, cont = encode_pair(sp, "hear me", " speak.")
    assert ctx + cont == sp.encode("hear me speak.") and ctx == sp.encode("hear me") and cont
    ctx2, cont2 = encode_pair(sp, "hear me ", "speak.")  # trailing context spaces move to the continuation
    assert (ctx2, cont2) == (ctx, cont)


def test_last_word_accuracy_and_perplexity_by_hand(sp_tok):
    """A bigram table built so that one passage's last word is the greedy continuation (and greedy decoding
    really produces it); accuracy and perplexity of all passages against numpy."""
    sp, tok = sp_tok
    eos, V = tok["eos_id"], sp.get_piece_size()
    passages = _passages(40)
    pairs, skipped = prepare_last_word(passages, sp, 1000)
    assert skipped == 0 and len(pairs) == 40
    model = Bigram(V, seed=1)
    model.table *= 0.1
    k = next(i for i, (c, w) in enumerate(pairs) if len({c[-1], *w[:-1]}) == len(w))  # no repeated predecessor
    c0, w0 = pairs[k]
    for a, b in zip([c0[-1]] + w0[:-1], w0):
        model.table[a, b] = 10.0  # passage k: each word token is its predecessor's argmax
    table = model.table.numpy()
    logp = _logp(table)
    hits, lls = [], []
    for c, w in pairs:
        prev = [c[-1]] + w[:-1]
        hits.append(all(int(np.argmax(table[a])) == b for a, b in zip(prev, w)))
        lls.append(sum(logp[a, b] for a, b in zip(prev, w)))
    assert hits[k] and not all(hits)
    r = eval_last_word(model, pairs, eos, T=16, batch_size=7)
    assert r["examples"] == 40 and r["accuracy"] == pytest.approx(sum(hits) / 40, abs=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(-sum(lls) / 40), rel=1e-6)
    assert r["loglikelihood"] == pytest.approx(sum(lls), rel=1e-12)
    # the accuracy criterion is greedy decoding: generating from the context reproduces exactly the word
    for (c, w), hit in zip(pairs, hits):
        assert (generate(model, c, eos, 16, len(w)) == w) == hit


def test_generate_greedy_and_top_k_with_a_seed():
    V, eos = 13, 2
    model = Bigram(V, seed=5)
    table = model.table.numpy()
    chain, cur = [], 4
    for _ in range(6):
        cur = int(np.argmax(table[cur]))
        if cur == eos:
            break
        chain.append(cur)
    assert generate(model, [4], eos, T=8, max_new_tokens=6) == chain
    assert generate(model, [4], eos, T=8, max_new_tokens=6, top_k=1) == chain  # top-1 sampling is greedy
    a = generate(model, [4], eos, T=8, max_new_tokens=20, top_k=5, seed=11)
    assert a == generate(model, [4], eos, T=8, max_new_tokens=20, top_k=5, seed=11)
    samples = {tuple(generate(model, [4], eos, T=8, max_new_tokens=20, top_k=5, seed=s)) for s in range(6)}
    assert len(samples) > 1
    ranks = np.argsort(-table, axis=1)[:, :5]
    prev = [4] + a[:-1]
    assert all(b in ranks[p] for p, b in zip(prev, a))  # only the 5 most likely next tokens are drawn
    model.table[4, eos] = 100.0
    assert generate(model, [4], eos, T=8, max_new_tokens=6) == []  # stops at EOS


# -- the stage ------------------------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path):
    """Upstream artifacts from real text plus a 'train' output holding two freshly initialised GPTs:
    checkpoints/step_000003, and checkpoints/step_000007 = final."""
    from stages.train.checkpoint import save_model
    from stages.train.model import GPT, GPTConfig

    storage = str(tmp_path / "store")
    facts = build_upstream(storage, "run1", tmp_path / "build", max_bytes=200_000, vocab_size=400)
    gcfg = GPTConfig(vocab_size=400, seq_len=32, d_model=32, n_layers=1, n_heads=2)
    ckpt = Storage(tmp_path / "ckpt")
    torch.manual_seed(1)
    save_model(ckpt, "checkpoints/step_000003", GPT(gcfg), gcfg, {"step": 3, "tokens": 500})
    torch.manual_seed(0)
    last = GPT(gcfg)
    for rel in ("checkpoints/step_000007", "final"):  # as train writes them when the last step is a checkpoint
        save_model(ckpt, rel, last, gcfg, {"step": 7, "tokens": 1234})
    seed_files(storage, "run1", "train", {p: ckpt.read_bytes(p) for p in ckpt.list()},
               counts={"steps": 7, "tokens_trained": 1234})
    lw = tmp_path / "lambada.jsonl"
    lw.write_text("\n".join(json.dumps({"text": p}) for p in _passages(30)) + "\n{broken\n", encoding="utf-8")
    return storage, facts, tmp_path


def _budget(texts, sp, max_tokens):
    """The documented budget: whole documents in order, skipping those that would pass it."""
    kept, n = [], 0
    for t in texts:
        if n + len(sp.encode(t)) <= max_tokens:
            kept.append(t)
            n += len(sp.encode(t))
    return kept


def test_evaluate_report(trained):
    import sentencepiece as spm

    storage, facts, tmp = trained
    paras = [" ".join(p.split()) for p in split_documents(SHAKESPEARE.read_text(encoding="utf-8"), "paragraphs")]
    long = [p for p in paras if len(p.split()) >= 25]
    (tmp / "speeches.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in long[:12]), encoding="utf-8")
    sets = [{"name": "wikitext-2", "path": "../../shared/data/eval/wikitext-2/valid.txt", "max_tokens": 3000},
            {"name": "ptb", "path": "../../shared/data/eval/ptb/ptb.valid.txt", "format": "lines", "max_tokens": 400},
            {"name": "shakespeare", "path": "../../shared/data/eval/tinyshakespeare/input.txt",
             "format": "paragraphs", "max_tokens": 300},
            {"name": "passages", "path": str(tmp / "lambada.jsonl"), "format": "jsonl", "max_tokens": 500}]
    cfg = load_tiny(None, {"evaluate.val_tokens": 3000, "evaluate.doc_tokens": 2500, "evaluate.sets": sets,
                           "evaluate.checkpoints": [],
                           "evaluate.last_word": [
                               {"path": str(tmp / "lambada.jsonl")},
                               {"name": "speeches", "path": "../../shared/data/eval/tinyshakespeare/input.txt",
                                "format": "paragraphs", "min_words": 25, "max_examples": 12},
                               {"name": "speeches-jsonl", "path": str(tmp / "speeches.jsonl")}],
                           "evaluate.generate": {"prompts": ["First Citizen:", "KING"], "max_new_tokens": 8,
                                                 "samples": 2}})
    m = run_stage("evaluate", cfg, storage, "run1")
    out = Storage(storage).sub("run1", "evaluate")
    report = out.read_json("report.json")
    sets = report["sets"]
    assert set(sets) == {"validation", "validation_docs", "wikitext-2", "ptb", "shakespeare", "passages"}
    for name, s in sets.items():
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]), rel=1e-4)
        assert s["loss"] == pytest.approx(math.log(400), abs=0.5)  # an untrained model is near uniform
        if name != "validation":
            nll = -s["loglikelihood"]
            assert s["bits_per_byte"] == pytest.approx(nll / s["bytes"] / math.log(2), rel=1e-5)
            assert s["byte_perplexity"] == pytest.approx(math.exp(nll / s["bytes"]), rel=1e-5)
            assert s["word_perplexity"] == pytest.approx(math.exp(nll / s["words"]), rel=1e-4)
    assert sets["validation"]["tokens"] == 3000 and sets["validation"]["bytes"] is None
    sp = spm.SentencePieceProcessor(model_file=facts["tokenizer"]["model_path"])
    # the docs set: whole validation texts in order, those that fit the budget, counted exactly
    texts = _budget(facts["validation"]["texts"], sp, 2500)
    n = sum(len(sp.encode(t)) for t in texts)
    d = sets["validation_docs"]
    assert (d["documents"], d["tokens"], d["bytes"]) == (len(texts), n, sum(len(t.encode()) for t in texts))
    assert d["words"] == sum(len(re.split(r"\s+", t)) for t in texts) and d["documents"] >= 2
    # WikiText: the first page alone passes the budget, scored detokenized, words and bytes of the page as is
    page = wikitext_pages(WIKI.read_text(encoding="utf-8"))[0]
    w = sets["wikitext-2"]
    assert (w["documents"], w["tokens"]) == (1, len(sp.encode(wikitext_detokenize(page))))
    assert (w["words"], w["bytes"]) == (len(re.split(r"\s+", page)), len(page.encode()))
    p, kept = sets["ptb"], _budget(PTB.read_text(encoding="utf-8").splitlines(), sp, 400)
    assert (p["documents"], p["tokens"]) == (len(kept), sum(len(sp.encode(ln)) for ln in kept))
    assert p["words"] == sum(len(re.split(r"\s+", ln)) for ln in kept) and p["documents"] > 5
    assert sets["passages"]["skipped_lines"] == 1
    lw = report["last_word"]["lambada"]
    assert lw["examples"] == 30 and lw["skipped_lines"] == 1 and 0 <= lw["accuracy"] <= 1
    assert lw["perplexity"] == pytest.approx(math.exp(-lw["loglikelihood"] / 30), rel=1e-4)
    assert lw["perplexity"] > 50  # untrained: a whole word is far less likely than a token
    # passages cut from the plain-text file = the same passages as LAMBADA-format JSONL: the same numbers
    sp_, sj = report["last_word"]["speeches"], report["last_word"]["speeches-jsonl"]
    assert sp_["examples"] == sj["examples"] == 12 and sp_["too_short"] == len(paras) - len(long) > 0
    assert {k: sp_[k] for k in ("accuracy", "perplexity", "loglikelihood", "word_tokens")} == \
           {k: sj[k] for k in ("accuracy", "perplexity", "loglikelihood", "word_tokens")}
    gens = report["generations"]
    assert [(g["prompt"], g["mode"], g["seed"]) for g in gens] == [
        ("First Citizen:", "greedy", None), ("First Citizen:", "top_k", 0), ("First Citizen:", "top_k", 1),
        ("KING", "greedy", None), ("KING", "top_k", 0), ("KING", "top_k", 1)]
    assert all(0 < g["new_tokens"] <= 8 and g["text"] for g in gens)
    md = out.read_bytes("generations.md").decode()
    assert md.count("```text\nFirst Citizen:") == 3 and "top-40" in md
    assert report["step"] == 7 and m["metrics"]["val_bits_per_byte"] == d["bits_per_byte"]
    assert m["metrics"]["lambada_accuracy"] == lw["accuracy"] and m["metrics"]["ptb_word_perplexity"] == p["word_perplexity"]
    assert {o["path"] for o in m["outputs"]} == {"report.json", "generations.md"}


def test_checkpoint_series_and_uri(trained, s3_bucket):
    """checkpoints: all evaluates every step folder plus final into a curve (step_000007 is final's weights:
    evaluated once); a checkpoint given by local path or s3:// URI gives the same numbers as the same folder
    in the train output."""
    storage, _, tmp = trained
    base = {"evaluate.val_tokens": 600, "evaluate.doc_tokens": 600, "evaluate.checkpoints": [], "evaluate.generate.prompts": [],
            "evaluate.sets": [{"name": "ptb", "path": str(PTB), "format": "lines", "max_tokens": 300}]}
    m = run_stage("evaluate", load_tiny(None, {**base, "evaluate.checkpoints": "all"}), storage, "run1")
    report = Storage(storage).sub("run1", "evaluate").read_json("report.json")
    curve = report["curve"]
    assert [(c["checkpoint"], c["step"], c["tokens_trained"]) for c in curve] == [("step_000003", 3, 500), ("final", 7, 1234)]
    assert curve[1]["sets"] == report["sets"]  # final is the head checkpoint, evaluated once
    assert curve[0]["sets"]["ptb"]["loglikelihood"] != curve[1]["sets"]["ptb"]["loglikelihood"]
    assert [c["step"] for c in m["metrics"]["curve"]] == [3, 7] and m["counts"]["checkpoints"] == 2

    step3 = curve[0]["sets"]
    local = str(tmp / "store" / "run1" / "train" / "checkpoints" / "step_000003")
    for name in ("step_000003", local):
        run_stage("evaluate", load_tiny(None, {**base, "evaluate.checkpoint": name}), storage, "run1")
        r = Storage(storage).sub("run1", "evaluate").read_json("report.json")
        assert r["step"] == 3 and r["sets"] == step3 and "curve" not in r
    remote = Storage(f"{s3_bucket}/ckpts")
    for f in ("model.pt", "model_config.json"):
        remote.put_file(f"{local}/{f}", f"step3/{f}")
    run_stage("evaluate", load_tiny(None, {**base, "evaluate.checkpoint": f"{s3_bucket}/ckpts/step3"}), storage, "run1")
    r = Storage(storage).sub("run1", "evaluate").read_json("report.json")
    assert r["checkpoint"] == f"{s3_bucket}/ckpts/step3" and r["sets"] == step3


def test_cli_stage_evaluate_checkpoint(trained, capsys):
    """`kiln stage evaluate --checkpoint URI|name`: any checkpoint folder, given on the command line."""
    from flows.cli import main

    storage, _, tmp = trained
    local = str(tmp / "store" / "run1" / "train" / "checkpoints" / "step_000003")
    common = ["--storage", storage, "--run-id", "run1", "--set", "evaluate.sets=[]", "--set", "evaluate.checkpoints=[]",
              "--set", "evaluate.val_tokens=300", "--set", "evaluate.doc_tokens=300",
              "--set", "evaluate.generate.prompts=[]"]
    steps = {}
    for ckpt in (local, "step_000003", "final"):
        assert main(["stage", "evaluate", "--checkpoint", ckpt, *common]) == 0
        assert "evaluate: done" in capsys.readouterr().out
        r = Storage(storage).sub("run1", "evaluate").read_json("report.json")
        steps[ckpt] = (r["step"], r["sets"]["validation"]["loglikelihood"])
        assert r["checkpoint"].endswith("step_000003" if ckpt != "final" else "final")
    assert steps[local] == steps["step_000003"] != steps["final"] and steps["final"][0] == 7
    assert main(["stage", "train", "--checkpoint", local, *common]) == 2
    assert "--checkpoint is for `kiln stage evaluate`" in capsys.readouterr().err


def test_evaluate_missing_inputs_fail_clearly(trained):
    storage, _, tmp = trained
    small = {"evaluate.val_tokens": 100, "evaluate.doc_tokens": 100}
    bad = load_tiny(None, {**small, "evaluate.sets": [{"name": "nope", "path": "/nonexistent/valid.txt"}]})
    with pytest.raises(StageError, match=r"eval set 'nope' at /nonexistent/valid.txt: file not found"):
        run_stage("evaluate", bad, storage, "run1")
    junk = tmp / "junk.jsonl"
    junk.write_text("{not json\n[1]\n", encoding="utf-8")
    bad = load_tiny(None, {**small, "evaluate.sets": [], "evaluate.last_word": [{"name": "lw", "path": str(junk)}]})
    with pytest.raises(StageError, match=rf"last-word task 'lw' at {junk}: no usable passage \(2 lines skipped"):
        run_stage("evaluate", bad, storage, "run1")
    with pytest.raises(StageError, match=r"no checkpoint 'step_9' in .*train \(have: final, step_000003, step_000007\)"):
        run_stage("evaluate", load_tiny(None, {**small, "evaluate.checkpoint": "step_9"}), storage, "run1")
    with pytest.raises(StageError, match=r"no checkpoint '/nonexistent/ckpt' in /nonexistent/ckpt"):
        run_stage("evaluate", load_tiny(None, {**small, "evaluate.checkpoint": "/nonexistent/ckpt"}), storage, "run1")


def test_eval_files_and_checkpoint_uris_are_in_the_fingerprint(trained):
    """Files outside the DAG count by content: the same file skips the re-run, an edited one re-runs."""
    storage, _, tmp = trained
    f = tmp / "ptb_head.txt"
    f.write_text("\n".join(PTB.read_text(encoding="utf-8").splitlines()[:40]), encoding="utf-8")
    over = {"evaluate.val_tokens": 200, "evaluate.doc_tokens": 200, "evaluate.checkpoints": [],
            "evaluate.generate.prompts": [], "evaluate.sets": [{"name": "p", "path": str(f), "format": "lines"}]}
    first = run_stage("evaluate", load_tiny(None, over), storage, "run1")
    assert run_stage("evaluate", load_tiny(None, over), storage, "run1").get("skipped")
    f.write_text("\n".join(PTB.read_text(encoding="utf-8").splitlines()[:41]), encoding="utf-8")
    again = run_stage("evaluate", load_tiny(None, over), storage, "run1")
    assert not again.get("skipped") and again["fingerprint"] != first["fingerprint"]
    assert again["metrics"]["p_bits_per_byte"] != first["metrics"]["p_bits_per_byte"]
    import shutil

    train = tmp / "store" / "run1" / "train"
    shutil.copytree(train / "final", tmp / "elsewhere" / "ck")
    cfg = load_tiny(None, {**over, "evaluate.checkpoint": str(tmp / "elsewhere" / "ck")})
    a = run_stage("evaluate", cfg, storage, "run1")
    assert a["fingerprint"] != again["fingerprint"] and run_stage("evaluate", cfg, storage, "run1").get("skipped")
    shutil.copy(train / "checkpoints" / "step_000003" / "model.pt", tmp / "elsewhere" / "ck" / "model.pt")
    b = run_stage("evaluate", cfg, storage, "run1")  # other weights under the same URI: evaluated again
    assert not b.get("skipped") and b["metrics"]["p_bits_per_byte"] != a["metrics"]["p_bits_per_byte"]


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
