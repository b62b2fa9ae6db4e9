"""Storage against the local disk and a real S3 endpoint (moto_server over HTTP)."""

import boto3
import numpy as np
import pytest

from stages.core.storage import Storage
from stages.core.tokens import TokenShard, TokenShardWriter


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    return Storage(request.getfixturevalue("s3_bucket") + "/prefix")


def test_roundtrip_list_hash_and_ranges(store, shared):
    data = (shared / "eval" / "ptb" / "ptb.valid.txt").read_bytes()
    store.write_bytes("a/b/ptb.txt", data)
    store.write_json("a/meta.json", {"n": 1})
    assert store.read_bytes("a/b/ptb.txt") == data
    assert store.read_bytes("a/b/ptb.txt", 100, 200) == data[100:200]
    assert store.list("a") == ["a/b/ptb.txt", "a/meta.json"]
    assert store.size("a/b/ptb.txt") == len(data)
    import hashlib

    assert store.sha256("a/b/ptb.txt") == hashlib.sha256(data).hexdigest()
    assert store.sub("a").read_json("meta.json") == {"n": 1}
    store.rm("a")
    assert not store.exists("a/meta.json") and store.list("a") == []


def test_token_shard_window_reads_by_range(store, tmp_path):
    base = (tmp_path / "x").as_posix()
    w = TokenShardWriter(base + ".bin", base + ".idx", vocab_size=50000, eos_id=2)
    docs = [list(range(10, 10 + n)) for n in (5, 17, 1, 300)]
    for d in docs:
        w.add(d)
    assert w.close() == {"tokens": sum(len(d) + 1 for d in docs), "documents": 4}
    store.put_file(base + ".bin", "t/00000.bin")
    store.put_file(base + ".idx", "t/00000.idx")
    shard = TokenShard(store, "t/00000.bin")
    assert shard.dtype == np.dtype("<u2") and shard.header["n_docs"] == 4
    off = shard.doc_offsets()
    for i, d in enumerate(docs):
        got = shard.read(off[i], off[i + 1] - off[i])
        assert got[:-1].tolist() == d and got[-1] == 2
    with pytest.raises(IndexError):
        shard.read(int(off[-1]) - 1, 2)


def test_s3_writes_are_visible_through_boto3(s3_bucket, s3_endpoint):
    st = Storage(s3_bucket + "/run")
    st.write_json("x/manifest.json", {"ok": True})
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["run/x/manifest.json"]
