"""dedup on real documents: exact duplicates across files/tasks, and a real near-duplicate pair of the crawl."""

from __future__ import annotations

import gzip
import json

from conftest import CRAWL, load_tiny, real_docs, seed_stage
from stages.core.runner import run_stage
from test_normalize import slice_warc, stage_docs


def test_exact_duplicate_across_files_removed_first_kept(tmp_path):
    docs = real_docs(24)
    a, b = docs[:12], docs[12:]
    dup = a[3]
    b = b[:5] + [dict(dup, id="copy-of-" + dup["id"], text=dup["text"] + "\n")] + b[5:]  # same text, other file
    b.append(dict(b[0], id="copy-in-same-file"))
    second = "".join(json.dumps(d) + "\n" for d in b).encode()
    storage = str(tmp_path)
    seed_stage(storage, "run1", "normalize", a, extra_files={"data/00001.jsonl.gz": gzip.compress(second)})
    # 2 tasks (one per file) run one after the other in this process: fast, and still cross-task
    m = run_stage("dedup", load_tiny(tmp_path, {"run.tasks": 2, "run.workers": 1}), storage, "run1")
    c = m["counts"]
    assert c["documents_in"] == 26 and c["removed"]["exact"] == 2 and c["documents_out"] == 24
    assert c["removed"]["near_duplicate"] == 0  # unrelated news articles
    ids = [d["id"] for d in stage_docs(storage, "dedup")]
    assert dup["id"] in ids and "copy-of-" + dup["id"] not in ids  # the first copy (first file) survives
    assert b[0]["id"] in ids and "copy-in-same-file" not in ids
    assert sorted(ids) == sorted(d["id"] for d in docs)


def test_real_near_duplicates_of_the_crawl_removed(tmp_path):
    """Django security releases published together (J >= 0.8 on word 5-grams), split over two files, plus
    unrelated release notes that must all survive."""
    rel = "https://docs.djangoproject.com/en/3.2/releases/"
    pairs = [("2.2.26", "3.2.11"), ("2.2.24", "3.1.12")]  # J = 0.89 and 0.84 on the extracted text
    others_0 = ["1.0", "1.2", "2.0", "2.2"]  # major releases: long, distinct
    others_1 = ["3.1", "3.2"]
    n0 = slice_warc(CRAWL / "docs.djangoproject.com-0000.warc.gz", tmp_path / "dj0.warc.gz",
                    {f"{rel}{v}.html" for v in [p[0] for p in pairs] + others_0})
    n1 = slice_warc(CRAWL / "docs.djangoproject.com-0001.warc.gz", tmp_path / "dj1.warc.gz",
                    {f"{rel}{v}.html" for v in [p[1] for p in pairs] + others_1})
    assert n0 + n1 == 4 + len(others_0) + len(others_1)
    cfg = load_tiny(tmp_path, {"ingest.inputs": [str(tmp_path / "*.warc.gz")], "ingest.extract.timeout": 300,
                               "run.workers": 1})
    storage = str(tmp_path / "st")
    for stage in ("ingest", "normalize"):
        run_stage(stage, cfg, storage, "run1")
    m = run_stage("dedup", cfg, storage, "run1")
    c = m["counts"]
    assert c["removed"] == {"exact": 0, "near_duplicate": 2} and c["near_duplicate_clusters"] == 2
    kept = {d["metadata"]["url"].removeprefix(rel).removesuffix(".html") for d in stage_docs(storage, "dedup")}
    assert all(len(kept & set(p)) == 1 for p in pairs)  # one of each pair
    assert set(others_0 + others_1) <= kept
