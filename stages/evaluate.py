"""evaluate: loss, perplexity and lm-evaluation-harness metrics of a checkpoint (or a series of them),
last-word accuracy, and sample generations.

Sets, each a row of ``report.json`` ``sets``:

- ``validation``: the held-out token shards as one stream in non-overlapping windows of the model context,
  up to ``val_tokens`` scored tokens (what the training loss compares to; no bytes, no words).
- ``validation_docs``: the held-out Parquet texts, whole documents up to ``doc_tokens`` tokens.
- each entry of ``sets``: a plain-text file split into documents (``wikitext`` pages, blank-line
  ``paragraphs``, ``lines``, the ``whole`` file) or a JSONL file's ``text_field``, up to ``max_tokens``.

Documents are scored as lm-eval's ``loglikelihood_rolling`` (see ``stages.eval_tasks``): rolling windows of the
context, the first one prefixed with the end-of-text token, every token scored once. Per set, summed over
documents: loglikelihood, loss = -Σ loglik / tokens, perplexity = exp(loss), ``word_perplexity`` =
exp(-Σ loglik / Σ words), ``byte_perplexity`` = exp(-Σ loglik / Σ bytes), ``bits_per_byte`` = -Σ loglik /
Σ bytes / ln 2. The EOS after a document is not scored (it has no bytes). Token-level numbers depend on the
tokenizer; the word and byte ones do not, so runs with different tokenizers compare.

``last_word`` tasks (LAMBADA format): accuracy and perplexity of each passage's last word (lm-eval
``lambada_openai``); passages from a JSONL file's ``text_field`` or cut from a plain-text file (``format:
paragraphs``/``lines``, e.g. Tiny Shakespeare's speeches, ``min_words`` 25: no LAMBADA file ships with the
shared data). ``generate``: greedy and top-k continuations of fixed prompts, in ``report.json`` and
``generations.md``.

Checkpoints: ``checkpoint`` names a folder of the train output (``final``, ``step_000100`` =
``checkpoints/step_000100``) or, when it has ``://`` or starts with ``/`` or ``.``, a checkpoint folder
anywhere (local path, relative to the working directory, or ``s3://``): ``kiln stage evaluate --checkpoint URI``
(the same as ``--set evaluate.checkpoint=URI``). ``checkpoints: all`` (every ``checkpoints/step_N`` the train manifest lists, and
``final``; of two folders with the same step, the same weights, only the first is evaluated: the head
checkpoint, else the step folder) or a list of names adds ``curve`` to the report: the same sets and tasks
per checkpoint, ordered by step. Token streams, documents and passages are prepared once for the series.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Literal

from pydantic import Field, model_validator

from stages.core.config import Strict, resolve_path
from stages.core.runner import StageContext, StageError, StageResult
from stages.eval_tasks import (LN2, count_words, decode_file, encode_pair, generate, generations_markdown,
                               last_word_split, last_word_window, read_jsonl, rolling_windows, split_documents,
                               wikitext_detokenize)

log = logging.getLogger("kiln.evaluate")
RESERVED = ("validation", "validation_docs")


class EvalSet(Strict):
    name: str
    path: str  # local path (relative to the profile), s3:// or http(s):// URL; .gz decompressed
    format: Literal["wikitext", "paragraphs", "lines", "whole", "jsonl"] = "wikitext"
    text_field: str = "text"  # jsonl: the field holding a document
    detokenize: bool | None = None  # lm-eval's wikitext detokenizer; None = on for format wikitext
    max_tokens: int = Field(16384, ge=1)  # whole documents until this many tokens are scored


class LastWord(Strict):
    name: str = "lambada"
    path: str  # JSONL of passages, {"text": ...} (LAMBADA's format), or plain text (format below); .gz decompressed
    # jsonl, or passages cut from a plain-text file (``paragraphs`` / ``lines``, whitespace runs made one space
    # as in LAMBADA's one-line passages): a last-word task from any real text when no LAMBADA file is at hand
    format: Literal["jsonl", "paragraphs", "lines"] = "jsonl"
    min_words: int = Field(0, ge=0)  # passages with fewer words are left out (LAMBADA's have ~4 sentences)
    text_field: str = "text"
    max_examples: int = Field(5000, ge=1)  # the first N usable passages
    prefix_eos: bool = True  # EOS before the context: the document start the model was trained with


class Generate(Strict):
    prompts: list[str] = []
    max_new_tokens: int = Field(48, ge=1)
    top_k: int = Field(40, ge=0)  # also sample top-k (0: greedy only)
    temperature: float = Field(1.0, gt=0)
    samples: int = Field(1, ge=0)  # top-k samples per prompt, seeds seed, seed+1, ...
    seed: int = 0


class Config(Strict):
    checkpoint: str = "final"  # train-output folder (final, step_000100) or a checkpoint folder URI/path
    checkpoints: Literal["all"] | list[str] = []  # a series into a curve (same sets per checkpoint)
    val_tokens: int = Field(32768, ge=1)  # token budget on the validation shards
    doc_tokens: int = Field(32768, ge=1)  # token budget on the validation Parquet texts
    batch_size: int = Field(8, ge=1)  # windows per forward pass
    threads: int = Field(0, ge=0)  # torch threads; 0 = torch's default (all cores)
    sets: list[EvalSet] = [EvalSet(name="wikitext-2", path="../../shared/data/eval/wikitext-2/valid.txt")]
    last_word: list[LastWord] = []
    generate: Generate = Generate()

    @model_validator(mode="after")
    def _names(self):
        names = [s.name for s in self.sets]
        dup = sorted({n for n in names if names.count(n) > 1} | set(names) & set(RESERVED))
        tasks = [t.name for t in self.last_word]
        dup += sorted({n for n in tasks if tasks.count(n) > 1})
        if dup:
            raise ValueError(f"eval set/task names must be unique and not {'/'.join(RESERVED)}: {', '.join(dup)}")
        return self


# -- scoring -------------------------------------------------------------------------------------------
def run_windows(model, windows: list[tuple[list[int], list[int]]], batch_size: int = 8):
    """Per (input, target) window: (sum of NLL over targets != -100, every such target is the argmax).
    Windows are padded to the batch's longest (inputs with 0, targets with -100: causal, so padding after a
    window changes none of its logits)."""
    import torch

    out = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i: i + batch_size]
        L = max(len(x) for x, _ in batch)
        x = torch.zeros(len(batch), L, dtype=torch.long)
        y = torch.full((len(batch), L), -100, dtype=torch.long)
        for j, (a, b) in enumerate(batch):
            x[j, :len(a)], y[j, :len(b)] = torch.tensor(a), torch.tensor(b)
        with torch.inference_mode():
            logits, nll = model(x, y, reduction="none")  # (b, L, V), (b, L) 0 where ignored
        greedy = ((logits.argmax(-1) == y) | (y == -100)).all(dim=1)
        out.extend(zip(nll.double().sum(dim=1).tolist(), greedy.tolist()))
    return out


def score_docs(model, docs_ids: list[list[int]], eos_id: int, T: int, batch_size: int = 8) -> list[float]:
    """Total NLL (nats) of each document's tokens (lm-eval rolling windows), in order."""
    wins, owner = [], []
    for d, ids in enumerate(docs_ids):
        w = rolling_windows(ids, eos_id, T)
        wins += w
        owner += [d] * len(w)
    totals = [0.0] * len(docs_ids)
    for d, (s, _) in zip(owner, run_windows(model, wins, batch_size)):
        totals[d] += s
    return totals


