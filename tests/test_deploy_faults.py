"""Failures as users meet them, against a real `prefect server start` (one per module, 127.0.0.1):

- the `kiln run` process (flow and datatrove workers: its whole process group) is SIGKILLed in the middle of
  dedup; the re-run of the same run id takes over the dead run's lock, skips ingest and normalize by their
  manifests and gives dedup outputs equal to an uninterrupted run's (and removes the killed attempt's uncommitted
  index segment);
- a training flow run served by `kiln serve` is cancelled as the UI's Cancel button does it: torchrun and its
  ranks are gone within seconds and no checkpoint is completed afterwards.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import alive
from stages.core.storage import Storage
from test_deploy import ONE_FILE, ROOT, _api, _deployment, _final, _stop, _ui_run, _wait, prefect_server

STAGES3 = ("ingest", "normalize", "dedup")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(api, env, logs, serve process, its storage): a Prefect server and `kiln serve` (flows.deploy, polling for
    new flow runs every second instead of 10), started together so that serve is up by the time a test uses it."""
    tmp = tmp_path_factory.mktemp("prefect-faults")
    with prefect_server(tmp) as (api, env, log):
        storage, serve_log = str(tmp / "serve-art"), tmp / "serve.log"
        serve = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--no-nightly"], cwd=ROOT,
                                 env={**env, "PREFECT_API_URL": api, "KILN_STORAGE": storage,
                                      "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                                 stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
        try:
            yield api, env, [log, serve_log], serve, storage
        finally:
            _stop(serve)


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from /proc)."""
    out = []
    for e in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{e}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(e))
    return out


def _flow_runs(api: str, flow_name: str) -> list[dict]:
    return _api(api, "POST", "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}},
                                                   "sort": "EXPECTED_START_TIME_ASC"})[1]


def _logs(api: str, flow_run_id: str) -> str:
    return json.dumps(_api(api, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})[1])


def test_flow_killed_in_dedup_resumes_at_dedup(server, tmp_path):
    """SIGKILL of the flow process group once dedup's filter pipeline (its last datatrove pipeline, workers in a
    pool) has started: signature and cluster are done and the snapshot's index segment is written, nothing is
    committed. dedup.inprocess_below_mb=0 makes dedup start worker pools (children of the flow process) and take
    ~3 s on one crawl file, long enough to be caught there by polling storage every 20 ms."""
    api, env, logs, _, _ = server
    storage = str(tmp_path / "art")
    run_env = {**env, "PREFECT_API_URL": api, "KILN_STORAGE": storage, "PREFECT_LOGGING_LEVEL": "INFO"}
    again = tmp_path / "again.warc.gz"  # the same crawl file twice: every page has an exact and a URL duplicate
    again.symlink_to(ONE_FILE)
    sets = {"ingest.inputs": [ONE_FILE, str(again)], "dedup.inprocess_below_mb": 0}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--run-id", "k", "--stages", ",".join(STAGES3),
           *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    first_log = tmp_path / "first.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, start_new_session=True, stdout=open(first_log, "w"),
                            stderr=subprocess.STDOUT)
    root = Storage(storage).sub("k")
    filter_started = Path(storage) / "k" / "dedup" / "logs" / "dedup_filter"
    deadline = time.time() + 180
    try:
        while not filter_started.exists():
            assert proc.poll() is None, f"the flow ended before dedup's filter step\n{first_log.read_text()[-3000:]}"
            assert time.time() < deadline, f"dedup's filter step never started\n{first_log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:  # the flow process and its datatrove workers, as a dying node (or a failed wait) takes them
        with contextlib.suppress(ProcessLookupError):  # a flow that ended by itself: its group may be gone
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait("the killed process group to be gone", lambda: not _group(proc.pid), 30)

    # the killed attempt left partial files and a stale lock, never a manifest; its index segment is orphaned
    assert not root.exists("dedup/manifest.json") and root.sub("dedup").list()
    assert root.read_json(".lock.json")["pid"] == proc.pid
    before = {s: root.read_bytes(f"{s}/manifest.json") for s in ("ingest", "normalize")}
    index = Storage(storage).sub("index", "dedup")
    orphan = {p.split("/")[1] for p in index.list("segments") if p.startswith("segments/k-")}
    assert len(orphan) == 1  # the killed attempt's segment: written by the cluster step, never committed
    assert not index.exists("index.json") or "k" not in [s["snapshot"] for s in index.read_json("index.json")["segments"]]
    # the API saw the kill in dedup: ingest and normalize completed, dedup's task run still Running (so is the flow
    # run: a SIGKILLed process reports nothing, and `kiln run` has no runner heartbeat to time it out)
    (killed_run,) = _flow_runs(api, "kiln-pipeline")
    tasks = _api(api, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [killed_run["id"]]}}})[1]
    assert {t["name"].rsplit("-", 1)[0]: t["state"]["type"] for t in tasks} == {
        "ingest": "COMPLETED", "normalize": "COMPLETED", "dedup": "RUNNING"}

    # the same command again: the dead holder's lock is taken over, ingest and normalize are skipped
    rerun = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, (rerun.stdout[-3000:], rerun.stderr[-3000:])
    assert "taking over a stale lock of pid %d" % proc.pid in rerun.stderr
    assert {s: root.read_bytes(f"{s}/manifest.json") for s in ("ingest", "normalize")} == before
    resumed = [r for r in _flow_runs(api, "kiln-pipeline") if r["id"] != killed_run["id"]]
    assert len(resumed) == 1 and resumed[0]["state"]["type"] == "COMPLETED"

    def skipped_logged():
        text = _logs(api, resumed[0]["id"])
        return all(f"{s}: skipped (already complete)" in text for s in ("ingest", "normalize")) and text
    text = _wait("the resumed run's 'skipped' logs", skipped_logged, 60, logs)
    assert "dedup: skipped" not in text and "dedup: " in text  # dedup ran
    assert not root.exists(".lock.json")

    # an uninterrupted dedup of the same normalize output, in another run id with an index of its own (in this
    # process, without worker pools: a datatrove pool started from pytest costs ~8 s on a busy machine)
    for s in ("ingest", "normalize"):
        shutil.copytree(Path(storage) / "k" / s, Path(storage) / "ref" / s)
    from conftest import load_tiny
    from stages.core.runner import run_stage

    # (snapshot k as well: duplicates.jsonl.gz names the snapshot a removed page matched, here its own)
    ref = run_stage("dedup", load_tiny(None, {"ingest.inputs": sets["ingest.inputs"], "dedup.index": "index/ref",
                                              "dedup.snapshot": "k"}), storage, "ref")
    got = root.read_json("dedup/manifest.json")
    assert not got["metrics"]["in_process"] and ref["metrics"]["in_process"]  # worker pools vs this process
    assert all(root.sub("dedup").sha256(o["path"]) == o["sha256"] for o in got["outputs"])
    assert sorted(o["path"] for o in got["outputs"]) == sorted(o["path"] for o in ref["outputs"])
    ref_out = Storage(storage).sub("ref", "dedup")
    for o in got["outputs"]:  # the same documents, in the same order
        assert gzip.decompress(root.sub("dedup").read_bytes(o["path"])) == gzip.decompress(ref_out.read_bytes(o["path"]))

    assert {**got["counts"], "index": {**got["counts"]["index"], "uri": None}} == \
        {**ref["counts"], "index": {**ref["counts"]["index"], "uri": None}}
    c = got["counts"]
    assert c["documents_in"] == 2 * c["documents_out"] > 0 and sum(c["removed"].values()) == c["documents_out"]
    # the index lists snapshot k once, at the re-run's own segment; the killed attempt's segment was removed
    segs = index.read_json("index.json")["segments"]
    assert [s["snapshot"] for s in segs] == ["k"] and index.exists(f"{segs[0]['path']}/arrays.npz")
    assert segs[0]["documents"] == got["counts"]["documents_out"]
    assert not index.list(f"segments/{orphan.pop()}") and len({p.split("/")[1] for p in index.list("segments")}) == 1
    assert got["metrics"]["index_orphans_removed"] == 1 and ref["metrics"]["index_orphans_removed"] == 0
    # and the same bytes: the manifests' sha256 (needs gzip headers without a timestamp)
    assert {o["path"]: o["sha256"] for o in got["outputs"]} == {o["path"]: o["sha256"] for o in ref["outputs"]}


# -- cancel from the UI -----------------------------------------------------------------------------------------
SMALL = {"train.model.d_model": 64, "train.model.n_layers": 2, "train.model.n_heads": 2, "train.model.seq_len": 64,
         "train.global_batch": 8, "train.micro_batch": 2, "train.warmup_steps": 5, "train.dtype": "fp32",
         "train.nproc": 2, "train.peak_flops": 1e11}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_ui_cancel_stops_training_with_torchrun_and_ranks(server, tmp_path):
    """A `kiln-train/train` run started as the UI's Run button does, served by `kiln serve`, cancelled once torchrun,
    both ranks and a first complete checkpoint exist (checkpoints every 5 steps): CANCELLED, torchrun and the ranks
    gone, no checkpoint completed afterwards, serve still up. How the processes stop: the runner sends the flow-run
    process SIGTERM; Prefect turns it into an exception in the task's thread, stages.train.launch catches it and
    stops torchrun's process group (_kill_group); torchrun also has PR_SET_PDEATHSIG if the flow process is killed."""
    from lm_upstream import build_upstream
    from stages.train import _worker_pids
    from stages.train.checkpoint import complete_states

    api, _, logs, serve, storage = server
    build_upstream(storage, "c", tmp_path / "build", max_bytes=100_000, vocab_size=512)
    dep = _deployment(api, "kiln-train", "train", logs)
    params = {"run": {"run_id": "c", "overrides": {**SMALL, "train.steps": 1_000_000,
                                                   "train.checkpoint_every": 5}}, "stages": ["train"]}
    code, fr = _ui_run(api, dep["id"], params)
    assert code == 201, fr
    out = Storage(storage).sub("c", "train")

    def training():  # torchrun and both ranks under the serve process, and a first complete checkpoint
        fam = {p: _cmdline(p) for p in _worker_pids(serve.pid)}
        run = [p for p, c in fam.items() if b"torch.distributed.run" in c]
        ranks = [p for p, c in fam.items() if b"stages.train.worker" in c and b"torch.distributed.run" not in c]
        return (run, ranks) if run and len(ranks) == 2 and complete_states(out) else None
    torchrun, ranks = _wait("torchrun, 2 ranks and a checkpoint", training, 180, logs)

    # the UI's Cancel (ui-v2: POST /flow_runs/{id}/set_state, CANCELLING, force)
    code, body = _api(api, "POST", f"/flow_runs/{fr['id']}/set_state",
                      {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    assert code in (200, 201) and body["status"] == "ACCEPT", body
    t0 = time.time()
    run = _final(api, fr["id"], logs, timeout=90)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    marks = complete_states(out)
    _wait("torchrun and its ranks to exit", lambda: not any(alive(p) for p in torchrun + ranks), 10, logs)
    took = time.time() - t0
    assert not [p for p in _worker_pids(serve.pid) if b"stages.train" in _cmdline(p)]
    time.sleep(3)  # checkpoints came every 5 steps (well under a second) while training ran
    assert complete_states(out) == marks and not out.exists("manifest.json")
    assert serve.poll() is None  # the serve process itself keeps serving
    assert took < 45, took
