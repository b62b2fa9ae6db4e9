"""What evaluate scores, by the conventions of EleutherAI's lm-evaluation-harness (lm-eval), so numbers from
models with different tokenizers compare.

- Rolling windows (lm-eval ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``): a
  document's tokens are predicted in disjoint blocks of the context length T; the first window reads the
  end-of-text token then the document; every later window reads the T tokens ending just before its last
  prediction, so a short last block is conditioned on a full context (the windows' *predictions* never
  overlap; the last window's *context* reaches back). Every token is scored exactly once. The prefix is
  EOS: lm-eval's HF model takes the tokenizer's BOS if it has one, else EOS; Kiln's tokenizer defines a BOS
  that training never shows (documents are separated by EOS), so EOS is the token a document follows, as
  ``<|endoftext|>`` is for GPT-2. Checked against lm-eval 0.4.13's own functions (tests/test_evaluate.py).
- Per-set metrics summed over documents: ``word_perplexity = exp(-Σ loglik / Σ words)``,
  ``byte_perplexity = exp(-Σ loglik / Σ bytes)``, ``bits_per_byte = -Σ loglik / Σ bytes / ln 2`` (UTF-8
  bytes), words counted as lm-eval's ``len(re.split(r"\\s+", text))`` with its quirks: a leading or
  trailing whitespace run adds an empty string, so " a b \\n" counts 4, and "" counts 1.
- WikiText documents are lm-eval's pages (its dataset script): the file split at lines ``= Title =``,
  lines kept (blank ones too) and joined by "\\n"; the scored text is lm-eval's ``wikitext_detokenizer``
  of the page, words and bytes are counted on the page *before* detokenizing (as lm-eval's
  ``process_results`` does). The file on disk is WikiText-2 v1 (tokenized, ``<unk>``), lm-eval reads the
  raw v1 files: same convention, different text, so the absolute numbers differ from published ones.
- Last-word prediction (lm-eval ``lambada_openai``): context = the text up to its last space, continuation
  = " " + the last word; continuation tokens are the tokens of context + continuation after the context's
  own tokens (lm-eval ``_encode_pair``); accuracy = every continuation token is the argmax given the true
  prefix (lm-eval ``is_greedy``, identical to greedy decoding reproducing the word); perplexity =
  exp(-mean over examples of the word's log-likelihood), lm-eval's ``perplexity`` aggregation. lm-eval
  prefixes nothing to a non-empty context; Kiln prefixes EOS by default (``prefix_eos``): a passage then
  starts the way every training document did.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re

log = logging.getLogger("kiln.evaluate")
LN2 = math.log(2)


# -- words, documents ------------------------------------------------------------------------------------
def count_words(text: str) -> int:
    """lm-eval's word count, quirks included (leading/trailing whitespace adds an empty 'word')."""
    return len(re.split(r"\s+", text))


def wikitext_pages(text: str) -> list[str]:
    """lm-eval's WikiText pages: a page starts at each top-level heading line (``= T =`` after collapsing
    ``= = =``/``= =``), lines joined by "\\n" as in the file, whitespace-only pages dropped."""
    pages, cur = [], []
    for line in text.split("\n"):
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.endswith(" ="):
            if "\n".join(cur).strip():
                pages.append("\n".join(cur))
            cur = []
        cur.append(line)
    if "\n".join(cur).strip():
        pages.append("\n".join(cur))
    return pages