def score_stream(model, tokens, T: int, batch_size: int = 8) -> tuple[float, int]:
    """Total NLL and count of tokens[1:] scored in non-overlapping windows of T (each token once)."""
    tokens = [int(t) for t in tokens]
    starts = range(0, len(tokens) - 1, T)
    wins = [(tokens[s: s + T][: len(tokens) - 1 - s], tokens[s + 1: s + T + 1]) for s in starts]
    return sum(s for s, _ in run_windows(model, wins, batch_size)), len(tokens) - 1


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def summarize(nll: float, tokens: int, n_bytes: int | None = None, documents: int | None = None,
              words: int | None = None) -> dict:
    loss = nll / tokens
    return {"documents": documents, "tokens": tokens, "words": words, "bytes": n_bytes, "loglikelihood": -nll,
            "loss": round(loss, 6), "perplexity": round(_exp(loss), 4),
            "word_perplexity": round(_exp(nll / words), 4) if words else None,
            "byte_perplexity": round(_exp(nll / n_bytes), 6) if n_bytes else None,
            "bits_per_byte": round(nll / n_bytes / LN2, 6) if n_bytes else None}


def prepare_docs(texts: list[str], sp, max_tokens: int, counted: list[str] | None = None):
    """Whole documents in order as (token ids, words, UTF-8 bytes), skipping any that would pass
    ``max_tokens`` (the first one is always kept, so a budget smaller than every document still scores one).
    Words and bytes are counted on ``counted[i]`` (lm-eval's WikiText: the page before detokenizing)."""
    docs, n = [], 0
    for i, text in enumerate(texts):
        t = sp.encode(text)
        if t and (n + len(t) <= max_tokens or not docs):
            c = counted[i] if counted is not None else text
            docs.append((t, count_words(c), len(c.encode("utf-8"))))
            n += len(t)
        if n >= max_tokens:
            break
    return docs


