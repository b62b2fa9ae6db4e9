"""tokenizer: sentencepiece trained on real mixed text; deterministic bytes, fixed ids, lossless round trip."""

import pytest
import sentencepiece as spm
from conftest import SHARED, load_tiny
from test_reweight import mixed_docs, seed_split

from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.reweight import base_id
from stages.tokenizer import Config, _chunks, _plan

FAST = {"run.tasks": 2, "run.workers": 1}


def load_sp(root, run) -> tuple[spm.SentencePieceProcessor, bytes, dict]:
    st = Storage(root).sub(run, "tokenizer")
    model = st.read_bytes("tokenizer.model")
    return spm.SentencePieceProcessor(model_proto=model), model, st.read_json("stats.json")


def test_deterministic_ids_and_lossless_round_trip(tmp_path):
    root, docs = str(tmp_path), mixed_docs()
    over = {**FAST, "tokenizer.sample_bytes": 1_500_000, "tokenizer.heldout_fraction": 0.05,
            "tokenizer.user_defined_symbols": ["<|sep|>"]}
    cfg = load_tiny(tmp_path, over)
    ms = {}
    for run in ("a", "b"):
        seed_split(root, run, "reweight", docs)
        ms[run] = m = run_stage("tokenizer", cfg, root, run)
    sp, model, stats = load_sp(root, "a")
    assert model == load_sp(root, "b")[1]  # same input -> identical model bytes
    # ... and identical outputs, stats.json included: the training time is a manifest metric, not in the file
    assert [(o["path"], o["sha256"]) for o in ms["a"]["outputs"]] == [(o["path"], o["sha256"]) for o in m["outputs"]]
    assert {o["path"] for o in m["outputs"]} >= {"stats.json", "tokenizer.model", "tokenizer.json"}
    assert not any("second" in k for k in stats) and all(x["metrics"]["train_seconds"] > 0 for x in ms.values())
    assert Storage(root).sub("a", "tokenizer").read_bytes("tokenizer.vocab").count(b"\n") == 4096

    # fixed special ids, recorded in stats.json and the manifest
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.get_piece_size()) == (0, 1, 2, 3, 4096)
    assert {k: m["metrics"][k] for k in ("unk_id", "bos_id", "eos_id", "pad_id", "vocab_size")} == \
        {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3, "vocab_size": 4096}
    sep = stats["user_defined"]["<|sep|>"]
    assert sep > 3 and sp.encode("first<|sep|>second").count(sep) == 1

    # the sample is capped and never contains a held-out document
    assert 1_500_000 <= stats["sample_bytes"] < 1_500_000 + 110_000 and stats["sample_docs"] < len(docs)
    held = set(stats["heldout_ids"])
    assert len(held) == stats["heldout_docs"] >= 0.04 * len(docs)
    assert 2.5 < m["metrics"]["bytes_per_token"] < 5 and m["metrics"]["byte_fallback_share"] < 0.02
    assert m["metrics"]["roundtrip_ok"] == 1.0

    # decode(encode(text)) == text on real text: held-out documents, indentation, and unseen scripts
    by_id = {d["id"]: d["text"] for d in docs}
    code = (SHARED / "extraction-benchmark" / "ground-truth.json").read_text()[:5000]  # JSON: quotes, escapes
    texts = [by_id[i] for i in held] + [code, "  indented\n\tline\n\n\n  naïve café — 東京 🚀\r\n"]
    for t in texts:
        assert sp.decode(sp.encode(t)) == t
    ids = sp.encode("東京 🚀")
    assert any(sp.is_byte(i) for i in ids) and sp.unk_id() not in ids  # byte fallback, never <unk>
    assert "\n\n" in [sp.id_to_piece(i) for i in range(sp.get_piece_size())]  # newlines are learnt


def test_hugging_face_export_and_per_domain_stats(tmp_path, monkeypatch):
    """tokenizer.json loads with `tokenizers` alone, the folder with `transformers`' AutoTokenizer; both give
    sentencepiece's ids on real text of three domains, code, indentation, user-defined symbols and byte fallback;
    stats per domain add up."""
    from tokenizers import Tokenizer

    root, docs = str(tmp_path), mixed_docs()
    cfg = load_tiny(tmp_path, {**FAST, "tokenizer.sample_bytes": 1_000_000, "tokenizer.heldout_fraction": 0.1,
                               "tokenizer.user_defined_symbols": ["<|sep|>"]})
    seed_split(root, "h", "reweight", docs)
    m = run_stage("tokenizer", cfg, root, "h")
    sp, _, stats = load_sp(root, "h")
    st = Storage(root).sub("h", "tokenizer")
    assert "tokenizer.json" in {o["path"] for o in m["outputs"]}
    hf = Tokenizer.from_str(st.read_bytes("tokenizer.json").decode())
    assert m["metrics"]["hf_agreement"] == 1.0
    code = (SHARED / "extraction-benchmark" / "ground-truth.json").read_text()[:20000]
    texts = [d["text"] for d in docs[::7]] + [code, "  indented\n\tline\n\n  naïve café — 東京 🚀\r\n",
                                               "a<|sep|>b 2024", "literal <unk> and </s> in text"]
    for t in texts:
        assert hf.encode(t, add_special_tokens=False).ids == sp.encode(t)
        assert hf.decode(sp.encode(t)) == t
    assert hf.token_to_id("</s>") == sp.eos_id() == 2 and hf.get_vocab_size() == sp.get_piece_size()

    # transformers loads the stage's folder as users would (tokenizer.json + tokenizer_config.json, offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    assert "tokenizer_config.json" in {o["path"] for o in m["outputs"]}
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "h" / "tokenizer"))
    assert (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id, auto.unk_token_id) == (
        sp.eos_id(), sp.bos_id(), sp.pad_id(), sp.unk_id())
    for t in texts:  # literal "<unk>"/"</s>" stay text, no BOS/EOS added: sentencepiece's ids exactly
        assert auto(t)["input_ids"] == sp.encode(t)
        assert auto.decode(sp.encode(t)) == t
    batch = auto(["a b c d", "a"], padding=True)["input_ids"]
    assert batch[1][len(sp.encode("a")):] == [sp.pad_id()] * (len(batch[0]) - len(sp.encode("a")))
    by_dom = stats["bytes_per_token_by_domain"]
    assert set(by_dom) <= {"news", "shakespeare", "wikitext"} and len(by_dom) >= 2
    assert sum(v["bytes"] for v in by_dom.values()) == stats["heldout_bytes"]
    assert sum(v["tokens"] for v in by_dom.values()) == stats["heldout_tokens"]
    assert 0.98 < stats["vocab_byte_coverage"] <= 1.0


