"""The whole DAG as a Prefect flow through a real Prefect API, with artifacts in a real S3 endpoint."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stages import STAGES
from stages.core.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
CRAWL = ROOT.parent / "shared" / "data" / "crawl"
SLICE = [str(CRAWL / "docs.djangoproject.com-0001.warc.gz"), str(CRAWL / "docs.python.org-0002.warc.gz")]
# a small but real slice: two crawl files (126 pages, two domains), a short training run
SMALL = {"ingest.inputs": SLICE, "train.steps": 12, "train.checkpoint_every": 6, "train.warmup_steps": 2,
         "tokenizer.vocab_size": 1024, "evaluate.val_tokens": 4096, "evaluate.doc_tokens": 4096}


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_full_dag_on_s3_through_prefect(prefect_api, s3_bucket):
    from flows.pipeline import pipeline

    storage = s3_bucket + "/runs"
    state = pipeline(storage=storage, run_id="e2e", overrides=SMALL, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["complete"] and [r["stage"] for r in summary["stages"]] == STAGES

    runs = _task_runs(state.state_details.flow_run_id)
    assert sorted(r.name.split("-")[0] for r in runs) == sorted(STAGES)
    assert all(r.state.is_completed() for r in runs)

    root = Storage(storage).sub("e2e")
    for row in summary["stages"]:
        m = root.read_json(f"{row['stage']}/manifest.json")
        for out in m["outputs"]:  # every declared output exists in S3 with the recorded hash
            assert root.sub(row["stage"]).sha256(out["path"]) == out["sha256"]
        if row["documents_out"] is not None:
            assert row["documents_out"] > 0
    assert summary["checkpoint"].startswith(storage)
    assert root.exists("train/final/model.pt") and root.exists("evaluate/report.json")
    funnel = {r["stage"]: r for r in summary["stages"]}
    assert funnel["ingest"]["documents_out"] >= funnel["dedup"]["documents_out"] >= funnel["filter"]["documents_out"]

    # a second run of the same flow skips every stage by its manifest
    again = pipeline(storage=storage, run_id="e2e", overrides=SMALL)
    assert all(r["skipped"] for r in again["stages"])


def test_cli_runs_stages_locally_and_reruns_are_skipped(tmp_path):
    env = {**os.environ, "KILN_STORAGE": str(tmp_path / "art"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "flows.cli", "stage", "ingest", "--set", f"ingest.inputs=[{SLICE[1]}]"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "ingest: done" in first.stdout
    manifest = Storage(str(tmp_path / "art")).sub("tiny", "ingest").read_json("manifest.json")
    assert manifest["counts"]["documents_out"] > 0
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert second.returncode == 0 and "already complete, skipped" in second.stdout


def test_failed_stage_fails_the_flow_in_one_line(prefect_api, tmp_path):
    from flows.pipeline import pipeline

    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "random.warc.gz").write_bytes(random.Random(7).randbytes(10_000))
    state = pipeline(storage=str(tmp_path / "art"), run_id="bad",
                     overrides={"ingest.inputs": [str(bad / "*.warc.gz")], "run.workers": 1}, return_state=True)
    assert state.is_failed()
    assert "stage 'ingest' produced 0 documents" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.name.split("-")[0] for r in runs] == ["ingest"] and runs[0].state.is_failed()
    assert not Storage(str(tmp_path / "art")).exists("bad/ingest/manifest.json")
