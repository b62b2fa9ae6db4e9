"""shard: token shards and Parquet from real text; they agree, decode back, and the split is stable."""

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from conftest import ROOT, load_tiny, seed_files
from test_reweight import mixed_docs, seed_split

from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.core.tokens import TokenShard
from stages.reweight import base_id
from stages.shard import parquet_schema, split_of

# two tasks one after the other (shard.inprocess_below_mb 0: the in-process single task only where a test says)
FAST = {"run.tasks": 2, "run.workers": 1, "tokenizer.vocab_size": 2048, "shard.inprocess_below_mb": 0}


def with_copies(docs: list[dict]) -> list[dict]:
    """Reweight-like output: every 4th document also appears as copies #r1 and #r2."""
    out = []
    for i, d in enumerate(docs):
        out.append(d)
        if i % 4 == 0:
            out += [{**d, "id": f"{d['id']}#r{k}"} for k in (1, 2)]
    return out


def build(root: str, run: str, docs: list[dict], cfg) -> dict:
    seed_split(root, run, "reweight", docs)
    run_stage("tokenizer", cfg, root, run)
    return run_stage("shard", cfg, root, run)


def read_split(st: Storage) -> dict[str, str]:
    """id -> split, from the Parquet shards."""
    out = {}
    for rel in st.list("parquet", suffix=".parquet"):
        for i in pq.read_table(io.BytesIO(st.read_bytes(rel)), columns=["id"]).column("id").to_pylist():
            out[i] = rel.split("/")[1]
    return out


def test_token_shards_decode_to_parquet_rows(tmp_path):
    root, docs = str(tmp_path), with_copies(mixed_docs(120, 120, 30))
    cfg = load_tiny(tmp_path, {**FAST, "shard.parquet_rows_per_group": 16, "shard.val_fraction": 0.1})
    m = build(root, "a", docs, cfg)
    st = Storage(root).sub("a", "shard")
    sp = spm.SentencePieceProcessor(model_proto=Storage(root).sub("a", "tokenizer").read_bytes("tokenizer.model"))
    c = m["counts"]
    assert c["documents_in"] == c["documents_out"] == len(docs) == c["docs_train"] + c["docs_val"]
    assert c["docs_val"] > 0.05 * len(docs) and c["removed"] == {"empty": 0}
    index = st.read_json("index.json")
    assert [e["path"] for e in index["train"]] == ["tokens/train/00000.bin", "tokens/train/00001.bin"]

    seen, tokens = 0, {"train": 0, "validation": 0}
    for split in ("train", "validation"):
        for entry in index[split]:
            shard = TokenShard(st, entry["path"])
            h = shard.header
            assert (h["dtype"], h["vocab_size"], h["eos_id"]) == (np.dtype("<u2"), 2048, 2)
            off, toks = shard.doc_offsets(), shard.read_all()
            assert off[0] == 0 and off[-1] == h["n_tokens"] == len(toks) and len(off) == h["n_docs"] + 1
            # plain pyarrow reads the matching Parquet shard, with the declared schema, zstd, small row groups
            local = tmp_path / "a" / "shard" / entry["path"].replace("tokens", "parquet").replace(".bin", ".parquet")
            pf = pq.ParquetFile(local)
            table = pf.read()
            assert table.schema.equals(parquet_schema())
            assert pf.metadata.num_row_groups == math.ceil(table.num_rows / 16) > 1
            assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
            assert table.num_rows == h["n_docs"]
            for i, row in enumerate(table.to_pylist()):
                doc = toks[off[i]:off[i + 1]]
                assert doc[-1] == 2 and 2 not in doc[:-1]  # one EOS, at the end
                assert row["n_tokens"] == len(doc) - 1
                assert sp.decode(doc[:-1].tolist()) == row["text"]
                assert row["domain"] in {"news", "shakespeare", "wikitext"} and row["url"].startswith("http")
            seen += table.num_rows
            tokens[split] += h["n_tokens"]
    assert seen == len(docs)
    assert (tokens["train"], tokens["validation"]) == (c["tokens_train"], c["tokens_val"])
    assert c["tokens_out"] == sum(tokens.values())

    # copies of one document land on the same side as the original
    split = read_split(st)
    assert all(split[i] == split[base_id(i)] for i in split if "#r" in i)
    # a window read by byte range equals the same slice of the whole shard
    shard = TokenShard(st, "tokens/train/00001.bin")
    assert np.array_equal(shard.read(123, 77), shard.read_all()[123:200])
    with pytest.raises(IndexError):
        shard.read(shard.n_tokens - 5, 10)


