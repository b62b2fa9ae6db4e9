"""filter on real documents: per-filter removals add up, survivors pass every filter, PII is redacted."""

from __future__ import annotations

import re

import pytest

from conftest import load_tiny, real_docs, seed_stage
from stages.core.runner import StageError, run_stage
from test_normalize import stage_docs

FAST = {"run.workers": 1}  # tasks run in this process: no worker start-up cost


@pytest.fixture(scope="module")
def docs():
    d = real_docs(181)
    para = max(d[0]["text"].split("\n"), key=len)
    spam = dict(d[0], id="repeated-paragraph", text="\n\n".join([para] * 12))  # a real paragraph, 12 times
    return d + [spam]


def test_removals_add_up_and_survivors_pass(tmp_path, docs):
    from stages.filter import Config, build_filters

    seed_stage(str(tmp_path), "run1", "dedup", docs)
    cfg = load_tiny(tmp_path, FAST)
    m = run_stage("filter", cfg, str(tmp_path), "run1")
    c = m["counts"]
    assert set(c["removed"]) == {"gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"}
    assert c["documents_in"] == len(docs) == c["documents_out"] + sum(c["removed"].values())
    assert 0 < c["documents_out"] < len(docs) and c["removed"]["gopher_repetition"] >= 1
    assert m["metrics"]["reasons"]["gopher_repetition"]  # the filters' own reasons are kept
    out = stage_docs(str(tmp_path), "filter")
    assert "repeated-paragraph" not in {d["id"] for d in out}
    from datatrove.data import Document

    by_id = {d["id"]: d for d in docs}
    for d in out:  # every survivor passes every configured filter again; C4 did not cut lines from it
        if "@" not in by_id[d["id"]]["text"]:
            assert d["text"] == by_id[d["id"]]["text"]
        for key, f in build_filters(Config.model_validate(cfg.filter.model_dump())):
            res = f.filter(Document(text=d["text"], id=d["id"]))
            assert (res if isinstance(res, bool) else res[0]), (key, d["id"])


def test_switching_a_filter_off(tmp_path, docs):
    seed_stage(str(tmp_path), "run1", "dedup", docs)
    storage = str(tmp_path)
    on = run_stage("filter", load_tiny(tmp_path, FAST), storage, "run1")["counts"]
    off = run_stage("filter", load_tiny(tmp_path, {**FAST, "filter.gopher_quality.enabled": False}),
                    storage, "run1")["counts"]
    assert "gopher_quality" in on["removed"] and "gopher_quality" not in off["removed"]
    assert off["documents_out"] >= on["documents_out"]
    assert off["documents_in"] == off["documents_out"] + sum(off["removed"].values())


def test_emails_and_public_ips_redacted(tmp_path, docs):
    email = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
    real = [d for d in docs if email.search(d["text"])]
    assert len(real) == 4  # real articles that print contact addresses
    with_ip = dict(docs[10], id="with-ips", text=docs[10]["text"] + "\nServer 93.184.216.34 (LAN 192.168.1.20).")
    seed_stage(str(tmp_path), "run1", "dedup", real + [with_ip])
    off = {f"filter.{k}.enabled": False for k in ("gopher_repetition", "gopher_quality", "c4_quality",
                                                  "fineweb_quality")}
    m = run_stage("filter", load_tiny(tmp_path, {**FAST, **off}), str(tmp_path), "run1")
    assert m["counts"]["removed"] == {} and m["counts"]["documents_out"] == len(real) + 1
    assert m["counts"]["redacted"] == {"documents": len(real) + 1, "emails": len(real), "ips": 1}
    out = {d["id"]: d["text"] for d in stage_docs(str(tmp_path), "filter")}
    for d in real:
        addresses = email.findall(d["text"])
        assert addresses and not any(a in out[d["id"]] for a in addresses)
        assert "@example.com" in out[d["id"]] or "@example.org" in out[d["id"]]
    assert "93.184.216.34" not in out["with-ips"] and "192.168.1.20" in out["with-ips"]


def test_too_few_survivors_names_the_filter(tmp_path, docs):
    seed_stage(str(tmp_path), "run1", "dedup", docs[:40])
    cfg = load_tiny(tmp_path, {**FAST, "filter.min_documents_out": 10_000})
    with pytest.raises(StageError, match=r"filter kept \d+ of 40 documents .*loosen filter\.\w+"):
        run_stage("filter", cfg, str(tmp_path), "run1")


def test_normalize_dedup_filter_on_s3(s3_bucket, docs):
    """The three stages read and write datatrove JSONL in S3 (moto_server); the exact copy is removed."""
    store = s3_bucket + "/artifacts"
    seed_stage(store, "run1", "ingest", docs[:30] + [dict(docs[5], id="copy")])
    cfg = load_tiny(None, FAST)
    counts = {s: run_stage(s, cfg, store, "run1")["counts"] for s in ("normalize", "dedup", "filter")}
    assert counts["normalize"]["documents_out"] == 31
    assert counts["dedup"]["removed"]["exact"] == 1 and counts["dedup"]["documents_out"] == 30
    f = counts["filter"]
    assert f["documents_in"] == 30 == f["documents_out"] + sum(f["removed"].values())
    out = stage_docs(store, "filter")
    assert len(out) == f["documents_out"] > 0 and "copy" not in {d["id"] for d in out}
