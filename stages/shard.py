"""Shard: tokenize the reweighted corpus and write training-ready shards, split train / validation.

One datatrove pipeline over reweight's ``data/``: a JSONL reader, then ``TokenShards``, which encodes documents in
batches and assigns each to ``train`` or ``validation`` by a stable hash of its *base* id (copies ``<id>#rN`` land
with their original; adding documents never moves an existing one). Per task and split it writes
  * ``tokens/{split}/{rank:05d}.bin`` + ``.idx`` (``stages.core.tokens`` format, EOS after every
    document), and
  * ``parquet/{split}/{rank:05d}.parquet`` (text, id, url, domain, date, n_tokens; explicit schema,
    zstd, one row group per ``parquet_rows_per_group`` documents),
in place on local storage, else locally and uploaded at the end. A split with no documents in a task writes no
files. With ``order: curriculum`` the train files of phase k go to ``train/pKK/`` instead (see ``phase_of``).
``index.json`` lists every token shard with its header (and phase), for the trainer; ``mixture.json`` the
realised mixture in real tokens per domain (under reweight's key) beside reweight's target shares, with
reweight's mixture and its sha256, and the data order: the lineage the train stage logs (byte-identical across
runs of the same input).

Throughput (the issue's goal: ≥ 0.9x raw sentencepiece batch encoding of the same text, same threads;
bench/bench_tokenize.py). Encoding takes ~93% of the CPU time; everything else runs while it runs:
sentencepiece returns int32 arrays (no Python int per token), two calls stay in flight on their own batches so
no core waits at a call's end, the first batches are small so encoding starts after a few documents, the
tokenizer loads while they are read, JSONL is read as bytes (zlib + orjson), Parquet and token shards are
written by this block as batches come back (no per-document writer blocks), and small inputs run in this
process without datatrove's executor (no worker pool, no Manager process).

Memory (issue 9: flat peak memory per worker). A task holds, per split, at most one row group of pending Parquet
rows (``parquet_rows_per_group``) as Arrow buffers of each encode batch (a document's Python strings are freed
once it has passed), the batches in flight, and 8 bytes a document for the token index; a row group's text is
assembled once at its flush. Parquet arrays are built from buffers (``pa.array`` imports pandas, +34 MB), and
freed memory goes back to the system (``return_freed_memory``). Shard stage alone on bench_scaling's inputs,
tiny profile, 2 tasks / 2 workers, peak anonymous RSS of a worker: 1x 143 -> 80 MB, 4x 231 -> 99-105 MB (peak
RSS 208 -> 128-131 and 295 -> 160-161 MB). What still grows 1x -> 4x (~20 MB) is the first full row group
(a 1x task has ~530 rows, under one) and allocator state; output bytes are unchanged (sha256 of every output).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from typing import Literal

from pydantic import Field

from stages.core.config import Edges, Strict
from stages.core.runner import StageContext, StageError, StageResult
from stages.reweight import base_id, stable_unit

SPLITS = ("train", "validation")


class Config(Strict):
    val_fraction: float = Field(0.05, ge=0, lt=1)  # of original documents (by hash of the base id)
    parquet_rows_per_group: int = Field(1024, ge=1)  # rows per Parquet row group (a streaming unit)
    encode_batch_kb: int = Field(1000, ge=1)  # KB of text per sentencepiece call (two calls in flight at a time)
    encode_threads: int | None = Field(None, ge=1)  # per task; null: the cores / the tasks running at once
    # smaller inputs (MB of reweight's compressed data/) are one task in this process, encoding with every core:
    # a worker pool costs ~1-2 s to start, as much as encoding the 15 MB demo corpus
    inprocess_below_mb: float = Field(16.0, ge=0)
    # data order for training. shuffled: train shuffles all windows. curriculum: train documents go to phases by
    # metadata[curriculum_key] cut at curriculum_edges (ascending; no score: phase 0), shards per phase, and the
    # trainer visits the phases in order, shuffled within each (stages.train.data.BatchSampler)
    order: Literal["shuffled", "curriculum"] = "shuffled"
    curriculum_key: str = "quality_score"
    curriculum_edges: Edges = [0.2, 0.4, 0.6, 0.8]


def split_of(doc_id: str, val_fraction: float) -> str:
    """'validation' or 'train', from a stable hash of the base id alone: runs with other seeds or more data
    keep every document on its side, so their validation numbers compare (salted apart from reweight's hash)."""
    return "validation" if stable_unit("split", base_id(doc_id)) < val_fraction else "train"


def phase_of(metadata: dict, cfg: Config) -> int:
    """Curriculum phase of a document: how many of ``curriculum_edges`` its ``metadata[curriculum_key]`` reaches
    (the edges cut like reweight's quality buckets: a score equal to an edge goes up); 0 without a score."""
    v = metadata.get(cfg.curriculum_key)
    return 0 if not isinstance(v, (int, float)) else bisect.bisect_right(cfg.curriculum_edges, float(v))


def shard_dir(split: str, phase: int | None) -> str:
    """``train``, or ``train/p02`` for a curriculum phase (zero-padded: paths sort in phase order)."""
    return split if phase is None else f"{split}/p{phase:02d}"


def parquet_schema():
    import pyarrow as pa

    return pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string()), ("domain", pa.string()),
                      ("date", pa.string()), ("n_tokens", pa.int32())])