def test_split_is_stable_when_the_input_grows(tmp_path):
    root = str(tmp_path)
    cfg = load_tiny(tmp_path, {**FAST, "run.seed": 7})
    big = mixed_docs(181, 200, 60)
    small = [d for i, d in enumerate(big) if i % 11]  # the rebuild has 10% more documents (400 -> 441)
    assert len(small) == 400 and len(big) == 441
    build(root, "small", small, cfg)
    m = build(root, "big", big, cfg)
    a, b = read_split(Storage(root).sub("small", "shard")), read_split(Storage(root).sub("big", "shard"))
    assert set(a) < set(b) and len(a) == 400
    assert {i: b[i] for i in a} == a  # no document switched sides
    assert {i: split_of(i, 0.05) for i in a} == a  # the split ignores the run seed
    assert m["counts"]["docs_val"] > sum(s == "validation" for s in a.values()) > 0
    assert 0.02 < m["metrics"]["val_share_docs"] < 0.09
    # the ratio is a config choice: a larger one only moves documents from train to validation
    for frac in (0.2, 0.5):
        val = {i for i in b if split_of(i, frac) == "validation"}
        assert {i for i in b if b[i] == "validation"} <= val and abs(len(val) / len(b) - frac) < 0.06


def test_empty_validation_split(tmp_path):
    root, docs = str(tmp_path), mixed_docs(30, 30, 0)
    with pytest.raises(StageError, match=r"^shard: the validation split is empty: none of 60 documents"):
        build(root, "e", docs, load_tiny(tmp_path, {**FAST, "shard.val_fraction": 1e-6}))
    m = run_stage("shard", load_tiny(tmp_path, {**FAST, "shard.val_fraction": 0}), root, "e")
    st = Storage(root).sub("e", "shard")
    assert m["counts"]["docs_val"] == 0 and st.read_json("index.json")["validation"] == []
    assert not st.list("tokens/validation") and not st.list("parquet/validation")


def test_missing_tokenizer_model_fails_clearly(tmp_path):
    root = str(tmp_path)
    seed_split(root, "m", "reweight", mixed_docs(10, 10, 0))
    seed_files(root, "m", "tokenizer", {"stats.json": b"{}"})
    with pytest.raises(StageError, match=r"^shard: the tokenizer manifest in .*/m/tokenizer lists no tokenizer.model$"):
        run_stage("shard", load_tiny(tmp_path, FAST), root, "m")


def test_shard_on_s3_with_parallel_workers(s3_bucket, tmp_path):
    root, docs = s3_bucket + "/runs", with_copies(mixed_docs(40, 40, 10))
    m = build(root, "s3", docs, load_tiny(tmp_path, {**FAST, "run.workers": 2, "shard.inprocess_below_mb": 0}))
    st = Storage(root).sub("s3", "shard")
    assert m["counts"]["documents_out"] == len(docs) and m["location"].startswith("s3://")
    listed = {o["path"] for o in m["outputs"]}
    assert {"tokens/validation/00000.idx", "parquet/train/00001.parquet"} <= listed
    shard = TokenShard(st, "tokens/train/00000.bin")
    off = shard.doc_offsets()
    window = shard.read(int(off[1]), int(off[2] - off[1]))
    sp = spm.SentencePieceProcessor(model_proto=Storage(root).sub("s3", "tokenizer").read_bytes("tokenizer.model"))
    row = pq.read_table(io.BytesIO(st.read_bytes("parquet/train/00000.parquet"))).slice(1, 1).to_pylist()[0]
    assert window[-1] == 2 and sp.decode(window[:-1].tolist()) == row["text"]
    val = pq.read_schema(io.BytesIO(st.read_bytes("parquet/validation/00000.parquet")))
    assert val.equals(parquet_schema()) and pa.types.is_int32(val.field("n_tokens").type)


