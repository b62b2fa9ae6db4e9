"""Shard: tokenize the reweighted corpus and write training-ready shards, split train / validation.

One datatrove pipeline over reweight's ``data/``. Each task fetches ``tokenizer.model`` once, encodes
its documents in batches and assigns each to ``train`` or ``validation`` by a stable hash of its *base* id
(copies ``<id>#rN`` land with their original; adding documents never moves an existing one). Per task
and split it writes
  * ``tokens/{split}/{rank:05d}.bin`` + ``.idx`` (``stages.core.tokens`` format, EOS after every
    document; written locally, then uploaded), and
  * ``parquet/{split}/{rank:05d}.parquet`` (text, id, url, domain, date, n_tokens; explicit schema,
    zstd, one row group per ``parquet_rows_per_group`` documents).
A split with no documents in a task writes no files. ``index.json`` lists every token shard with its
header, for the trainer; ``mixture.json`` the realised mixture in real tokens per domain (under reweight's
key) beside reweight's target shares, with reweight's mixture and its sha256: the lineage the train stage
logs (byte-identical across runs of the same input).
"""

from __future__ import annotations

import os

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError, StageResult
from stages.reweight import base_id, stable_unit

SPLITS = ("train", "validation")


class Config(Strict):
    val_fraction: float = Field(0.05, ge=0, lt=1)  # of original documents (by hash of the base id)
    parquet_rows_per_group: int = Field(1024, ge=1)  # rows per Parquet row group (a streaming unit)
    encode_batch: int = Field(256, ge=1)  # documents per sentencepiece call (the next one encodes meanwhile)
    encode_threads: int | None = Field(None, ge=1)  # per task; null: the cores / the tasks running at once
    # smaller inputs (MB of reweight's compressed data/) are one task in this process, encoding with every core:
    # a worker pool costs ~1-2 s to start, as much as encoding the 15 MB demo corpus
    inprocess_below_mb: float = Field(16.0, ge=0)


def split_of(doc_id: str, val_fraction: float) -> str:
    """'validation' or 'train', from a stable hash of the base id alone: runs with other seeds or more data
    keep every document on its side, so their validation numbers compare (salted apart from reweight's hash)."""
    return "validation" if stable_unit("split", base_id(doc_id)) < val_fraction else "train"


def parquet_schema():
    import pyarrow as pa

    return pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string()), ("domain", pa.string()),
                      ("date", pa.string()), ("n_tokens", pa.int32())])


def _parquet_row(self, doc) -> dict:
    """datatrove writer adapter: one flat row per document."""
    md = doc.metadata

    def s(key):
        return None if md.get(key) is None else str(md[key])

    return {"text": doc.text, "id": doc.id, "url": s("url"), "domain": s("domain"), "date": s("date"),
            "n_tokens": md["n_tokens"]}