def test_plan_holds_out_whole_documents_with_their_copies():
    meta = [(f"d{i}", f"d{i}", 1000) for i in range(400)] + [(f"d{i}#r1", f"d{i}", 1000) for i in range(0, 400, 3)]
    cfg = Config(sample_bytes=200_000, heldout_fraction=0.05)
    heldout, train = _plan(meta, 1, cfg)
    assert len(heldout) == 20 and len(train) == 200
    assert not {base_id(i) for i in train} & heldout
    assert _plan(meta, 1, cfg) == (heldout, train) and _plan(meta, 2, cfg) != (heldout, train)


def test_unigram_and_clear_error_on_too_small_corpus(tmp_path):
    root = str(tmp_path)
    seed_split(root, "u", "reweight", mixed_docs(30, 30, 3))
    m = run_stage("tokenizer", load_tiny(tmp_path, {**FAST, "tokenizer.model_type": "unigram",
                                                    "tokenizer.vocab_size": 1000}), root, "u")
    sp, _, stats = load_sp(root, "u")
    assert stats["model_type"] == "unigram" and sp.get_piece_size() == 1000 and m["metrics"]["roundtrip_ok"] == 1
    assert m["metrics"]["hf_agreement"] == 1.0  # the Hugging Face export of a unigram model gives the same ids

    seed_split(root, "s", "reweight", mixed_docs(2, 1, 0))
    with pytest.raises(StageError, match=r"^tokenizer: sentencepiece training failed on 2 documents .*: Vocabulary"):
        run_stage("tokenizer", load_tiny(tmp_path, FAST), root, "s")


def test_chunks_keep_text_and_respect_the_limit():
    text = (SHARED / "eval" / "tinyshakespeare" / "input.txt").read_text()[:50000] + "x" * 9000 + "é" * 5000
    parts = list(_chunks(text, 4096))
    assert "".join(parts) == text and max(len(p.encode()) for p in parts) <= 4096


def test_sample_is_capped_so_training_does_not_grow_with_the_corpus(tmp_path):
    """The corpus grows 3x (more real documents of the same three domains, and reweighting copies): the training
    sample stays at the cap (within one document), deterministic for a given corpus; the held-out stats are
    exactly what the saved model gives on the held-out documents (bytes/token overall and per domain, byte-fallback
    share, vocabulary byte coverage)."""
    from test_shard import with_copies

    root, cap = str(tmp_path), 400_000
    cfg = load_tiny(tmp_path, {**FAST, "tokenizer.sample_bytes": cap, "tokenizer.vocab_size": 1000,
                               "tokenizer.heldout_fraction": 0.1})
    small, big = mixed_docs(60, 60, 20), with_copies(mixed_docs())
    sizes = {}
    for run, docs in (("small", small), ("big", big)):
        seed_split(root, run, "reweight", docs)
        m = run_stage("tokenizer", cfg, root, run)
        sizes[run] = sum(len(d["text"].encode()) for d in docs)
        biggest = max(len(d["text"].encode()) for d in docs)
        assert cap <= m["counts"]["sample_bytes"] < cap + biggest and m["counts"]["documents_in"] == len(docs)
    assert sizes["big"] > 3 * sizes["small"] > 3 * cap

    sp, _, stats = load_sp(root, "big")
    by_id = {d["id"]: d for d in big}
    texts = [by_id[i]["text"] for i in stats["heldout_ids"]]
    assert all("#r" not in i for i in stats["heldout_ids"]) and len(texts) == stats["heldout_docs"] > 0
    ids = sp.encode(texts)
    n_tok, n_bytes = sum(map(len, ids)), sum(len(t.encode()) for t in texts)
    n_fallback = sum(sp.is_byte(i) for s in ids for i in s)
    assert n_fallback > 0  # the held-out text has characters outside the 1,000-piece vocabulary
    assert stats["bytes_per_token"] == round(n_bytes / n_tok, 4) and stats["heldout_tokens"] == n_tok
    assert stats["byte_fallback_share"] == round(n_fallback / n_tok, 5)
    assert stats["vocab_byte_coverage"] == round(1 - n_fallback / n_bytes, 5)
    for dom, v in stats["bytes_per_token_by_domain"].items():
        mine = [(t, s) for t, s, i in zip(texts, ids, stats["heldout_ids"]) if by_id[i]["metadata"]["domain"] == dom]
        assert v["docs"] == len(mine) and v["tokens"] == sum(len(s) for _, s in mine)
        assert v["bytes_per_token"] == round(sum(len(t.encode()) for t, _ in mine) / v["tokens"], 4)
