"""evaluate: validation loss, perplexity and bits per byte of the final checkpoint.

Three kinds of evaluation set, each a row of ``report.json`` with tokens, bytes, loss, perplexity and
bits_per_byte:

- ``validation``: the held-out token shards, read as one stream in non-overlapping windows of the
  model context, up to ``val_tokens`` scored tokens (what training loss is comparable to; no bytes).
- ``validation_docs``: the held-out Parquet texts, tokenized with the run's tokenizer, up to
  ``doc_tokens`` tokens of whole documents; gives bits per byte.
- each entry of ``sets`` (tiny: WikiText-2 validation), split into documents, scored the same way.

Document scoring: a document is its tokens preceded by EOS (the separator training saw before every
document); its tokens are cut into non-overlapping windows of the context so every token is scored
exactly once, each window conditioned only on its own earlier tokens. The EOS after a document is not
scored (it has no bytes). loss = sum(nll) / tokens, perplexity = exp(loss),
bits_per_byte = sum(nll) / UTF-8 bytes / ln 2.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Literal

from pydantic import Field

from stages.core.config import Strict, resolve_path
from stages.core.runner import StageContext, StageError, StageResult

log = logging.getLogger("kiln.evaluate")
LN2 = math.log(2)


class EvalSet(Strict):
    name: str
    path: str  # local path (relative to the profile) or URL
    format: Literal["wikitext", "paragraphs"] = "wikitext"  # documents at " = Title = " lines / at blank lines
    max_tokens: int = Field(16384, ge=1)  # whole documents until this many tokens are scored


class Config(Strict):
    checkpoint: str = "final"  # folder in the train stage's output
    val_tokens: int = Field(32768, ge=1)  # token budget on the validation shards
    doc_tokens: int = Field(32768, ge=1)  # token budget on the validation Parquet texts
    batch_size: int = Field(8, ge=1)  # windows per forward pass
    threads: int = Field(0, ge=0)  # torch threads; 0 = torch's default (all cores)
    sets: list[EvalSet] = [EvalSet(name="wikitext-2", path="../../shared/data/eval/wikitext-2/valid.txt")]


# -- scoring -------------------------------------------------------------------------------------------
def _nll_windows(model, xs: list[list[int]], ys: list[list[int]], T: int, batch_size: int):
    """Per-window sums of negative log-likelihood; windows padded to T (targets -100 are ignored)."""
    import torch

    sums = []
    for i in range(0, len(xs), batch_size):
        bx, by = xs[i: i + batch_size], ys[i: i + batch_size]
        x = torch.zeros(len(bx), T, dtype=torch.long)
        y = torch.full((len(bx), T), -100, dtype=torch.long)
        for j, (a, b) in enumerate(zip(bx, by)):
            x[j, :len(a)], y[j, :len(b)] = torch.tensor(a), torch.tensor(b)
        with torch.inference_mode():
            _, nll = model(x, y, reduction="none")  # (b, T), 0 where ignored
        sums.extend(nll.double().sum(dim=1).tolist())
    return sums


def doc_windows(ids: list[int], eos_id: int, T: int) -> tuple[list[list[int]], list[list[int]]]:
    """Inputs/targets of the non-overlapping windows that score each token of ``ids`` exactly once."""
    seq = [eos_id] + list(ids)
    xs, ys = [], []
    for s in range(0, len(ids), T):
        ys.append(seq[s + 1: s + T + 1])
        xs.append(seq[s: s + len(ys[-1])])
    return xs, ys


def score_docs(model, docs_ids: list[list[int]], eos_id: int, T: int, batch_size: int = 8) -> list[float]:
    """Total NLL (nats) of each document's tokens, in order."""
    xs, ys, owner = [], [], []
    for d, ids in enumerate(docs_ids):
        x, y = doc_windows(ids, eos_id, T)
        xs += x
        ys += y
        owner += [d] * len(x)
    totals = [0.0] * len(docs_ids)
    for d, s in zip(owner, _nll_windows(model, xs, ys, T, batch_size)):
        totals[d] += s
    return totals


def score_stream(model, tokens, T: int, batch_size: int = 8) -> tuple[float, int]:
    """Total NLL and count of tokens[1:] scored in non-overlapping windows of T (each token once)."""
    tokens = [int(t) for t in tokens]
    ys = [tokens[s + 1: s + T + 1] for s in range(0, len(tokens) - 1, T)]
    xs = [tokens[s: s + len(y)] for s, y in zip(range(0, len(tokens) - 1, T), ys)]
    return sum(_nll_windows(model, xs, ys, T, batch_size)), len(tokens) - 1


def summarize(nll: float, tokens: int, n_bytes: int | None, documents: int | None = None) -> dict:
    loss = nll / tokens
    return {"documents": documents, "tokens": tokens, "bytes": n_bytes, "loss": round(loss, 6),
            "perplexity": round(math.exp(loss), 4),
            "bits_per_byte": round(nll / n_bytes / LN2, 6) if n_bytes else None}


# -- documents -------------------------------------------------------------------------------------------
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def split_documents(text: str, fmt: str) -> list[str]:
    """wikitext: an article starts at each top-level ' = Title = ' line; paragraphs: blank-line separated."""
    if fmt == "paragraphs":
        return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, cur = [], []
    for line in text.splitlines():
        if _WIKI_TITLE.match(line) and any(l.strip() for l in cur):
            docs.append(cur)
            cur = []
        cur.append(line)
    docs.append(cur)
    return [d for d in ("\n".join(l for l in lines if l.strip()).strip() for lines in docs) if d]