def eval_docs(model, docs, eos_id: int, T: int, batch_size: int = 8) -> dict:
    """lm-eval metrics of prepared documents (``prepare_docs``), summed over all of them."""
    if not docs:
        raise ValueError("no non-empty documents")
    nll = sum(score_docs(model, [d[0] for d in docs], eos_id, T, batch_size))
    return summarize(nll, sum(len(d[0]) for d in docs), sum(d[2] for d in docs), len(docs), sum(d[1] for d in docs))


def prepare_last_word(texts: list[str], sp, max_examples: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(context ids, continuation ids) of the first ``max_examples`` passages; skipped: no last word."""
    pairs, skipped = [], 0
    for text in texts:
        split = last_word_split(text)
        pair = encode_pair(sp, *split) if split else None
        if not pair or not pair[1]:
            skipped += 1
            continue
        pairs.append(pair)
        if len(pairs) >= max_examples:
            break
    return pairs, skipped


def eval_last_word(model, pairs, eos_id: int, T: int, batch_size: int = 8, prefix_eos: bool = True) -> dict:
    """Accuracy (the word's tokens are each the argmax given the true prefix) and perplexity
    (exp(-mean log-likelihood of the word)); a word of T or more tokens cannot be scored and is skipped."""
    fit = [p for p in pairs if len(p[1]) < T]
    if not fit:
        raise ValueError("no passage whose last word fits the context")
    res = run_windows(model, [last_word_window(c, w, [eos_id] if prefix_eos else [], T) for c, w in fit], batch_size)
    ll = [-s for s, _ in res]
    return {"examples": len(fit), "too_long": len(pairs) - len(fit),
            "accuracy": round(sum(g for _, g in res) / len(fit), 6),
            "perplexity": round(_exp(-sum(ll) / len(fit)), 4), "loglikelihood": sum(ll),
            "word_tokens": sum(len(w) for _, w in fit)}


# -- inputs ----------------------------------------------------------------------------------------------
def _read_text(path: str, what: str) -> str:
    from stages.core.storage import open_input

    try:
        with open_input(path, "rb") as f:
            return decode_file(f.read(), path)
    except FileNotFoundError:
        raise StageError(f"evaluate: {what}: file not found: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise StageError(f"evaluate: {what}: cannot read {path} ({e})") from None


def load_set(es: EvalSet, path: str) -> tuple[list[str], list[str] | None, int]:
    """(texts to score, texts to count words/bytes on or None, lines skipped) of an eval set."""
    text, skipped = _read_text(path, f"eval set '{es.name}' at {path}"), 0
    if es.format == "jsonl":
        docs, skipped = read_jsonl(text, es.text_field, path)
    else:
        docs = split_documents(text, es.format)
    if not docs:
        raise StageError(f"evaluate: eval set '{es.name}' at {path}: no documents"
                         + (f" ({skipped} lines skipped)" if skipped else ""))
    if es.detokenize if es.detokenize is not None else es.format == "wikitext":
        return [wikitext_detokenize(d) for d in docs], docs, skipped
    return docs, None, skipped


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


# -- checkpoints -----------------------------------------------------------------------------------------
def is_uri(name: str) -> bool:
    return "://" in name or name.startswith(("/", "."))


def locate_checkpoint(name: str, train):
    """(storage, folder) of a checkpoint: a train-output folder (``final``, ``step_000100`` meaning
    ``checkpoints/step_000100``) or a folder URI/path (see the module docstring)."""
    from stages.core.storage import Storage

    if is_uri(name):
        uri = name.rstrip("/") if "://" in name else os.path.abspath(name)
        parent, base = uri.rsplit("/", 1)
        return Storage(parent), base
    if name.startswith("step_") and not train.exists(f"{name}/model_config.json"):
        return train, f"checkpoints/{name}"
    return train, name


def series_names(ctx: StageContext, cfg: Config) -> list[str]:
    if cfg.checkpoints != "all":
        return list(cfg.checkpoints)
    steps = sorted({p.split("/")[1] for p in ctx.input_files("train", prefix="checkpoints/", suffix="/model.pt")})
    return steps + (["final"] if ctx.input_files("train", prefix="final/", suffix="model.pt") else [])


def _load(name: str, train, vocab: int):
    import pickle

    from stages.train.checkpoint import load_model

    storage, rel = locate_checkpoint(name, train)
    try:
        model, meta = load_model(storage, rel)
    except pickle.UnpicklingError as e:  # weights_only: anything but tensors and plain containers is refused
        raise StageError(f"evaluate: checkpoint {storage.url(rel)} is not a plain state dict; refused to unpickle "
                         f"it ({(str(e).strip().splitlines() or [''])[-1][:200]})") from None
    except FileNotFoundError:
        where = storage.url(rel) if is_uri(name) else train.url()
        have = [] if is_uri(name) else sorted({p.split("/")[1] for p in train.list("checkpoints", suffix="model.pt")})
        raise StageError(f"evaluate: no checkpoint '{name}' in {where}"
                         + (f" (have: final, {', '.join(have)})" if have else "")) from None
    if model.cfg.vocab_size != vocab:
        raise StageError(f"evaluate: tokenizer has {vocab} pieces, checkpoint {storage.url(rel)} "
                         f"{model.cfg.vocab_size}")
    return model, meta, storage.url(rel)


def external_inputs(cfg: Config, kiln_cfg) -> dict:
    """What this stage reads outside the DAG, by content (part of its fingerprint): the eval files (sha256)
    and checkpoints given as URIs (the storage's key of model.pt: size/mtime or ETag)."""
    from stages.core.storage import Storage, open_input

    out = {}
    for path in sorted({s.path for s in cfg.sets} | {t.path for t in cfg.last_word}):
        full = resolve_path(kiln_cfg, path)
        try:
            with open_input(full, "rb") as f:
                out[full] = hashlib.sha256(f.read()).hexdigest()
        except Exception as e:  # noqa: BLE001 - the stage itself reports it clearly
            out[full] = f"unreadable: {type(e).__name__}"
    names = [cfg.checkpoint] + (cfg.checkpoints if isinstance(cfg.checkpoints, list) else [])
    for name in sorted({n for n in names if is_uri(n)}):
        storage, rel = locate_checkpoint(name, None)
        try:
            out[storage.url(rel)] = storage.fs.ukey(storage._p(f"{rel}/model.pt"))
        except Exception as e:  # noqa: BLE001
            out[storage.url(rel)] = f"unreadable: {type(e).__name__}"
    return out


# -- stage -----------------------------------------------------------------------------------------------
def run(cfg: Config, ctx: StageContext) -> StageResult:
    import numpy as np
    import sentencepiece as spm
    import torch

    from stages.train.data import ShardError, open_shards

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = ctx.inputs["tokenizer"].get("metrics", {})
    eos_id = tok.get("eos_id")
    if not isinstance(eos_id, int) or eos_id < 0:
        raise StageError(f"evaluate: tokenizer manifest in {ctx.input('tokenizer').url()} has no metrics.eos_id")
    sp = spm.SentencePieceProcessor(
        model_file=ctx.input("tokenizer").get_file("tokenizer.model", os.path.join(ctx.workdir, "tokenizer.model")))
    V = sp.get_piece_size()
    train = ctx.input("train")
    model, meta, url = _load(cfg.checkpoint, train, V)

    # everything model-independent, once: token streams, documents, passages
    shard = ctx.input("shard")
    try:
        shards = open_shards(shard, ctx.input_files("shard", prefix="tokens/validation/", suffix=".bin"), V)
    except ShardError as e:
        raise StageError(f"evaluate: validation shards: {e}") from None
    stream, need = [], cfg.val_tokens + 1
    for sh in shards:
        stream.append(sh.read(0, min(sh.n_tokens, need)))
        need -= len(stream[-1])
        if need <= 0:
            break
    stream = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int64)
    if len(stream) < 2:
        raise StageError(f"evaluate: validation shards in {shard.url()} hold fewer than 2 tokens")
    texts = _read_parquet_texts(shard, ctx.input_files("shard", prefix="parquet/validation/", suffix=".parquet"))
    if not texts:
        raise StageError(f"evaluate: the shard manifest in {shard.url()} lists no non-empty parquet/validation texts")
    doc_sets = {"validation_docs": (prepare_docs(texts, sp, cfg.doc_tokens), {})}
    for es in cfg.sets:
        path = resolve_path(ctx.cfg, es.path)
        scored, counted, skipped = load_set(es, path)
        extra = {"path": path, "format": es.format, **({"skipped_lines": skipped} if es.format == "jsonl" else {})}
        doc_sets[es.name] = (prepare_docs(scored, sp, es.max_tokens, counted), extra)
    tasks = {}
    for t in cfg.last_word:
        path = resolve_path(ctx.cfg, t.path)
        raw = _read_text(path, f"last-word task '{t.name}' at {path}")
        if t.format == "jsonl":
            passages, skipped = read_jsonl(raw, t.text_field, path)
        else:
            passages, skipped = [" ".join(p.split()) for p in split_documents(raw, t.format)], 0
        short = sum(len(p.split()) < t.min_words for p in passages)
        passages = [p for p in passages if len(p.split()) >= t.min_words]
        pairs, no_word = prepare_last_word(passages, sp, t.max_examples)
        if not pairs:
            raise StageError(f"evaluate: last-word task '{t.name}' at {path}: no usable passage "
                             f"({skipped} lines skipped, {no_word} without a last word, {short} under "
                             f"{t.min_words} words)")
        tasks[t.name] = (pairs, t, {"path": path, "format": t.format, "skipped_lines": skipped,
                                    "no_last_word": no_word, "too_short": short})

    def evaluate(m) -> dict:
        T = m.cfg.seq_len
        nll, n = score_stream(m, stream, T, cfg.batch_size)
        sets = {"validation": summarize(nll, n)}
        words = {}
        try:
            for name, (docs, extra) in doc_sets.items():
                sets[name] = {**eval_docs(m, docs, eos_id, T, cfg.batch_size), **extra}
                log.info("evaluate: %s %s", name, sets[name])
            for name, (pairs, t, extra) in tasks.items():
                words[name] = {**eval_last_word(m, pairs, eos_id, T, cfg.batch_size, t.prefix_eos), **extra}
                log.info("evaluate: %s %s", name, words[name])
        except ValueError as e:
            raise StageError(f"evaluate: '{name}': {e}") from None
        return {"sets": sets, "last_word": words}

    head = evaluate(model)
    report = {"checkpoint": url, "step": meta.get("step"), "tokens_trained": meta.get("tokens"), "model": meta["model"],
              "params": model.num_params(), **head}

    g, gens = cfg.generate, []
    for prompt in g.prompts:
        ids = sp.encode(prompt)
        modes = [("greedy", 0, g.seed)] + [("top_k", g.top_k, g.seed + i) for i in range(g.samples if g.top_k else 0)]
        for mode, k, seed in modes:
            new = generate(model, ids, eos_id, model.cfg.seq_len, g.max_new_tokens, k, g.temperature, seed)
            full, pre = sp.decode(ids + new), sp.decode(ids)
            gens.append({"prompt": prompt, "mode": mode, "top_k": k, "temperature": g.temperature if k else None,
                         "seed": seed if k else None, "new_tokens": len(new), "tokens": new,
                         "text": full[len(pre):] if full.startswith(pre) else sp.decode(new)})
    outputs = ["report.json"]
    if gens:
        report["generations"] = gens
        ctx.out.write_bytes("generations.md", generations_markdown(meta.get("step"), url, gens).encode())
        outputs.append("generations.md")

    results, curve = {url: (meta, head)}, []
    for name in series_names(ctx, cfg):
        u = _series_url(name, train)
        if u not in results and cfg.checkpoints == "all":  # final and the last step folder: the same weights
            st, rel = locate_checkpoint(name, train)
            if st.read_json(f"{rel}/model_config.json").get("step") in {mt.get("step") for mt, _ in results.values()}:
                continue
        if u not in results:
            m, mt, u = _load(name, train, V)
            results[u] = (mt, evaluate(m))
            del m
        mt, r = results[u]
        curve.append({"checkpoint": name, "url": u, "step": mt.get("step"), "tokens_trained": mt.get("tokens"), **r})
    if curve:
        report["curve"] = sorted(curve, key=lambda c: (c["step"] is None, c["step"] or 0))
    ctx.out.write_json("report.json", report)

    sets = head["sets"]
    metrics = {"val_loss": sets["validation"]["loss"], "val_perplexity": sets["validation"]["perplexity"],
               "val_bits_per_byte": sets["validation_docs"]["bits_per_byte"],
               "val_word_perplexity": sets["validation_docs"]["word_perplexity"]}
    for name, s in sets.items():
        if name not in RESERVED:
            metrics.update({f"{name}_{k}": s[k] for k in ("bits_per_byte", "word_perplexity", "byte_perplexity")})
    for name, r in head["last_word"].items():
        metrics.update({f"{name}_accuracy": r["accuracy"], f"{name}_perplexity": r["perplexity"]})
    if curve:
        metrics["curve"] = [{"step": c["step"], "val_loss": c["sets"]["validation"]["loss"],
                             "val_bits_per_byte": c["sets"]["validation_docs"]["bits_per_byte"]}
                            for c in report["curve"]]
    counts = {"tokens_scored": sum(s["tokens"] for s in sets.values()), "sets": len(sets),
              "last_word_examples": sum(r["examples"] for r in head["last_word"].values()),
              "checkpoints": 1 + len({c["url"] for c in curve} - {url}), "generations": len(gens)}
    return StageResult(outputs=outputs, counts=counts, metrics=metrics)


def _series_url(name: str, train) -> str:
    storage, rel = locate_checkpoint(name, train)
    return storage.url(rel)
