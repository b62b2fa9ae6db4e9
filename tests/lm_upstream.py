"""Build the upstream artifacts train/evaluate read (tokenizer model, token shards, Parquet texts) from
REAL text, with manifests laid out like the tokenizer and shard stages write them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from conftest import SHARED, seed_files

SHAKESPEARE = SHARED / "eval" / "tinyshakespeare" / "input.txt"


def shakespeare_docs(max_bytes: int | None = None, doc_bytes: int = 2000) -> list[str]:
    """Tiny Shakespeare cut at speech boundaries (blank lines) into documents of ~doc_bytes."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:max_bytes]
    docs, cur = [], ""
    for speech in text.split("\n\n"):
        cur = f"{cur}\n\n{speech}" if cur else speech
        if len(cur) >= doc_bytes:
            docs.append(cur)
            cur = ""
    return docs + ([cur] if cur.strip() else [])


def train_spm(docs: list[str], workdir: Path, vocab_size: int = 512) -> tuple[str, dict]:
    import sentencepiece as spm

    model_prefix = str(workdir / "spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=model_prefix, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=2,
                                   max_sentence_length=100000, minloglevel=2)
    return model_prefix + ".model", {"vocab_size": vocab_size, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def build_upstream(storage: str, run_id: str, workdir: Path, max_bytes: int | None = 400_000,
                   vocab_size: int = 512, val_fraction: float = 0.1, repeat: int = 1) -> dict:
    """Seed `tokenizer` and `shard` for (storage, run_id). Returns facts for assertions.

    ``repeat`` writes the training documents several times over (more tokens for throughput runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sentencepiece as spm

    from stages.core.tokens import TokenShardWriter

    workdir.mkdir(parents=True, exist_ok=True)
    docs = shakespeare_docs(max_bytes)
    n_val = max(2, int(len(docs) * val_fraction))
    splits = {"train": docs[:-n_val], "validation": docs[-n_val:]}
    model_path, tok = train_spm(splits["train"], workdir, vocab_size)
    seed_files(storage, run_id, "tokenizer", {"tokenizer.model": model_path}, metrics=tok)

    sp = spm.SentencePieceProcessor(model_file=model_path)
    files, facts = {}, {}
    for split, texts in splits.items():
        ids = sp.encode(texts)
        w = TokenShardWriter(str(workdir / f"{split}.bin"), str(workdir / f"{split}.idx"), vocab_size, tok["eos_id"])
        for _ in range(repeat if split == "train" else 1):
            for doc_ids in ids:
                w.add(doc_ids)
        facts[split] = w.close()
        files[f"tokens/{split}/00000.bin"] = str(workdir / f"{split}.bin")
        files[f"tokens/{split}/00000.idx"] = str(workdir / f"{split}.idx")
        table = pa.table({"text": texts, "id": [f"{split}-{i}" for i in range(len(texts))],
                          "url": [f"https://shakespeare.example/{split}/{i}" for i in range(len(texts))],
                          "domain": ["shakespeare.example"] * len(texts), "n_tokens": [len(x) for x in ids]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        files[f"parquet/{split}/00000.parquet"] = buf.getvalue()
        facts[split]["texts"] = texts
        facts[split]["stream"] = np.fromfile(workdir / f"{split}.bin", dtype="<u2", offset=64).astype(np.int64)
    seed_files(storage, run_id, "shard", files,
               counts={"documents_in": len(docs), "documents_out": len(docs),
                       "tokens_train": facts["train"]["tokens"], "tokens_validation": facts["validation"]["tokens"]})
    facts["tokenizer"] = {**tok, "model_path": model_path}
    return facts


if __name__ == "__main__":  # build a larger corpus for throughput measurements
    import sys
    import tempfile

    storage, run_id = sys.argv[1], sys.argv[2]
    f = build_upstream(storage, run_id, Path(tempfile.mkdtemp()), max_bytes=None,
                       vocab_size=int(os.environ.get("VOCAB", 8000)), repeat=int(os.environ.get("REPEAT", 1)))
    print({k: {kk: vv for kk, vv in v.items() if kk not in ("texts", "stream")} for k, v in f.items()})
