"""The stage runner's promises: manifests written last, skip by fingerprint, re-run downstream on change,
nothing partial left behind, and never a zero-document success."""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tiny, real_docs, seed_stage
from stages.core.runner import MissingInput, StageError, run_stage
from stages.core.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def seeded(tmp_path):
    seed_stage(str(tmp_path), "r", "ingest", real_docs(40))
    return str(tmp_path)


def test_manifest_lists_outputs_and_identical_rerun_is_skipped(seeded):
    cfg = load_tiny(None, {"run.workers": 1})
    m = run_stage("normalize", cfg, seeded, "r")
    out = Storage(seeded).sub("r", "normalize")
    assert m["outputs"] and all(out.sha256(o["path"]) == o["sha256"] for o in m["outputs"])
    assert m["counts"]["documents_out"] == len(real_docs(40)) and m["inputs"]["ingest"]["fingerprint"] == "seeded-ingest"
    assert m["code_version"] and m["wall_time_s"] > 0 and out.read_json("manifest.json") == m
    again = run_stage("normalize", cfg, seeded, "r")
    assert again["skipped"] and again["fingerprint"] == m["fingerprint"]


def test_changed_config_or_upstream_reruns(seeded):
    cfg = load_tiny(None, {"run.workers": 1})
    first = run_stage("normalize", cfg, seeded, "r")
    changed = run_stage("normalize", load_tiny(None, {"run.workers": 1, "normalize.symbol_lines": False}), seeded, "r")
    assert not changed.get("skipped") and changed["fingerprint"] != first["fingerprint"]
    seed_stage(seeded, "r", "ingest", real_docs(30))  # upstream changed: its manifest hash differs
    rerun = run_stage("normalize", cfg, seeded, "r")
    assert not rerun.get("skipped") and rerun["counts"]["documents_in"] == len(real_docs(30))


def test_partial_attempt_is_cleared_before_running(seeded):
    stale = Storage(seeded).sub("r", "normalize")
    stale.write_bytes("data/99999.jsonl.gz", b"half a file")  # a previous attempt died here, no manifest
    m = run_stage("normalize", load_tiny(None, {"run.workers": 1}), seeded, "r")
    assert not stale.exists("data/99999.jsonl.gz")
    assert sorted(stale.list("data")) == sorted(o["path"] for o in m["outputs"] if o["path"].startswith("data/"))


def test_missing_upstream_names_the_stage(tmp_path):
    with pytest.raises(MissingInput, match=r"run `kiln stage ingest` first"):
        run_stage("normalize", load_tiny(None), str(tmp_path), "r")


def test_zero_documents_is_a_failure_without_manifest(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "random.warc.gz").write_bytes(random.Random(11).randbytes(20_000))
    cfg = load_tiny(None, {"ingest.inputs": [str(src / "*.warc.gz")], "run.workers": 1})
    with pytest.raises(StageError, match=r"stage 'ingest' produced 0 documents .* no manifest written"):
        run_stage("ingest", cfg, str(tmp_path / "st"), "r")
    assert not Storage(str(tmp_path / "st")).exists("r/ingest/manifest.json")

    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "ingest", "--storage", str(tmp_path / "st"),
                        "--set", f"ingest.inputs=[{src / '*.warc.gz'}]", "--set", "run.workers=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln: stage 'ingest' produced 0 documents") and "Traceback" not in r.stderr
