"""shard on S3: readers fetch a window, a document or a header by HTTP range GETs from a real moto_server, and only
those bytes: a counting TCP proxy in front of moto sees every request line, its Range header and every byte moto
sends back. Also the Parquet shards: pyarrow's own S3 client (no Kiln) reads one row group by one range GET."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from conftest import TcpProxy, load_tiny
from test_reweight import mixed_docs
from test_shard import build, with_copies

from stages.core.storage import Storage
from stages.core.tokens import HEADER_BYTES, TokenShard


@pytest.fixture
def proxy(s3_endpoint):
    p = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])).start()
    yield p
    p.stop()


def test_windows_documents_and_headers_are_range_gets_of_their_bytes_only(s3_bucket, tmp_path, monkeypatch, proxy):
    # a real shard on S3: the stage writes it straight to moto (~1 MB of uint16 tokens in one train shard)
    root = s3_bucket + "/runs"
    docs = with_copies(mixed_docs())
    cfg = load_tiny(tmp_path, {"run.tasks": 1, "run.workers": 1, "tokenizer.vocab_size": 2048,
                               "shard.parquet_rows_per_group": 64})
    build(root, "r", docs, cfg)
    rel = "tokens/train/00000.bin"
    size = Storage(root).sub("r", "shard").size(rel)
    assert size > 900_000

    # the same objects read through the proxy (a new Storage takes the endpoint from the environment)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    st = Storage(root).sub("r", "shard")
    key = st.url(rel).split("/", 3)[3]  # the object key under the bucket
    sp = spm.SentencePieceProcessor(model_proto=Storage(root).sub("r", "tokenizer").read_bytes("tokenizer.model"))

    def cost(fn):
        """fn()'s result, the bytes moto sent for it and its requests."""
        down0, n0 = proxy.snapshot()
        out = fn()
        down1, _ = proxy.snapshot()
        return out, down1 - down0, proxy.requests()[n0:]

    # the header: one range GET of bytes 0-63
    shard, got, reqs = cost(lambda: TokenShard(st, rel))
    assert [(m, p.endswith(key), r) for m, p, r in reqs] == [("GET", True, (0, HEADER_BYTES - 1))]
    assert got < 2_000 and shard.header["n_tokens"] * 2 + HEADER_BYTES == size

    # a window of 1,000 tokens from the middle: one range GET of exactly its 2,000 bytes
    start = shard.n_tokens // 2
    window, got, reqs = cost(lambda: shard.read(start, 1000))
    b0 = HEADER_BYTES + 2 * start
    assert [(m, r) for m, _, r in reqs] == [("GET", (b0, b0 + 1999))]
    assert 2_000 <= got < 4_000 < size // 200  # the window and one response header, not the shard

    # document 200 of the shard: 16 bytes of the index, then its tokens; it decodes to its Parquet row's text
    i = 200
    s, e = shard.doc_range(i)
    doc, got, reqs = cost(lambda: shard.document(i))
    assert [(m, p.rsplit(".", 1)[1], r) for m, p, r in reqs] == [
        ("GET", "idx", (16 + 8 * i, 16 + 8 * i + 15)), ("GET", "bin", (HEADER_BYTES + 2 * s, HEADER_BYTES + 2 * e - 1))]
    assert got < 2 * doc.size + 4_000 and doc.size == e - s and doc[-1] == 2 and 2 not in doc[:-1]
    table = pq.read_table(io.BytesIO(st.read_bytes("parquet/train/00000.parquet")), columns=["text"])
    assert sp.decode(doc[:-1].tolist()) == table.column("text")[i].as_py()

    # the training reader: with nothing preloaded, one window of a sequence is one range GET of its bytes
    from stages.train.data import WindowDataset

    ds = WindowDataset([shard], 257, preload_bytes=0)
    k = len(ds) - 3
    w, got, reqs = cost(lambda: ds[k])
    assert [(m, r) for m, _, r in reqs] == [("GET", (HEADER_BYTES + 2 * 257 * k, HEADER_BYTES + 2 * 257 * (k + 1) - 1))]
    assert got < 2 * 257 + 2_000 and np.array_equal(w, shard.read(257 * k, 257))

    # control: the counter sees a whole download for what it is
    _, got, reqs = cost(lambda: st.read_bytes(rel))
    assert got >= size and [m for m, _, _ in reqs].count("GET") >= 1
    assert np.array_equal(np.frombuffer(st.read_bytes(rel)[b0:b0 + 2000], "<u2"), window)

    # Parquet without Kiln: pyarrow's own S3 client streams one row group (footer + that group), not the file
    from pyarrow import fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=proxy.url, scheme="http", access_key="testing", secret_key="testing",
                           region="us-east-1")
    obj = st.url("parquet/train/00000.parquet")[len("s3://"):]
    psize = st.size("parquet/train/00000.parquet")
    pf, got_meta, _ = cost(lambda: pq.ParquetFile(s3.open_input_file(obj)))
    groups = pf.metadata.num_row_groups
    assert groups >= 8 and pf.metadata.row_group(0).num_rows == 64
    g = groups // 2
    group, got, reqs = cost(lambda: pf.read_row_group(g, columns=["text", "id"]))
    assert group.num_rows == 64 and all(m == "GET" and r is not None for m, _, r in reqs)
    cols = [pf.metadata.row_group(g).column(i) for i in (0, 1)]  # text and id: the first two columns
    lo = min(c.dictionary_page_offset or c.data_page_offset for c in cols)
    hi = max((c.dictionary_page_offset or c.data_page_offset) + c.total_compressed_size for c in cols)
    assert [r for _, _, r in reqs] == [(lo, hi - 1)]  # exactly the group's two column chunks
    assert got < hi - lo + 2_000 and got_meta + got < psize // 3, (got, got_meta, psize)
