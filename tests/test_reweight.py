"""reweight: measured mixture, sampled to target shares, deterministic, on real text from three sources."""

import gzip
import json
import re

import pytest
from conftest import SHARED, load_tiny, real_docs, seed_stage

from stages.core.config import ConfigError
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.reweight import base_id, copies_for


def mixed_docs(n_news: int = 181, n_shakespeare: int = 200, n_wiki: int = 60) -> list[dict]:
    """Real documents from three domains: news article bodies, Tiny Shakespeare cut at speech breaks into
    ~2 KB documents, and WikiText-2 validation articles."""
    docs = []
    for d in real_docs(n_news):
        d["metadata"]["domain"] = "news"
        docs.append(d)
    speeches = (SHARED / "eval" / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    buf, i = [], 0
    for sp in speeches:
        if i == n_shakespeare:
            break
        buf.append(sp)
        if sum(map(len, buf)) > 2000:
            docs.append({"text": "\n\n".join(buf), "id": f"shakespeare/{i}",
                         "metadata": {"url": f"https://example.org/tinyshakespeare#{i}", "domain": "shakespeare"}})
            buf, i = [], i + 1
    wiki = (SHARED / "eval" / "wikitext-2" / "valid.txt").read_text()
    for j, art in enumerate(re.split(r"\n(?= = [^=].* = \n)", wiki)[1:n_wiki + 1]):
        title = art.strip().splitlines()[0].strip(" =")
        docs.append({"text": art.strip(), "id": f"wikitext/{j}",
                     "metadata": {"url": f"https://en.wikipedia.org/wiki/{title.replace(' ', '_')}",
                                  "domain": "wikitext"}})
    return docs


def seed_split(root: str, run: str, stage: str, docs: list[dict]) -> dict:
    """Like seed_stage, with the documents spread over two data files (so both tasks have work)."""
    second = "".join(json.dumps(d) + "\n" for d in docs[1::2]).encode()
    return seed_stage(root, run, stage, docs[0::2], extra_files={"data/00001.jsonl.gz": gzip.compress(second, mtime=0)},
                      counts={"documents_in": len(docs), "documents_out": len(docs)})


def read_out(root: str, run: str, stage: str = "reweight") -> list[dict]:
    st = Storage(root).sub(run, stage)
    return [json.loads(line) for rel in st.list("data", suffix=".jsonl.gz")
            for line in gzip.decompress(st.read_bytes(rel)).decode().splitlines()]


FAST = {"run.tasks": 2, "run.workers": 1}


def test_shares_match_target_and_run_is_deterministic(tmp_path):
    docs = mixed_docs()
    sizes = {"news": 181, "shakespeare": 200, "wikitext": 60}
    assert {d["metadata"]["domain"] for d in docs} == set(sizes) and len(docs) == sum(sizes.values())
    seed_split(str(tmp_path), "a", "filter", docs)
    root = str(tmp_path)
    weights = {"news": 0.5, "wikitext": 3.0}  # shakespeare keeps default_weight 1.0
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": weights})
    m = run_stage("reweight", cfg, root, "a")

    mass = 0.5 * 181 + 1.0 * 200 + 3.0 * 60
    mix = Storage(root).sub("a", "reweight").read_json("mixture.json")
    out = read_out(root, "a")
    for dom, n in sizes.items():
        d = mix["domains"][dom]
        w = weights.get(dom, 1.0)
        assert d["docs"] == n and d["share_target"] == pytest.approx(w * n / mass, abs=1e-5)
        assert d["multiplier"] == pytest.approx(w * len(docs) / mass, abs=1e-5)
        realised = sum(o["metadata"]["domain"] == dom for o in out) / len(out)
        assert realised == pytest.approx(d["share_after"], abs=1e-5)
        assert abs(realised - d["share_target"]) < 0.04, (dom, realised, d["share_target"])
    assert mix["domains"]["wikitext"]["share_after"] > 2 * mix["domains"]["wikitext"]["share_before"]
    # counts add up; upsampled copies carry distinct ids that point back to their original
    c = m["counts"]
    assert c["documents_in"] == len(docs) and c["documents_out"] == len(out)
    assert c["documents_out"] == c["documents_in"] - c["removed"]["downsampled"] + c["added"]["upsampled"]
    assert c["bytes_out"] == sum(len(o["text"].encode()) for o in out)
    ids = [o["id"] for o in out]
    assert len(set(ids)) == len(ids)
    copies = [i for i in ids if "#r" in i]
    assert len(copies) == c["added"]["upsampled"] > 50
    assert Storage(root).sub("a", "reweight").list("data") == ["data/00000.jsonl.gz", "data/00001.jsonl.gz"]
    assert all(base_id(i) in set(ids) for i in copies)
    assert abs(len(out) - len(docs)) < 0.06 * len(docs)  # total size stays ~N

    # same input, same seed -> same documents; another seed -> another sample
    seed_split(root, "b", "filter", docs)
    run_stage("reweight", cfg, root, "b")
    assert sorted(map(json.dumps, read_out(root, "b"))) == sorted(map(json.dumps, out))
    assert Storage(root).sub("b", "reweight").read_json("mixture.json") == mix
    seed_split(root, "c", "filter", docs)
    run_stage("reweight", load_tiny(tmp_path, {**FAST, "reweight.weights": weights, "run.seed": 99}), root, "c")
    assert sorted(o["id"] for o in read_out(root, "c")) != sorted(ids)


def test_zero_weight_drops_domain_and_missing_key_is_its_own_bucket(tmp_path):
    docs = mixed_docs(40, 30, 10)
    for d in docs[:5]:
        del d["metadata"]["domain"]
    seed_stage(str(tmp_path), "r", "filter", docs)
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": {"shakespeare": 0, "docs.python.org": 2}})
    m = run_stage("reweight", cfg, str(tmp_path), "r")
    out = read_out(str(tmp_path), "r")
    assert not any(o["metadata"].get("domain") == "shakespeare" for o in out)
    assert m["counts"]["removed"]["downsampled"] >= 30
    mix = Storage(str(tmp_path)).sub("r", "reweight").read_json("mixture.json")
    assert mix["domains"]["(none)"]["docs"] == 5 and mix["domains"]["shakespeare"]["share_after"] == 0
    # a weight for a domain that is absent is reported, not an error
    assert "docs.python.org" in mix["weights_for_absent_domains"]


def test_bad_weights_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match=r"reweight\.weights\.news"):
        load_tiny(tmp_path, {"reweight.weights": {"news": -1}})
    seed_stage(str(tmp_path), "z", "filter", mixed_docs(10, 0, 0))
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": {"news": 0}})
    with pytest.raises(StageError, match="weight 0"):
        run_stage("reweight", cfg, str(tmp_path), "z")


def test_copies_are_stable_and_match_fractional_multiplier():
    assert [copies_for(2.0, 1, f"d{i}") for i in range(5)] == [2] * 5
    n = [copies_for(0.3, 7, f"doc-{i}") for i in range(5000)]
    assert n == [copies_for(0.3, 7, f"doc-{i}") for i in range(5000)]
    assert set(n) == {0, 1} and abs(sum(n) / 5000 - 0.3) < 0.02
    assert base_id("abc#r12") == "abc" and base_id("a#rb") == "a#rb"