def test_mixture_in_real_tokens_and_byte_identical_rebuild(tmp_path):
    """filter -> reweight -> tokenizer -> shard on real text of three domains: shard's mixture.json holds the
    real tokens per domain beside reweight's targets (the lineage train logs), and a second run on the same
    input writes byte-identical shards (sha256 in the manifests)."""
    from test_reweight import seed_split as seed_filter

    root = str(tmp_path)
    # the tiny profile's path for small inputs: one task in this process, encoding with every core
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": {"wikitext": 2.0, "news": 0.5}, "shard.inprocess_below_mb": 16})
    manifests = []
    for run in ("a", "b"):
        seed_filter(root, run, "filter", mixed_docs())
        for stage in ("reweight", "tokenizer", "shard"):
            m = run_stage(stage, cfg, root, run)
        manifests.append(m)
    sums = [{o["path"]: o["sha256"] for o in m["outputs"]} for m in manifests]
    assert sums[0] == sums[1] and [p for p in sums[0] if p.startswith("tokens/train/")] == \
        ["tokens/train/00000.bin", "tokens/train/00000.idx"]
    mix = Storage(root).sub("a", "shard").read_json("mixture.json")
    assert set(mix["domains"]) == {"news", "shakespeare", "wikitext"} and mix["key"] == "domain"
    assert sum(v["tokens"] for v in mix["domains"].values()) == mix["tokens"] == manifests[0]["counts"]["tokens_out"]
    target = Storage(root).sub("a", "reweight").read_json("mixture.json")
    for d, v in mix["domains"].items():
        assert v["share_target"] == target["domains"][d]["share_target"] and v["epochs"] == target["domains"][d]["epochs"]
    # real tokens per domain follow the byte-estimated target within 1% (measured 0.75 points here; bytes per
    # token differs a little by domain)
    assert mix["max_share_error_tokens"] < 0.01


def test_parquet_shards_load_with_hugging_face_datasets(tmp_path, monkeypatch):
    """Users read the Parquet shards without Kiln: `datasets` (offline, local files) sees every row."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    root, docs = str(tmp_path), mixed_docs(30, 30, 6)
    m = build(root, "d", docs, load_tiny(tmp_path, FAST))
    files = sorted(str(p) for p in (tmp_path / "d" / "shard" / "parquet" / "train").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == m["counts"]["docs_train"] and ds.column_names == ["text", "id", "url", "domain", "date", "n_tokens"]
    assert sum(ds["n_tokens"]) + len(ds) == m["counts"]["tokens_train"]  # + one EOS per document


def test_parquet_shards_query_with_duckdb(tmp_path):
    """DuckDB reads the Parquet shards by glob, without Kiln: rows, token counts and texts equal the manifest's and
    the token shards' (decoded)."""
    import duckdb

    root, docs = str(tmp_path), mixed_docs(30, 30, 6)
    m = build(root, "q", docs, load_tiny(tmp_path, FAST))
    glob = str(tmp_path / "q" / "shard" / "parquet" / "*" / "*.parquet")
    con = duckdb.connect()
    rows = con.execute(f"SELECT count(*), sum(n_tokens), count(DISTINCT id) FROM read_parquet('{glob}')").fetchone()
    assert rows == (len(docs), m["counts"]["tokens_out"] - len(docs), len(docs))
    by_domain = dict(con.execute(f"SELECT domain, count(*) FROM read_parquet('{glob}') GROUP BY domain").fetchall())
    assert by_domain == {d: sum(x["metadata"]["domain"] == d for x in docs) for d in by_domain}
    assert sum(by_domain.values()) == len(docs)
    st = Storage(root).sub("q", "shard")
    sp = spm.SentencePieceProcessor(model_proto=Storage(root).sub("q", "tokenizer").read_bytes("tokenizer.model"))
    shard = TokenShard(st, "tokens/train/00000.bin")
    off = shard.doc_offsets()
    first_file = tmp_path / "q" / "shard" / "parquet" / "train" / "00000.parquet"
    first = con.execute(f"SELECT text FROM read_parquet('{first_file}') LIMIT 1").fetchone()[0]
    assert sp.decode(shard.read(0, int(off[1]) - 1).tolist()) == first


def scored_docs() -> tuple[list[dict], dict[str, float]]:
    """Real documents with copies, each with a metadata.quality_score from a stable hash of its base id (the
    ordering is under test, not a scorer); the 4th document has no score (curriculum phase 0)."""
    from stages.reweight import stable_unit

    docs, score = with_copies(mixed_docs(60, 60, 20)), {}
    for d in docs:
        score[d["id"]] = round(stable_unit("q", base_id(d["id"])), 4)
        d["metadata"] = {**d["metadata"], "quality_score": score[d["id"]]}
    docs[3]["metadata"].pop("quality_score")
    return docs, score