def return_freed_memory() -> bool:
    """Freed memory goes back to the system while a shard task runs; True if ARROW_DEFAULT_MEMORY_POOL was set here
    (the caller removes it at the end: later processes started from this one are not affected).

    * glibc malloc: blocks of 128 KiB and more are mmapped and unmapped when freed (M_MMAP_THRESHOLD fixed at its
      default; left alone, glibc raises it to the largest block freed so far, up to 32 MiB, and later batch
      buffers and row-group copies stay in its heap). Process-wide; a few mmap calls per batch.
    * Arrow's C++ default pool, which the Parquet writer's encoders take whatever pool pyarrow is given: malloc
      instead of mimalloc, which kept more of every row-group flush. Chosen by Arrow at its first allocation in the
      process: a shard worker's; an in-process run keeps whatever the process already uses. An explicit
      ARROW_DEFAULT_MEMORY_POOL wins.
    Measured on the shard worker path (bench_scaling's inputs, 2 tasks), peak anonymous RSS of a worker at 1x / 4x:
    104-109 / 147-150 MB without either, 83-86 / 117-121 MB with the threshold, 79 / 103 MB with both; in one
    process over 1x and 8x the 1x corpus, peak RSS 133 -> 173 MB with mimalloc, 130 -> 147 MB with malloc (no
    Parquet written at all: 130 -> 136 MB). No-op where there is no glibc mallopt. Called in shard workers only
    (``TokenShards.run``: not for an in-process run)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return False
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    return True


def string_array(values: list):
    """A ``pa.string()`` array of str or None values, built from its buffers (UTF-8 bytes joined, int32 offsets,
    a validity bitmap only if a value is None). ``pa.array`` on a Python list gives the same array but imports
    pandas on its first call: +34 MB anonymous RSS in a shard worker that needs none of it."""
    import numpy as np
    import pyarrow as pa

    raw = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"shard: {offsets[-1]} bytes of strings in one batch, over a pa.string() array's 2 GiB")
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.StringArray.from_buffers(len(raw), pa.py_buffer(offsets.astype("<i4")), pa.py_buffer(b"".join(raw)),
                                       bitmap, nulls)


def _reader():
    from datatrove.pipeline.readers import JsonlReader

    class GzipJsonl(JsonlReader):
        """datatrove's JsonlReader (same documents, stats and block name) that reads ``.jsonl.gz`` as bytes: 1 MB
        compressed chunks inflated by zlib, lines parsed by orjson without a text-mode decode. Measured on the
        12.5 MB bench corpus: 54 ms of CPU against 89 ms for gzip.open(..., "rt") line by line."""

        def read_file(self, filepath: str):
            import zlib

            import orjson
            from datatrove.utils.logging import logger

            if not filepath.endswith(".gz"):
                yield from super().read_file(filepath)
                return
            li, rest, size = 0, b"", 1 << 16  # the first chunk small: the first documents come out sooner
            z = zlib.decompressobj(31)
            with self.data_folder.open(filepath, "rb") as f:
                while chunk := f.read(size):
                    size = min(size * 4, 1 << 20)
                    buf = rest + z.decompress(chunk)
                    while z.eof and z.unused_data:  # a multi-member gzip file
                        tail, z = z.unused_data, zlib.decompressobj(31)
                        buf += z.decompress(tail)
                    *lines, rest = buf.split(b"\n")
                    for line in lines:
                        try:
                            doc = self.get_document_from_dict(orjson.loads(line), filepath, li)
                        except orjson.JSONDecodeError as e:
                            logger.warning(f"Error when reading `{filepath}`: {e}")
                            doc = None
                        li += 1
                        if doc:
                            yield doc
            if rest.strip():
                yield from filter(None, [self.get_document_from_dict(orjson.loads(rest), filepath, li)])

    return GzipJsonl


def _batches(data, size: int):
    """Lists of documents of about ``size`` characters; the first ones smaller (size/16, doubling) so that encoding
    starts after reading a few documents rather than a whole batch."""
    batch, chars, target = [], 0, max(1, size // 16)
    for doc in data:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= target:
            yield batch
            batch, chars, target = [], 0, min(size, target * 2)
    if batch:
        yield batch


def _block():
    from datatrove.pipeline.base import PipelineStep

    class TokenShards(PipelineStep):
        """Tokenizes documents and writes each task's token shards and Parquet per split; tags ``split``/``n_tokens``
        and passes the documents on."""

        name = "token shards"
        type = "🔢 - TOKENIZER"

        def __init__(self, tokenizer_uri: str, out_uri: str, cfg: Config, domains=None):
            import os

            super().__init__()
            self.tokenizer_uri, self.out_uri, self.cfg = tokenizer_uri, out_uri, cfg
            self.domains = domains  # the reweight Config: tokens are counted per domain under its key
            # the stage's own process: a task runs in it when the input is small, or with one worker (datatrove's
            # local executor runs every rank in the caller then), elsewhere in a worker process (local, Ray, Slurm)
            self.stage_pid = os.getpid()

        def run(self, data, rank: int = 0, world_size: int = 1):
            import os
            import shutil
            import tempfile
            from collections import deque
            from concurrent.futures import ThreadPoolExecutor

            import sentencepiece as spm

            from stages.core.storage import Storage

            out = Storage(self.out_uri)
            # workers give freed memory back (flat peak memory per worker); a task in the stage's process does not:
            # mallopt would change the calling process's allocator for good (its input is small, or one worker was
            # asked for), and the fixed mmap threshold costs time (bench corpus, 12.5 MB in process: +0.25 s system
            # CPU and ~125k more minor page faults per run, ~9% of the stage's CPU; wall 2.8-3.15 s against
            # 2.55-2.9 s, alternated on a loaded machine)
            pool_env = False if os.getpid() == self.stage_pid else return_freed_memory()
            tmp = tempfile.mkdtemp(prefix=f"kiln-shard-{rank:05d}-")
            threads = self.cfg.encode_threads or 1
            pool, files, done = None, {}, False
            try:
                # two sentencepiece calls in flight, each on its own batch with every encode thread (the GIL released,
                # ids returned as int32 arrays), consumed in order: while one call's threads finish its last long
                # documents the other call keeps the cores busy, and this thread reads and writes meanwhile.
                # Measured on the 12.5 MB bench corpus, 2 cores, the whole stage against raw encode time: 0.99x; with
                # one single-threaded call per core instead 0.97-0.98x (the last batch runs alone at the end)
                calls = 2
                pool = ThreadPoolExecutor(calls)  # shut down in finally, also when a downstream block raises
                # the tokenizer loads in a pool thread while this one reads the first documents
                model = pool.submit(lambda: spm.SentencePieceProcessor(
                    model_proto=Storage(self.tokenizer_uri).read_bytes("tokenizer.model")))
                encode = lambda b: model.result().encode([d.text for d in b], num_threads=threads,  # noqa: E731
                                                         return_type="numpy")
                inflight: deque = deque()
                for batch in _batches(data or (), self.cfg.encode_batch_kb * 1000):
                    inflight.append((batch, pool.submit(encode, batch)))
                    if len(inflight) > calls:
                        yield from self._write(files, *inflight.popleft(), model.result(), rank, out, tmp)
                while inflight:
                    yield from self._write(files, *inflight.popleft(), model.result(), rank, out, tmp)
                for f in files.values():
                    f.close()
                self.stat_update("bytes", value=sum(f.bytes for f in files.values()))
                done = True
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
                if not done:  # a failed task withdraws every file it wrote (complete or not)
                    for f in files.values():
                        f.abort()
                shutil.rmtree(tmp, ignore_errors=True)
                if pool_env:
                    os.environ.pop("ARROW_DEFAULT_MEMORY_POOL", None)

        def _write(self, files: dict, batch: list, pending, sp, rank: int, out, tmp: str):
            from collections import Counter

            from stages.reweight import domain_of

            with self.track_time(unit="batch"):
                ids = pending.result()
            counts: Counter = Counter()
            kept: dict[str, list] = {}  # shard folder (split, or split/phase) -> (document, ids)
            curriculum = self.cfg.order == "curriculum"
            for doc, seq in zip(batch, ids):
                n = int(seq.size)
                if not n:
                    counts["empty"] += 1
                    continue
                split = split_of(doc.id, self.cfg.val_fraction)
                phase = phase_of(doc.metadata, self.cfg) if curriculum and split == "train" else None
                kept.setdefault(shard_dir(split, phase), []).append((doc, seq))
                doc.metadata["split"], doc.metadata["n_tokens"] = split, n
                counts[f"docs_{split}"] += 1
                counts[f"tokens_{split}"] += n + 1  # + EOS
                if phase is not None:
                    counts[f"phase:{phase}:docs"] += 1
                    counts[f"phase:{phase}:tokens"] += n + 1
                    counts["unscored"] += not isinstance(doc.metadata.get(self.cfg.curriculum_key), (int, float))
                if self.domains is not None:
                    counts[f"tokens:{domain_of(doc.metadata, self.domains)}"] += n + 1
            for name, pairs in kept.items():
                if name not in files:
                    files[name] = _SplitFiles(name, rank, out, tmp, sp.get_piece_size(), sp.eos_id(), self.cfg)
                files[name].add(pairs)
            for key, n in counts.items():
                self.stat_update(key, value=n)
            for pairs in kept.values():
                for doc, _ in pairs:
                    yield doc

    return TokenShards


class _SplitFiles:
    """One task's files of one split: token shard + index, and Parquet (explicit schema, zstd, row groups of exactly
    ``parquet_rows_per_group`` documents but the last, content-defined chunking and page index as datatrove's
    ParquetWriter writes them). Local storage: written in place under temporary names (``*.tmp-<pid>``), renamed
    by ``close`` once complete; remote: in ``tmp``, uploaded at ``close`` (one PUT per object). A write error (a
    full disk: tests/test_faults.py) becomes a StageError naming the file, and ``abort`` removes what was written:
    no partial shard is ever under its final name, and a failed task leaves none of its files."""

    def __init__(self, name: str, rank: int, out, tmp: str, vocab: int, eos: int, cfg: Config):
        import pyarrow.parquet as pq

        from stages.core.tokens import TokenShardWriter

        self.out, self.rows = out, cfg.parquet_rows_per_group
        self.rels = {ext: f"tokens/{name}/{rank:05d}.{ext}" for ext in ("bin", "idx")}
        self.rels["parquet"] = f"parquet/{name}/{rank:05d}.parquet"
        self.closed, self.bytes, self.tokens, self.parquet, self.uploaded = False, 0, None, None, []
        if out.is_local:
            self.local = {k: out.url(rel) for k, rel in self.rels.items()}
            for path in self.local.values():
                os.makedirs(os.path.dirname(path), exist_ok=True)
        else:
            self.local = {k: os.path.join(tmp, rel.replace("/", "_")) for k, rel in self.rels.items()}
        self.parquet_tmp = f"{self.local['parquet']}.tmp-{os.getpid()}"
        try:
            self.tokens = self._io("bin", TokenShardWriter, self.local["bin"], self.local["idx"], vocab, eos)
            self.parquet = self._io("parquet", pq.ParquetWriter, self.parquet_tmp, parquet_schema(),
                                    compression="zstd", use_content_defined_chunking={
                                        "min_chunk_size": 256 * 1024, "max_chunk_size": 1024 * 1024, "norm_level": 0},
                                    write_page_index=True)
        except BaseException:
            self.abort()
            raise
        # rows not yet in a row group, as Arrow record batches (UTF-8, one per ``add``): a document's Python
        # strings are freed once it has passed downstream, and a row group is one exact-size copy at its flush
        self.pending: list = []
        self.n_pending = 0

    def _io(self, key: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; an OSError (ENOSPC, EFBIG, EIO ...) becomes a StageError naming the file."""
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise StageError(f"shard: cannot write {self.out.url(self.rels[key])}: {e}") from e

    def add(self, pairs: list) -> None:
        """Token ids and Parquet rows of (document, ids) pairs."""
        import numpy as np
        import pyarrow as pa

        self._io("bin", self.tokens.add_many, [seq for _, seq in pairs])
        md = [doc.metadata for doc, _ in pairs]
        opt = [[None if (v := m.get(key)) is None else str(v) for m in md] for key in ("url", "domain", "date")]
        arrays = [string_array(c) for c in ([doc.text for doc, _ in pairs], [doc.id for doc, _ in pairs], *opt)]
        n_tokens = np.fromiter((m["n_tokens"] for m in md), dtype="<i4", count=len(md))
        arrays.append(pa.Array.from_buffers(pa.int32(), len(md), [None, pa.py_buffer(n_tokens)]))
        self.pending.append(pa.RecordBatch.from_arrays(arrays, schema=parquet_schema()))
        self.n_pending += len(pairs)
        while self.n_pending >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        """The first ``n`` pending rows as one row group, written as one contiguous record batch as before (the
        rows were Python lists converted at the flush): the Parquet bytes do not depend on how rows arrived. The
        text column is copied batch by batch into one exact-size buffer, each pending batch dropped once copied:
        at the flush a row group's text is in memory once (+ one batch), not twice."""
        import numpy as np
        import pyarrow as pa

        take, need = [], n
        while need:
            b = self.pending[0]
            if b.num_rows <= need:
                take.append(self.pending.pop(0))
            else:  # the rest stays pending (a slice: the batch's buffers until the next flush)
                take.append(b.slice(0, need))
                self.pending[0] = b.slice(need)
            need -= take[-1].num_rows
        self.n_pending -= n
        others = [pa.concat_arrays([t.column(i) for t in take]) for i in range(1, take[0].num_columns)]
        texts = [t.column(0) for t in take]
        del take, b

        def offsets_of(a):  # int32 offsets of a (sliced) pa.string() array
            return np.frombuffer(a.buffers()[1], dtype="<i4", count=len(a) + 1, offset=4 * a.offset)

        size = sum(int(o[-1]) - int(o[0]) for o in map(offsets_of, texts))
        if size > np.iinfo(np.int32).max:
            raise StageError(f"shard: {size} bytes of text in one row group of {n} rows, over 2 GiB; "
                             "lower shard.parquet_rows_per_group")
        data, offsets, pos, row = bytearray(size), np.zeros(n + 1, dtype="<i4"), 0, 0
        while texts:
            a = texts.pop(0)
            off = offsets_of(a)
            s, e = int(off[0]), int(off[-1])
            data[pos:pos + e - s] = memoryview(a.buffers()[2])[s:e]
            offsets[row + 1:row + len(a) + 1] = off[1:] - s + pos
            pos, row = pos + e - s, row + len(a)
            del a, off
        text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
        batch = pa.RecordBatch.from_arrays([text, *others], schema=parquet_schema())
        self._io("parquet", self.parquet.write_batch, batch, row_group_size=n)
        self.bytes += size  # UTF-8 bytes of the texts

    def close(self) -> None:
        if self.n_pending:
            self._flush(self.n_pending)
        self._io("parquet", self.parquet.close)
        self._io("parquet", os.replace, self.parquet_tmp, self.local["parquet"])
        self._io("bin", self.tokens.close)
        self.closed = True
        if not self.out.is_local:
            for k, rel in self.rels.items():
                self.uploaded.append(rel)
                self._io(k, self.out.put_file, self.local[k], rel)

    def abort(self) -> None:
        """Remove this split's files, temporary and complete (local, or uploaded), when its task failed."""
        if self.tokens is not None:
            self.tokens.abort()
        if self.parquet is not None:
            with contextlib.suppress(Exception):
                self.parquet.close()
        for path in (self.parquet_tmp, *self.local.values()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        for rel in self.uploaded:
            with contextlib.suppress(Exception):
                self.out.rm(rel)


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import block_stats, check_upstream_read, run_pipeline
    from stages.core.tokens import TokenShard

    if "tokenizer.model" not in ctx.input_files("tokenizer"):
        raise StageError(f"shard: the tokenizer manifest in {ctx.input('tokenizer').url()} lists no tokenizer.model")
    size = sum(o["bytes"] for o in ctx.inputs["reweight"]["outputs"] if o["path"].startswith("data/"))
    cores = len(os.sched_getaffinity(0))
    small = size < cfg.inprocess_below_mb * 1e6
    tasks, workers = (1, 1) if small else (ctx.cfg.run.tasks, ctx.cfg.run.workers)
    threads = cfg.encode_threads or max(1, cores // min(workers, tasks))
    # reweight's data/ files, as stages.core.pipeline.upstream_reader lists them, read by the bytes reader
    paths_file = os.path.join(ctx.workdir, "reweight-inputs.txt")
    with open(paths_file, "w") as f:
        f.writelines(p[len("data/"):] + "\n" for p in ctx.input_files("reweight", prefix="data/", suffix=".jsonl.gz"))
    steps = [
        _reader()(ctx.input("reweight").datafolder("data"), paths_file=paths_file, add_file_path=False),
        _block()(ctx.input("tokenizer").url(), ctx.out.url(), cfg.model_copy(update={"encode_threads": threads}),
                 ctx.cfg.reweight),
    ]
    try:
        stats = run_pipeline(ctx, steps, name="shard", tasks=tasks, workers=workers, in_process=small)
    except BaseException:  # a failed task removed its own files; the tasks that finished remove theirs here
        for rel in ("tokens", "parquet"):
            with contextlib.suppress(Exception):
                ctx.out.rm(rel)
        raise
    tok = block_stats(stats, "token shards")
    n = {k.replace("validation", "val"): int(tok.get(k, 0))
         for k in ("docs_train", "docs_validation", "tokens_train", "tokens_validation", "empty")}
    out = {"documents": n["docs_train"] + n["docs_val"], "bytes": int(tok.get("bytes", 0))}
    docs_in = int(block_stats(stats, "🐿 Jsonl").get("documents", 0))
    check_upstream_read(ctx, "reweight", docs_in)
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
            if cfg.order == "curriculum" and split == "train":
                index[split][-1]["phase"] = int(rel.split("/")[2][1:])  # tokens/train/pNN/rank.bin
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
    if cfg.order == "curriculum":  # the data order is lineage too: phases of train documents, lowest score first
        edges = [None, *cfg.curriculum_edges, None]
        mixture["order"] = {
            "mode": "curriculum", "key": cfg.curriculum_key, "edges": cfg.curriculum_edges,
            "unscored_docs": int(tok.get("unscored", 0)),  # in phase 0
            "phases": [{"phase": k, "from": edges[k], "below": edges[k + 1],
                        "docs": int(tok.get(f"phase:{k}:docs", 0)), "tokens": int(tok.get(f"phase:{k}:tokens", 0))}
                       for k in range(len(cfg.curriculum_edges) + 1)]}
    else:
        mixture["order"] = {"mode": "shuffled"}
    ctx.out.write_json("mixture.json", mixture)
    metrics["mixture"] = {d: v["share"] for d, v in mixture["domains"].items()}
    metrics["max_share_error_tokens"] = mixture["max_share_error_tokens"]
    outputs = ["index.json", "mixture.json", *ctx.out.list("tokens"), *ctx.out.list("parquet", suffix=".parquet")]
    return StageResult(outputs=outputs, counts=counts, metrics=metrics)