def take_budget(texts: list[str], sp, max_tokens: int) -> tuple[list[str], list[list[int]]]:
    """Whole documents in order, skipping any that would pass ``max_tokens`` (the first one is always
    kept, so a budget smaller than every document still scores one)."""
    kept, ids, n = [], [], 0
    for text in texts:
        t = sp.encode(text)
        if t and (n + len(t) <= max_tokens or not kept):
            kept.append(text)
            ids.append(t)
            n += len(t)
        if n >= max_tokens:
            break
    return kept, ids


def eval_docs(model, texts: list[str], sp, eos_id: int, T: int, max_tokens: int, batch_size: int) -> dict:
    kept, ids = take_budget(texts, sp, max_tokens)
    if not kept:
        raise ValueError("no non-empty documents")
    nll = sum(score_docs(model, ids, eos_id, T, batch_size))
    return summarize(nll, sum(map(len, ids)), sum(len(t.encode("utf-8")) for t in kept), len(kept))


# -- stage -----------------------------------------------------------------------------------------------
def _read_parquet_texts(storage, rels: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    texts = []
    for rel in rels:
        try:
            with storage.open(rel) as f:
                texts += pq.read_table(f, columns=["text"]).column("text").to_pylist()
        except Exception as e:  # noqa: BLE001
            raise StageError(f"evaluate: cannot read validation texts {storage.url(rel)} ({e})") from None
    return [t for t in texts if t]


def run(cfg: Config, ctx: StageContext) -> StageResult:
    import os

    import numpy as np
    import sentencepiece as spm
    import torch

    from stages.core.storage import open_input
    from stages.train.checkpoint import load_model
    from stages.train.data import ShardError, open_shards

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train = ctx.input("train")
    try:
        model, meta = load_model(train, cfg.checkpoint)
    except FileNotFoundError:
        raise StageError(f"evaluate: no checkpoint '{cfg.checkpoint}' in {train.url()}") from None
    T = model.cfg.seq_len
    tok = ctx.inputs["tokenizer"].get("metrics", {})
    eos_id = tok.get("eos_id")
    if not isinstance(eos_id, int) or eos_id < 0:
        raise StageError(f"evaluate: tokenizer manifest in {ctx.input('tokenizer').url()} has no metrics.eos_id")
    sp = spm.SentencePieceProcessor(
        model_file=ctx.input("tokenizer").get_file("tokenizer.model", os.path.join(ctx.workdir, "tokenizer.model")))
    if sp.get_piece_size() != model.cfg.vocab_size:
        raise StageError(f"evaluate: tokenizer has {sp.get_piece_size()} pieces, checkpoint {model.cfg.vocab_size}")

    sets = {}
    shard = ctx.input("shard")
    try:
        shards = open_shards(shard, ctx.input_files("shard", prefix="tokens/validation/", suffix=".bin"),
                             model.cfg.vocab_size)
    except ShardError as e:
        raise StageError(f"evaluate: validation shards: {e}") from None
    stream, need = [], cfg.val_tokens + 1
    for sh in shards:
        stream.append(sh.read(0, min(sh.n_tokens, need)))
        need -= len(stream[-1])
        if need <= 0:
            break
    stream = np.concatenate(stream)
    if len(stream) < 2:
        raise StageError(f"evaluate: validation shards in {shard.url()} hold fewer than 2 tokens")
    nll, n = score_stream(model, stream, T, cfg.batch_size)
    sets["validation"] = summarize(nll, n, None)

    texts = _read_parquet_texts(shard, ctx.input_files("shard", prefix="parquet/validation/", suffix=".parquet"))
    if not texts:
        raise StageError(f"evaluate: the shard manifest in {shard.url()} lists no non-empty parquet/validation texts")
    sets["validation_docs"] = eval_docs(model, texts, sp, eos_id, T, cfg.doc_tokens, cfg.batch_size)

    for es in cfg.sets:
        path = resolve_path(ctx.cfg, es.path)
        try:
            with open_input(path, "rb") as f:
                text = f.read().decode("utf-8")
            sets[es.name] = {**eval_docs(model, split_documents(text, es.format), sp, eos_id, T, es.max_tokens,
                                         cfg.batch_size), "path": path}
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StageError(f"evaluate: eval set '{es.name}' at {path}: {e}") from None
        log.info("evaluate: %s %s", es.name, sets[es.name])

    report = {"checkpoint": f"{train.url()}/{cfg.checkpoint}", "step": meta.get("step"), "tokens_trained":
              meta.get("tokens"), "model": meta["model"], "params": model.num_params(), "sets": sets}
    ctx.out.write_json("report.json", report)
    metrics = {"val_loss": sets["validation"]["loss"], "val_perplexity": sets["validation"]["perplexity"],
               "val_bits_per_byte": sets["validation_docs"]["bits_per_byte"]}
    metrics.update({f"{name}_bits_per_byte": s["bits_per_byte"] for name, s in sets.items()
                    if name not in ("validation", "validation_docs")})
    counts = {"tokens_scored": sum(s["tokens"] for s in sets.values()), "sets": len(sets)}
    return StageResult(outputs=["report.json"], counts=counts, metrics=metrics)
