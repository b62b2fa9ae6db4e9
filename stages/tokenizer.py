"""Tokenizer: train a sentencepiece model on a deterministic sample of the reweighted corpus.

A small fraction of the original documents (chosen by a stable hash of the base id, so reweighting
copies ``<id>#rN`` go with their original) is held out and never trained on; the rest are ranked by a
stable hash of (seed, id) and taken until ``sample_bytes``. Text is fed to sentencepiece as whole
documents (cut at line boundaries into pieces sentencepiece accepts) with identity normalisation and no
whitespace rewriting, so newlines and indentation are learnt and ``decode(encode(text)) == text``;
byte fallback covers every other character. Same input, seed and config give identical model bytes.

Also exported as ``tokenizer.json`` for Hugging Face ``tokenizers`` (``Tokenizer.from_file``) and, with
``tokenizer_config.json``, ``transformers`` (``AutoTokenizer.from_pretrained(<folder>)``): the same ids, a BPE
model whose merges are read off the vocabulary (a piece ``ab`` made of pieces ``a`` + ``b``, ranked by the id of
``ab``, which is sentencepiece's merge order), byte fallback, " " -> "▁", user-defined pieces as added tokens
(matched in text, as sentencepiece does). The stage checks the export: ``hf_agreement`` is the share of held-out
documents whose HF ids equal sentencepiece's (1.0 on the sample crawl).

Stats (``stats.json``, on the held-out documents): bytes per token overall and per domain, the share of bytes
covered by vocabulary pieces rather than byte fallback, the share of byte-fallback tokens, round trip. No
wall-clock time in it (two identical runs write the same bytes): the training seconds are the manifest's
``metrics.train_seconds``.
Writes ``tokenizer.model``, ``tokenizer.vocab``, ``tokenizer.json``, ``tokenizer_config.json`` and ``stats.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from typing import Literal

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError, StageResult
from stages.reweight import base_id, stable_unit

# Fixed special ids: every downstream stage (shard, train, evaluate) may rely on them.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_ESCAPE = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"})  # keeps .vocab one line per id
MAX_PIECE_BYTES = 8192  # sentencepiece's max_sentence_length; longer documents are cut at line breaks


class Config(Strict):
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(4096, ge=64)
    sample_bytes: int = Field(8_000_000, ge=1)  # cap on the training sample (UTF-8 bytes)
    heldout_fraction: float = Field(0.02, ge=0, lt=0.5)  # of original documents, for bytes_per_token
    heldout_max_bytes: int = Field(2_000_000, ge=1)  # cap on the held-out text encoded for metrics
    user_defined_symbols: list[str] = Field(default_factory=list)  # always single tokens, never split
    character_coverage: float = Field(0.9995, gt=0, le=1)  # rarer characters go through byte fallback
    num_threads: int = Field(2, ge=1)


def _chunks(text: str, limit: int = MAX_PIECE_BYTES):
    """Cut ``text`` into pieces of at most ``limit`` UTF-8 bytes, at line breaks where possible."""
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > limit:  # one huge line: hard cut (a character is at most 4 bytes)
            step = limit // 4
            for i in range(0, len(line), step):
                yield line[i:i + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _plan(docs_meta: list[tuple[str, str, int]], seed: int, cfg: Config) -> tuple[set[str], set[str]]:
    """Choose held-out base ids and training ids from (id, base id, bytes) of every document."""
    bases = sorted({b for _, b, _ in docs_meta}, key=lambda b: (stable_unit("tok-heldout", seed, b), b))
    n_held = math.ceil(cfg.heldout_fraction * len(bases)) if len(bases) > 1 else 0
    heldout = set(bases[:n_held])
    ranked = sorted((d for d in docs_meta if d[1] not in heldout),
                    key=lambda d: (stable_unit("tok-sample", seed, d[0]), d[0]))
    train, total = set(), 0
    for doc_id, _, n in ranked:
        if total >= cfg.sample_bytes:
            break
        train.add(doc_id)
        total += n
    return heldout, train


def export_hf(sp, user_defined: list[str] = (), model_type: str = "bpe"):
    """A Hugging Face ``tokenizers.Tokenizer`` giving the ids of sentencepiece processor ``sp`` (a model trained
    by this stage: identity normalisation, no dummy prefix, byte fallback). See the module docstring. Unigram:
    the pieces with their scores (same Viterbi segmentation)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # noqa: I001

    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    if model_type == "unigram":
        tok = Tokenizer(models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=sp.unk_id(),
                                       byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        if user_defined:
            tok.add_tokens([AddedToken(s, normalized=False) for s in user_defined])
        return tok
    vocab = {p: i for i, p in enumerate(pieces)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    merges = []
    for i, piece in enumerate(pieces):
        if i in special or sp.is_byte(i) or sp.is_unused(i) or piece in user_defined:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=pieces[sp.unk_id()],
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # control pieces (<s>, </s>, <pad>, <unk>) stay plain vocabulary entries: as added tokens they would match
    # the literal text "<unk>" (WikiText is full of it), which sentencepiece encodes as ordinary characters
    if user_defined:
        tok.add_tokens([AddedToken(s, normalized=False) for s in user_defined])
    return tok


def hf_config(sp) -> dict:
    """``tokenizer_config.json`` beside ``tokenizer.json``, so ``transformers.AutoTokenizer.from_pretrained(folder)``
    knows the special tokens (eos/bos/pad/unk ids equal sentencepiece's). ``split_special_tokens``: literal
    "<unk>" or "</s>" in text stays text, as sentencepiece encodes it (else transformers would match it as the
    special token: WikiText is full of "<unk>"). No BOS/EOS added: Kiln's documents end with EOS in the shards."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": sp.id_to_piece(sp.bos_id()),
            "eos_token": sp.id_to_piece(sp.eos_id()), "pad_token": sp.id_to_piece(sp.pad_id()),
            "unk_token": sp.id_to_piece(sp.unk_id()), "split_special_tokens": True, "add_bos_token": False,
            "add_eos_token": False, "clean_up_tokenization_spaces": False}


def run(cfg: Config, ctx: StageContext) -> StageResult:
    import sentencepiece as spm
    from stages.core.pipeline import check_upstream_read, upstream_reader

    src = ctx.input("reweight").datafolder("data")
    reader = upstream_reader(ctx, "reweight", add_file_path=False)

    def docs():
        return reader()  # the manifest's files, in sorted order: deterministic

    meta = [(d.id, base_id(d.id), len(d.text.encode("utf-8"))) for d in docs()]
    check_upstream_read(ctx, "reweight", len(meta))
    if not meta:
        raise StageError(f"tokenizer: no documents in {src.path}")
    heldout, train = _plan(meta, ctx.cfg.run.seed, cfg)
    sample = {"docs": 0, "bytes": 0}
    held_texts, held_ids, held_domains, held_bytes = [], [], [], 0

    def training_text():
        nonlocal held_bytes
        for d in docs():
            if d.id in train:
                sample["docs"] += 1
                sample["bytes"] += len(d.text.encode("utf-8"))
                yield from _chunks(d.text)
            elif base_id(d.id) in heldout and d.id == base_id(d.id) and held_bytes < cfg.heldout_max_bytes:
                held_texts.append(d.text)
                held_ids.append(d.id)
                held_domains.append(str(d.metadata.get("domain") or "(none)"))
                held_bytes += len(d.text.encode("utf-8"))

    prefix = os.path.join(ctx.workdir, "tokenizer")
    options = dict(model_type=cfg.model_type, vocab_size=cfg.vocab_size, byte_fallback=True,
                   unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                   user_defined_symbols=cfg.user_defined_symbols, character_coverage=cfg.character_coverage,
                   normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                   allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=MAX_PIECE_BYTES,
                   input_sentence_size=0, shuffle_input_sentence=False, num_threads=cfg.num_threads)
    spm.set_random_generator_seed(ctx.cfg.run.seed)
    t0 = time.time()
    model = io.BytesIO()  # not model_prefix: the trainer would record that (random) path in the model
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=training_text(), model_writer=model, minloglevel=2,
                                       **options)
    except RuntimeError as e:
        why = re.sub(r"^.*?\] ", "", str(e).strip().splitlines()[-1])  # drop spm's source location
        raise StageError(f"tokenizer: sentencepiece training failed on {sample['docs']} documents "
                         f"({sample['bytes']} bytes; tokenizer.vocab_size={cfg.vocab_size}): {why}") from None
    train_s = time.time() - t0
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    with open(prefix + ".vocab", "w", encoding="utf-8") as f:  # like spm's: piece<TAB>score, one line per id
        f.writelines(f"{sp.id_to_piece(i).translate(_ESCAPE)}\t{sp.get_score(i):g}\n"
                     for i in range(sp.get_piece_size()))

    hf = export_hf(sp, cfg.user_defined_symbols, cfg.model_type)
    hf.save(prefix + ".json")
    with open(prefix + "_config.json", "w", encoding="utf-8") as f:
        json.dump(hf_config(sp), f, indent=2, sort_keys=True)
    ev = {"heldout_docs": len(held_texts), "heldout_bytes": held_bytes}
    if held_texts:
        ids = sp.encode(held_texts, num_threads=cfg.num_threads)
        n_tok = sum(map(len, ids))
        n_byte = sum(sp.is_byte(i) for seq in ids for i in seq)
        per_domain: dict[str, list[int]] = {}
        for dom, text, seq in zip(held_domains, held_texts, ids):
            acc = per_domain.setdefault(dom, [0, 0, 0])
            acc[0] += 1
            acc[1] += len(text.encode("utf-8"))
            acc[2] += len(seq)
        ev |= {"heldout_tokens": n_tok, "bytes_per_token": round(held_bytes / n_tok, 4),
               "byte_fallback_share": round(n_byte / n_tok, 5),
               "vocab_byte_coverage": round(1 - n_byte / held_bytes, 5),  # bytes not left to byte fallback
               "bytes_per_token_by_domain": {dom: {"docs": a[0], "bytes": a[1], "tokens": a[2],
                                                   "bytes_per_token": round(a[1] / max(a[2], 1), 4)}
                                             for dom, a in sorted(per_domain.items())},
               "hf_agreement": sum(e.ids == s for e, s in zip(hf.encode_batch(held_texts, add_special_tokens=False),
                                                               ids)) / len(held_texts),
               "roundtrip_ok": sum(sp.decode(s) == t for s, t in zip(ids, held_texts)) / len(held_texts)}
        if ev["roundtrip_ok"] < 1:
            raise StageError(f"tokenizer: decode(encode(text)) != text on {len(held_texts)} held-out documents "
                             f"(ok share {ev['roundtrip_ok']:.3f})")
    ids_info = {"vocab_size": sp.get_piece_size(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(),
                "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
                "user_defined": {s: sp.piece_to_id(s) for s in cfg.user_defined_symbols}}
    stats = {**ids_info, "model_type": cfg.model_type, "seed": ctx.cfg.run.seed,
             "sample_docs": sample["docs"], "sample_bytes": sample["bytes"], "documents_in": len(meta),
             **ev,
             "heldout_ids": held_ids, "trainer_options": {k: v for k, v in options.items() if k != "num_threads"}}
    ctx.out.write_json("stats.json", stats)
    for ext in (".model", ".vocab", ".json", "_config.json"):
        ctx.out.put_file(prefix + ext, "tokenizer" + ext)
    metrics = {k: stats[k] for k in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "sample_docs",
                                     "sample_bytes")} | {"train_seconds": round(train_s, 3)} | ev
    return StageResult(outputs=["tokenizer.model", "tokenizer.vocab", "tokenizer.json", "tokenizer_config.json",
                                "stats.json"],
                       counts={"documents_in": len(meta), "sample_docs": sample["docs"],
                               "sample_bytes": sample["bytes"], "heldout_docs": len(held_texts)},
                       metrics=metrics)