def _block():
    from datatrove.pipeline.base import PipelineStep

    class TokenShards(PipelineStep):
        """Tokenizes documents, writes each task's token shards per split and tags ``split``/``n_tokens``."""

        name = "token shards"
        type = "🔢 - TOKENIZER"

        def __init__(self, tokenizer_uri: str, out_uri: str, cfg: Config, domains=None):
            super().__init__()
            self.tokenizer_uri, self.out_uri, self.cfg = tokenizer_uri, out_uri, cfg
            self.domains = domains  # the reweight Config: tokens are counted per domain under its key

        def run(self, data, rank: int = 0, world_size: int = 1):
            import itertools
            import os
            import shutil
            import tempfile
            from collections import Counter
            from concurrent.futures import ThreadPoolExecutor

            import sentencepiece as spm

            from stages.core.storage import Storage
            from stages.core.tokens import TokenShardWriter
            from stages.reweight import domain_of

            tmp = tempfile.mkdtemp(prefix=f"kiln-shard-{rank:05d}-")
            pool = None
            try:
                model = Storage(self.tokenizer_uri).get_file("tokenizer.model", os.path.join(tmp, "tokenizer.model"))
                sp = spm.SentencePieceProcessor(model_file=model)
                vocab, eos = sp.get_piece_size(), sp.eos_id()
                writers = {s: TokenShardWriter(os.path.join(tmp, f"{s}.bin"), os.path.join(tmp, f"{s}.idx"), vocab, eos)
                           for s in SPLITS}
                data = iter(data or ())
                # encoding (sentencepiece threads, the GIL released) of batch k+1 overlaps the main thread's
                # work on batch k: token shards, tags, and the downstream blocks (Tally, Parquet) it yields to
                pool = ThreadPoolExecutor(1)  # shut down in finally, also when a downstream block raises
                encode = lambda b: sp.encode([d.text for d in b], num_threads=self.cfg.encode_threads)  # noqa: E731
                batch = list(itertools.islice(data, self.cfg.encode_batch))
                pending = pool.submit(encode, batch) if batch else None
                while batch:
                    nxt = list(itertools.islice(data, self.cfg.encode_batch))
                    with self.track_time(unit="batch"):
                        ids = pending.result()
                    pending = pool.submit(encode, nxt) if nxt else None
                    seqs: dict[str, list] = {s: [] for s in SPLITS}
                    counts: Counter = Counter()
                    kept = []
                    for doc, seq in zip(batch, ids):
                        if not seq:
                            counts["empty"] += 1
                            continue
                        split = split_of(doc.id, self.cfg.val_fraction)
                        seqs[split].append(seq)
                        kept.append(doc)
                        doc.metadata["split"], doc.metadata["n_tokens"] = split, len(seq)
                        counts[f"docs_{split}"] += 1
                        counts[f"tokens_{split}"] += len(seq) + 1  # + EOS
                        if self.domains is not None:
                            counts[f"tokens:{domain_of(doc.metadata, self.domains)}"] += len(seq) + 1
                    for split, batch_seqs in seqs.items():
                        if batch_seqs:
                            writers[split].add_many(batch_seqs)
                    for key, n in counts.items():
                        self.stat_update(key, value=n)
                    yield from kept
                    batch = nxt
                out = Storage(self.out_uri)
                for split, w in writers.items():
                    if w.close()["documents"]:
                        for ext in ("bin", "idx"):
                            out.put_file(os.path.join(tmp, f"{split}.{ext}"), f"tokens/{split}/{rank:05d}.{ext}")
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
                shutil.rmtree(tmp, ignore_errors=True)

    return TokenShards


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from datatrove.pipeline.writers import ParquetWriter

    from stages.core.pipeline import Tally, block_stats, run_pipeline, tally_counts, upstream_reader
    from stages.core.tokens import TokenShard

    if "tokenizer.model" not in ctx.input_files("tokenizer"):
        raise StageError(f"shard: the tokenizer manifest in {ctx.input('tokenizer').url()} lists no tokenizer.model")
    size = sum(o["bytes"] for o in ctx.inputs["reweight"]["outputs"] if o["path"].startswith("data/"))
    cores = len(os.sched_getaffinity(0))
    tasks, workers = (1, 1) if size < cfg.inprocess_below_mb * 1e6 else (ctx.cfg.run.tasks, ctx.cfg.run.workers)
    threads = cfg.encode_threads or max(1, cores // min(workers, tasks))
    steps = [
        upstream_reader(ctx, "reweight", add_file_path=False),
        _block()(ctx.input("tokenizer").url(), ctx.out.url(), cfg.model_copy(update={"encode_threads": threads}),
                 ctx.cfg.reweight),
        Tally(words=False),
        ParquetWriter(ctx.out.datafolder("parquet"), output_filename="${split}/${rank}.parquet",
                      compression="zstd", adapter=_parquet_row, batch_size=cfg.parquet_rows_per_group,
                      max_file_size=-1, schema=parquet_schema()),
    ]
    stats = run_pipeline(ctx, steps, name="shard", tasks=tasks, workers=workers)
    tok = block_stats(stats, "token shards")
    out = tally_counts(block_stats(stats, "tally"))
    n = {k.replace("validation", "val"): int(tok.get(k, 0))
         for k in ("docs_train", "docs_validation", "tokens_train", "tokens_validation", "empty")}
    docs_in = int(block_stats(stats, "🐿 Jsonl").get("documents", 0))
    if docs_in != out["documents"] + n["empty"]:
        raise StageError(f"shard: read {docs_in} documents but wrote {out['documents']} (+{n['empty']} empty)")
    if n["docs_train"] == 0:
        raise StageError(f"shard: the train split is empty ({docs_in} documents in)")
    if cfg.val_fraction > 0 and n["docs_val"] == 0:
        raise StageError(f"shard: the validation split is empty: none of {docs_in} documents hashed below "
                         f"val_fraction={cfg.val_fraction}; add data or raise shard.val_fraction")

    index = {}
    for split in SPLITS:
        index[split] = []
        for rel in ctx.out.list(f"tokens/{split}", suffix=".bin"):
            h = TokenShard(ctx.out, rel).header
            index[split].append({"path": rel, "idx": rel[:-4] + ".idx", "n_tokens": h["n_tokens"],
                                 "n_docs": h["n_docs"], "dtype": str(h["dtype"]), "vocab_size": h["vocab_size"],
                                 "eos_id": h["eos_id"]})
    ctx.out.write_json("index.json", index)
    written = {s: sum(e["n_tokens"] for e in index[s]) for s in SPLITS}
    if written != {"train": n["tokens_train"], "validation": n["tokens_val"]}:
        raise StageError(f"shard: token shards hold {written} tokens but {n['tokens_train']}/{n['tokens_val']} "
                         "were encoded (a task's upload is missing)")

    counts = {"documents_in": docs_in, "documents_out": out["documents"], "bytes_out": out["bytes"],
              "tokens_out": n["tokens_train"] + n["tokens_val"],
              "tokens_train": n["tokens_train"], "tokens_val": n["tokens_val"],
              "docs_train": n["docs_train"], "docs_val": n["docs_val"], "removed": {"empty": n["empty"]}}
    first = (index["train"] or index["validation"])[0]
    metrics = {"bytes_per_token": round(out["bytes"] / max(1, counts["tokens_out"] - out["documents"]), 4),
               "val_share_docs": round(n["docs_val"] / out["documents"], 4), "token_dtype": first["dtype"],
               "vocab_size": first["vocab_size"], "eos_id": first["eos_id"], "blocks": stats}
    # the realised mixture in real tokens (all splits, EOS included) beside reweight's target: train logs it
    target = ctx.input("reweight").read_json("mixture.json") if "mixture.json" in ctx.input_files("reweight") else None
    by_dom = {k.split(":", 1)[1]: int(v) for k, v in tok.items() if k.startswith("tokens:")}
    total = sum(by_dom.values())
    mixture = {"key": ctx.cfg.reweight.key, "tokens": total,
               "domains": {d: {"tokens": t, "share": round(t / total, 6),
                               "share_target": (target or {}).get("domains", {}).get(d, {}).get("share_target"),
                               "epochs": (target or {}).get("domains", {}).get(d, {}).get("epochs")}
                           for d, t in sorted(by_dom.items(), key=lambda kv: -kv[1])},
               "reweight_mixture_sha256": next((o["sha256"] for o in ctx.inputs["reweight"].get("outputs", [])
                                                if o["path"] == "mixture.json"), None), "reweight": target}
    errs = [abs(v["share"] - v["share_target"]) for v in mixture["domains"].values() if v["share_target"] is not None]
    mixture["max_share_error_tokens"] = round(max(errs), 6) if errs else None
    ctx.out.write_json("mixture.json", mixture)
    metrics["mixture"] = {d: v["share"] for d, v in mixture["domains"].items()}
    metrics["max_share_error_tokens"] = mixture["max_share_error_tokens"]
    outputs = ["index.json", "mixture.json", *ctx.out.list("tokens"), *ctx.out.list("parquet", suffix=".parquet")]
    return StageResult(outputs=outputs, counts=counts, metrics=metrics)