def wikitext_detokenize(s: str) -> str:
    """lm-eval's ``wikitext_detokenizer`` (same rules, same order)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def split_documents(text: str, fmt: str) -> list[str]:
    """Documents of a plain-text file, each an exact substring of it: ``wikitext`` lm-eval's pages,
    ``paragraphs`` blank-line separated blocks (stripped), ``lines`` one per non-blank line (as in the file,
    e.g. PTB's leading space), ``whole`` the file as one document."""
    if fmt == "wikitext":
        return wikitext_pages(text)
    if fmt == "paragraphs":
        return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if fmt == "lines":
        return [ln for ln in re.split(r"\r?\n", text) if ln.strip()]
    if fmt == "whole":
        return [text] if text.strip() else []
    raise ValueError(f"unknown plain-text format '{fmt}'")


def decode_file(data: bytes, path: str) -> str:
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def read_jsonl(text: str, field: str, path: str) -> tuple[list[str], int]:
    """The ``field`` of every JSON line. A line that is not JSON, not an object, or lacks a non-empty string
    ``field`` is skipped and counted (the first few are logged with their line number), never fatal."""
    out, skipped = [], 0
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and friends may sit inside a string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            value = rec.get(field) if isinstance(rec, dict) else None
            why = None if isinstance(value, str) and value.strip() else f"no string field '{field}'"
        except json.JSONDecodeError as e:
            value, why = None, f"not JSON ({e.msg})"
        if why:
            skipped += 1
            if skipped <= 5:
                log.warning("evaluate: %s line %d skipped: %s", path, n, why)
            continue
        out.append(value)
    return out, skipped


# -- windows ---------------------------------------------------------------------------------------------
def rolling_windows(ids: list[int], prefix_id: int, T: int) -> list[tuple[list[int], list[int]]]:
    """(input, target) pairs of lm-eval's rolling log-likelihood with context_len=1; targets -100 are
    context only (not scored). Concatenating the scored targets gives ``ids`` exactly once, in order."""
    n, seq, out = len(ids), [prefix_id] + list(ids), []
    if not n:
        return out
    first = min(T, n)
    out.append((seq[:first], list(ids[:first])))
    p = first
    while p < n:
        end = min(n, p + T)
        x = seq[end - T: end]  # the T tokens before each prediction up to ids[end-1]
        out.append((x, [-100] * (len(x) - (end - p)) + list(ids[p:end])))
        p = end
    return out


# -- last word -------------------------------------------------------------------------------------------
def last_word_split(text: str) -> tuple[str, str] | None:
    """lm-eval lambada: context = words but the last (split on ' '), continuation = ' ' + last word."""
    parts = text.split(" ")
    if len(parts) < 2 or not parts[-1] or not " ".join(parts[:-1]).strip():
        return None
    return " ".join(parts[:-1]), " " + parts[-1]


def encode_pair(sp, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval ``_encode_pair``: trailing spaces of the context move to the continuation; the continuation's
    tokens are those of the whole string after as many tokens as the context alone has."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = sp.encode(context + continuation), sp.encode(context)
    return whole[:len(ctx)], whole[len(ctx):]


def last_word_window(ctx_ids: list[int], cont_ids: list[int], prefix: list[int], T: int):
    """(input, target) scoring ``cont_ids`` after ``prefix + ctx_ids``, the context cut from the left to fit T
    (lm-eval: ``(context + continuation)[-(T + 1):][:-1]``)."""
    seq = (list(prefix) + list(ctx_ids) + list(cont_ids))[-(T + 1):]
    x = seq[:-1]
    return x, [-100] * (len(x) - len(cont_ids)) + list(cont_ids)


# -- generation ------------------------------------------------------------------------------------------
def generate(model, prompt_ids: list[int], eos_id: int, T: int, max_new_tokens: int, top_k: int = 0,
             temperature: float = 1.0, seed: int = 0) -> list[int]:
    """Continue EOS + prompt token by token (the last T tokens as context; no KV cache: small models, short
    outputs). top_k 0: greedy; else sample among the k most likely at ``temperature`` from a generator seeded
    with ``seed`` (the same seed, model and prompt give the same text). Stops at EOS."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seq, out = [eos_id] + list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([seq[-T:]]))
            last = logits[0, -1].double()
            if top_k:
                v, i = last.topk(min(top_k, last.numel()))
                nxt = int(i[torch.multinomial(torch.softmax(v / temperature, -1), 1, generator=g)])
            else:
                nxt = int(last.argmax())
            if nxt == eos_id:
                break
            seq.append(nxt)
            out.append(nxt)
    return out


def generations_markdown(step, checkpoint: str, gens: list[dict]) -> str:
    lines = [f"# Sample generations\n\ncheckpoint `{checkpoint}` (step {step})\n"]
    for g in gens:
        how = ("greedy" if g["mode"] == "greedy"
               else f"top-{g['top_k']}, temperature {g['temperature']}, seed {g['seed']}")
        lines.append(f"## {how}, {g['new_tokens']} new tokens\n\nprompt: `{g['prompt']}`\n\n```text\n"
                     f"{g['prompt']}{g['text']}\n```\n")
    return "\n".join(lines)