def test_curriculum_phases_and_sampler_order(tmp_path):
    """shard.order curriculum: train documents go to phase shards by metadata.quality_score (a stable hash of the
    id here: the ordering is under test, not a scorer), recorded in index.json and mixture.json; the train
    sampler given the phases serves the lower phases in the first half of an epoch, shuffled within a phase."""
    from stages.core.tokens import TokenShard as Shard
    from stages.train.data import BatchSampler, WindowDataset, open_shards

    root, (docs, score) = str(tmp_path), scored_docs()
    edges = [0.25, 0.5, 0.75]
    cfg = load_tiny(tmp_path, {**FAST, "shard.order": "curriculum", "shard.curriculum_edges": edges})
    m = build(root, "c", docs, cfg)
    st = Storage(root).sub("c", "shard")
    index = st.read_json("index.json")
    phases = [e["phase"] for e in index["train"]]
    want = [f"tokens/train/p{p:02d}/{r:05d}.bin" for p in range(4) for r in (0, 1)]
    assert [e["path"] for e in index["train"]] == want
    assert phases == sorted(phases) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all("phase" not in e and e["path"].count("/") == 2 for e in index["validation"])
    # every train document sits in the phase of its score, its Parquet row beside its tokens
    for e in index["train"]:
        rel = e["path"].replace("tokens", "parquet").replace(".bin", ".parquet")
        table = pq.read_table(io.BytesIO(st.read_bytes(rel)))
        assert table.num_rows == e["n_docs"] == Shard(st, e["path"]).header["n_docs"]
        lo, hi = ([-1.0, *edges, 2.0][e["phase"]], [-1.0, *edges, 2.0][e["phase"] + 1])
        for i in table.column("id").to_pylist():
            assert lo <= score[i] < hi or (i == docs[3]["id"] and e["phase"] == 0)
    order = st.read_json("mixture.json")["order"]
    assert order["mode"] == "curriculum" and order["unscored_docs"] == 1 and order["edges"] == edges
    assert sum(p["docs"] for p in order["phases"]) == m["counts"]["docs_train"]
    assert sum(p["tokens"] for p in order["phases"]) == m["counts"]["tokens_train"]

    shards = open_shards(st, [e["path"] for e in index["train"]])
    ds = WindowDataset(shards, 33)
    assert len(ds.phases) == 4 and sum(ds.phases) == len(ds) and min(ds.phases) > 8
    sampler = BatchSampler(len(ds), 8, seed=3, phases=ds.phases)
    again = BatchSampler(len(ds), 8, seed=3, phases=ds.phases)
    steps = sampler.per_epoch
    seen = np.concatenate([sampler.global_batch(s) for s in range(steps)])
    assert np.array_equal(again.global_batch(steps - 1), sampler.global_batch(steps - 1))  # a pure function of the step
    ph = ds.phase(seen)
    assert np.all(np.diff(ph) >= 0)  # phases in order through the epoch ...
    first, second = ph[: len(ph) // 2], ph[len(ph) // 2:]
    assert first.max() <= second.min() and first.mean() < 1.5 < second.mean()
    assert not np.all(np.diff(seen[ph == 1]) > 0)  # ... shuffled within a phase
    # the next epoch starts again from the lowest phase, in another order
    nxt = sampler.global_batch(steps)
    assert ds.phase(nxt).max() == 0 and not np.array_equal(nxt, seen[:8])
    # without phases: one permutation of all windows per epoch, as before
    plain = BatchSampler(len(ds), 8, seed=3)
    assert np.array_equal(plain.global_batch(0), np.random.default_rng([3, 0]).permutation(len(ds))[:8])
    assert np.array_equal(BatchSampler(len(ds), 8, seed=3, phases=[len(ds)]).global_batch(5), plain.global_batch(5))
    assert set(ds.phase(plain.global_batch(0))) != {0}


def test_reader_takes_multi_member_gzip_and_skips_a_bad_line(tmp_path):
    """The bytes reader: a data file of two gzip members (as `cat a.gz b.gz` makes) is read whole, in the
    in-process path; a line that is not JSON is skipped like datatrove's JsonlReader skips it."""
    import gzip
    import json

    from conftest import seed_stage

    root, docs = str(tmp_path), mixed_docs(20, 20, 5)
    first = "".join(json.dumps(d) + "\n" for d in docs[:20]).encode()
    second = ("{not json\n" + "".join(json.dumps(d) + "\n" for d in docs[20:])).encode()
    seed_stage(root, "g", "reweight", [], extra_files={"data/00000.jsonl.gz": gzip.compress(first, mtime=0) +
                                                       gzip.compress(second, mtime=0)})
    cfg = load_tiny(tmp_path, {**FAST, "shard.inprocess_below_mb": 16})
    run_stage("tokenizer", cfg, root, "g")
    m = run_stage("shard", cfg, root, "g")
    assert m["counts"]["documents_in"] == m["counts"]["documents_out"] == len(docs)
    assert sorted(read_split(Storage(root).sub("g", "shard"))) == sorted(d["id"] for d in docs)


def test_parquet_and_token_bytes_do_not_depend_on_encode_batches(tmp_path):
    """Pending Parquet rows are held per encode batch and a row group is assembled from them at its flush (the
    worker streams: memory bounded by parquet_rows_per_group, not by the task). 2 KB batches (row groups of 16
    rows span many batches, batches split between row groups) and 4 MB batches (one per task) write the same
    bytes; rows come back with their text, id, url (None where a document has none) and token count."""
    import hashlib

    docs = with_copies(mixed_docs(60, 60, 15))
    for i, d in enumerate(docs):
        if i % 5 == 0:  # documents without url: a validity bitmap in some batches, not in others
            d["metadata"] = {k: v for k, v in d["metadata"].items() if k != "url"}
    root = str(tmp_path)
    seed_split(root, "a", "reweight", docs)
    st = Storage(root).sub("a", "shard")
    digests = []
    for kb in (2, 4000):
        cfg = load_tiny(tmp_path, {**FAST, "shard.parquet_rows_per_group": 16, "shard.encode_batch_kb": kb})
        if not digests:
            run_stage("tokenizer", cfg, root, "a")
        run_stage("shard", cfg, root, "a", force=True)
        digests.append({rel: hashlib.sha256(st.read_bytes(rel)).hexdigest()
                        for rel in (*st.list("tokens"), *st.list("parquet", suffix=".parquet"))})
    assert len(digests[0]) == 12 and digests[0] == digests[1]  # (bin, idx, parquet) x (train, val) x 2 tasks

    by_id = {d["id"]: d for d in docs}
    rows = 0
    for rel in st.list("parquet", suffix=".parquet"):
        pf = pq.ParquetFile(io.BytesIO(st.read_bytes(rel)))
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16
        shard = TokenShard(st, rel.replace("parquet", "tokens", 1).replace(".parquet", ".bin"))
        lengths = np.diff(shard.doc_offsets())
        for row, n in zip(pf.read().to_pylist(), lengths, strict=True):
            d = by_id[row["id"]]
            assert row["text"] == d["text"] and row["url"] == d["metadata"].get("url") and row["date"] is None
            assert row["n_tokens"] == n - 1  # EOS
            rows += 1
    assert rows == len(docs)


def test_string_array_is_pa_array_without_pandas():
    """string_array builds the same pa.string() array as pa.array (non-ASCII, empty strings, None), from buffers."""
    from stages.shard import string_array

    for values in (["a", "bé", None, "", None, "日本語 🙂" * 3], [], [None, None], ["ü"] * 9):
        a = string_array(values)
        a.validate(full=True)
        assert a.equals(pa.array(values, pa.string())) and a.null_count == values.count(None)
    # the point of it: pa.array on Python strings imports pandas (+34 MB per shard worker), string_array does not
    import subprocess
    import sys

    probe = ("import sys, pyarrow as pa; from stages.shard import string_array; string_array(['a', None]);"
             " print('pandas' in sys.modules); pa.array(['a', None]); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["False", "True"], out  # the control: pa.array does import it here


def test_token_writer_offsets_across_add_and_add_many(tmp_path):
    """The index's n+1 offsets come from per-batch int64 arrays (8 bytes a document), in call order."""
    from stages.core.tokens import TokenShardWriter

    w = TokenShardWriter(str(tmp_path / "s.bin"), str(tmp_path / "s.idx"), vocab_size=300, eos_id=1)
    seqs = [np.array([5, 6, 7], np.int32), np.array([], np.int32), np.array([299], np.int32)]
    w.add([9, 9])
    w.add_many(seqs)
    w.add_many([])
    w.add([4])
    assert w.close() == {"tokens": 3 + 4 + 1 + 2 + 2, "documents": 5}
    shard = TokenShard(Storage(str(tmp_path)), "s.bin")
    assert shard.doc_offsets().tolist() == [0, 3, 7, 8, 10, 12]
    assert shard.read_all().tolist() == [9, 9, 1, 5, 6, 7, 1, 1, 299, 1, 4, 1]


def test_train_stage_consumes_curriculum_phases_in_order_and_logs_the_mixture(tmp_path, caplog):
    """What a train run with shard.order curriculum feeds its ranks, without starting torchrun: the train stage's
    own checks and spec (stages.train._check_inputs, _spec: the shard list handed to torchrun), then what every
    rank builds from that spec (stages.train.data.training_data; the worker's dataset and sampler). Over a whole
    epoch of 2 ranks x 2 micro-batches the tokens consumed are the shards' own, phase after phase (phases from
    index.json, as the shard stage wrote them); the data mixture the stage logs is shard's mixture.json."""
    import logging

    import stages.train as train
    from stages.core.runner import StageContext, load_inputs
    from stages.train.data import micro_batches, training_data

    root, (docs, _) = str(tmp_path), scored_docs()
    world, micro, T = 2, 2, 32
    cfg = load_tiny(tmp_path, {**FAST, "shard.order": "curriculum", "shard.curriculum_edges": [0.25, 0.5, 0.75],
                               "train.model.seq_len": T, "train.global_batch": 8, "train.micro_batch": micro,
                               "train.nproc": world, "train.peak_flops": 1e12})
    build(root, "t", docs, cfg)
    run = Storage(root).sub("t")
    ctx = StageContext("train", "t", cfg, run, run.sub("train"), load_inputs(run, "train"), str(tmp_path / "w"))
    tok, shards = train._check_inputs(cfg.train, ctx)
    spec = train._spec(cfg.train, ctx, tok, shards)
    index = run.sub("shard").read_json("index.json")["train"]
    assert spec["train_shards"] == [e["path"] for e in index]
    with caplog.at_level(logging.INFO, logger="kiln.train"):
        mix = train._mixture(ctx)
    shard_mix = run.sub("shard").read_json("mixture.json")
    assert mix["shares"] == {d: v["share"] for d, v in shard_mix["domains"].items()} and mix["tokens"] > 0
    assert mix["reweight_mixture_sha256"] == shard_mix["reweight_mixture_sha256"]
    assert "data mixture by domain" in caplog.text and "shakespeare" in caplog.text

    ds, sampler = training_data(spec)
    st = run.sub("shard")
    tokens = [TokenShard(st, e["path"]).read_all() for e in index]  # read here, independently of the dataset
    per_shard = [len(t) // (T + 1) for t in tokens]
    first = np.concatenate([[0], np.cumsum(per_shard)])
    consumed = []  # phase of every sequence in the order the ranks train on them
    for step in range(sampler.per_epoch):
        for rank in range(world):
            idx = sampler.rank_batch(step, rank, world)
            for j, (x, y) in enumerate(micro_batches(ds, idx, micro)):
                for row_x, row_y, i in zip(x.numpy(), y.numpy(), idx[j * micro:(j + 1) * micro]):
                    s = int(np.searchsorted(first, i, side="right")) - 1
                    want = tokens[s][(i - first[s]) * (T + 1):(i - first[s] + 1) * (T + 1)]
                    assert np.array_equal(row_x, want[:-1]) and np.array_equal(row_y, want[1:])
                    consumed.append(index[s]["phase"])
    assert len(consumed) == sampler.per_epoch * 8 and sorted(set(consumed)) == [0, 1, 2, 3]
    assert consumed == sorted(consumed)  # phase 0 first, phase 3 last, never back
    # the next epoch starts again from phase 0
    assert {index[int(np.searchsorted(first, i, side="right")) - 1]["phase"]
            for i in sampler.rank_batch(sampler.per_epoch, 0, world)} == {0}


def test_truncated_shard_on_disk_is_caught_by_its_checksum(tmp_path):
    """A token shard cut short on disk (os.truncate: the file itself, not a copy): the train stage refuses it before
    starting torchrun, by the sha256 the shard manifest lists, with one line naming the file and saying it is
    truncated; without checksums the size checks catch it too; a cut document index likewise."""
    import os

    from stages.train.data import ShardError, open_shards

    root = str(tmp_path)
    cfg = load_tiny(tmp_path, {**FAST, "train.global_batch": 8, "train.micro_batch": 2, "train.peak_flops": 1e12,
                               "train.model.seq_len": 32})
    m = build(root, "x", mixed_docs(40, 40, 10), cfg)
    st = Storage(root).sub("x", "shard")
    sums = {o["path"]: o["sha256"] for o in m["outputs"]}
    rels = [p for p in sums if p.startswith("tokens/train/") and p.endswith(".bin")]
    assert len(open_shards(st, rels, 2048, sums)) == 2  # intact: accepted
    path = tmp_path / "x" / "shard" / "tokens" / "train" / "00001.bin"
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    with pytest.raises(StageError) as e:
        run_stage("train", cfg, root, "x")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train: {st.url('tokens/train/00001.bin')}: sha256 differs")
    assert f"truncated: {size - 1000} bytes, its header says {size}" in msg
    with pytest.raises(ShardError, match=rf"00001\.bin: size {size - 1000} bytes, header says {size} \(truncated"):
        open_shards(st, rels, 2048)  # train.verify_shards false, and the evaluate stage
    os.truncate(path, size - 1)  # half a token short
    with pytest.raises(ShardError, match=r"sha256 differs .*truncated"):
        open_shards(st, rels, 2048, sums)
    path.write_bytes(b"")  # nothing left: not even a header
    with pytest.raises(ShardError, match=r"00001\.bin: sha256 differs .*\(corrupt or changed"):
        open_shards(st, rels, 2048, sums)
    with pytest.raises(ShardError, match=r"00001\.bin: unreadable token shard"):
        open_shards(st, rels, 2048)

    m = build(root, "y", mixed_docs(40, 40, 10), cfg)
    st = Storage(root).sub("y", "shard")
    idx = tmp_path / "y" / "shard" / "tokens" / "train" / "00000.idx"
    os.truncate(idx, idx.stat().st_size - 8)  # the last offset gone
    with pytest.raises(ShardError, match=r"00000\.idx: sha256 differs"):
        open_shards(st, rels, 2048, {o["path"]: o["sha256"] for o in m["outputs"]})
    with pytest.raises(ShardError, match=r"00000\.idx: not the document index of \d+ documents .*truncated"):
        open_shards(st, rels, 2048)


def test_uint32_tokens_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    """Vocabularies over 65,536 ids get 4-byte tokens: header, file size, ids above 65,535 intact through the shard
    reader and the training reader; the writer refuses an id outside the vocabulary."""
    from stages.core.tokens import TokenShardWriter, dtype_for_vocab
    from stages.train.data import WindowDataset, open_shards

    assert dtype_for_vocab(65536) == np.dtype("<u2") and dtype_for_vocab(65537) == np.dtype("<u4")
    # real token sequences (a trained tokenizer's ids on Tiny Shakespeare) spread over a 100k vocabulary
    cfg = load_tiny(tmp_path, FAST)
    build(str(tmp_path), "v", mixed_docs(20, 20, 0), cfg)
    sp = spm.SentencePieceProcessor(
        model_proto=Storage(str(tmp_path)).sub("v", "tokenizer").read_bytes("tokenizer.model"))
    texts = [d["text"] for d in mixed_docs(0, 12, 0)]
    seqs = [np.asarray(ids, dtype=np.int64) * 48 + 7 for ids in sp.encode(texts)]  # ids up to 2047*48+7 = 98,263
    assert max(int(s.max()) for s in seqs) > 65535
    w = TokenShardWriter(str(tmp_path / "big.bin"), str(tmp_path / "big.idx"), vocab_size=100_000, eos_id=99_999)
    w.add_many(seqs[:-1])
    w.add(seqs[-1].tolist())
    n = w.close()["tokens"]
    raw = (tmp_path / "big.bin").read_bytes()
    assert len(raw) == 64 + 4 * n and raw[12:16] == (4).to_bytes(4, "little")
    st = Storage(str(tmp_path))
    shard = TokenShard(st, "big.bin")
    assert shard.header["dtype"] == np.dtype("<u4") and shard.header["vocab_size"] == 100_000
    for i in (0, 5, len(seqs) - 1):
        assert shard.document(i).tolist() == seqs[i].tolist() + [99_999]
    ds = WindowDataset(open_shards(st, ["big.bin"], 100_000), 65)
    assert np.array_equal(ds[3], np.concatenate([np.append(s, 99_999) for s in seqs])[3 * 65:4 * 65])
    bad = TokenShardWriter(str(tmp_path / "bad.bin"), str(tmp_path / "bad.idx"), vocab_size=100_000, eos_id=2)
    with pytest.raises(ValueError, match="out of range"):
        bad.add([100_000])
    bad.abort()


def test_readme_documents_the_binary_format_the_code_writes(tmp_path):
    """The README's table of the token-shard header (offset, size, field) is checked against the bytes the writer
    puts at each offset, and its .idx description against the index file."""
    import re

    from conftest import ROOT

    from stages.core.tokens import TokenShardWriter, dtype_for_vocab

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("<!-- tokens-format -->"):]
    section = section[:section.index("\n## ")]
    rows = [(int(o), s.strip(), f.strip()) for o, s, f in re.findall(r"^\| (\d+) \| (\d+|…) \| (.+?) \|$", section, re.M)]
    w = TokenShardWriter(str(tmp_path / "s.bin"), str(tmp_path / "s.idx"), vocab_size=4096, eos_id=2)
    w.add([10, 11, 12])
    w.add([13])
    w.close()
    raw, idx = (tmp_path / "s.bin").read_bytes(), (tmp_path / "s.idx").read_bytes()
    want = {"magic": b"KILNTOK\0", "version": 1, "bytes per token": 2, "number of tokens": 6,
            "number of documents": 2, "vocabulary size": 4096, "EOS id": 2, "reserved": 0}
    seen, end = set(), 0
    for off, size, field in rows:
        assert off == end, f"README table: field at {off} does not follow the previous one (ends at {end})"
        if size == "…":
            assert "tokens" in field and "EOS" in field
            assert np.frombuffer(raw[off:], "<u2").tolist() == [10, 11, 12, 2, 13, 2]
            break
        key = next(k for k in want if field.startswith(k) or field.lower().startswith(k.lower()))
        chunk = raw[off:off + int(size)]
        if key == "magic":
            assert chunk == b"KILNTOK\0" and "`KILNTOK\\0`" in field
        else:
            width = re.match(r"[^(]*\(uint(\d+)\)", field)  # the field's own type: "version (uint32) = 1"
            assert width is None or int(width[1]) == 8 * int(size), field  # the stated type has the stated size
            assert int.from_bytes(chunk, "little") == want[key], (field, chunk)
        seen.add(key)
        end = off + int(size)
    assert seen == set(want) and end == 64
    limit = int(re.search(r"2 \(uint16[^)]*vocabulary ≤ ([\d,]+)\) or 4 \(uint32", section)[1].replace(",", ""))
    assert dtype_for_vocab(limit).itemsize == 2 and dtype_for_vocab(limit + 1).itemsize == 4
    # .idx: magic, the number of documents (uint64), then n+1 uint64 token offsets
    assert "`KILNIDX\\0`" in section and "n+1 uint64 token offsets" in section
    assert idx[:8] == b"KILNIDX\0" and int.from_bytes(idx[8:16], "little") == 2
    assert np.frombuffer(idx[16:], "<u8").tolist() == [0, 4, 6] and len(idx) == 16 + 8 * 3


def test_tasks_in_the_stage_process_leave_its_allocator_alone(tmp_path, monkeypatch):
    """One worker (datatrove runs every rank in the caller) or a small input: the shard tasks run in the stage's
    own process, which must not get the workers' allocator settings (mallopt is for good, and costs ~9% CPU)."""
    import stages.shard

    calls = []
    monkeypatch.setattr(stages.shard, "return_freed_memory", lambda: calls.append(1) or False)
    root, docs = str(tmp_path), mixed_docs(20, 20, 5)
    for run, small_below in (("one-worker", 0), ("small", 16)):
        cfg = load_tiny(tmp_path, {**FAST, "run.tasks": 2, "run.workers": 1, "shard.inprocess_below_mb": small_below})
        m = build(root, run, docs, cfg)
        assert m["counts"]["documents_out"] == len(docs)
    assert calls == []
