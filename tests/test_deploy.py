"""Deployments as users reach them: a real `prefect server start`, `python -m flows.deploy` (= `kiln serve`)
serving the deployments, flow runs created through the REST API exactly as the UI's Run button does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import _free_port

from stages.core.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
CRAWL = ROOT.parent / "shared" / "data" / "crawl"
ONE_FILE = str(CRAWL / "docs.python.org-0002.warc.gz")  # 428 KB, ~60 pages: ingest -> dedup in seconds


def _api(base: str, method: str, path: str, body=None) -> tuple[int, object]:
    """One REST call; 503 (sqlite busy while the flow run writes logs) is retried, as prefect's own client does."""
    for attempt in range(6):
        req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 5:
                return e.code, json.loads(e.read() or b"null")
        time.sleep(0.5 * 2 ** attempt)


def _wait(what: str, check, timeout: float, proc_logs=()):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = check()
        if got:
            return got
        time.sleep(1)
    logs = "\n".join(f"--- {p}\n{Path(p).read_text()[-3000:]}" for p in proc_logs if Path(p).exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def prefect_server(tmp: Path):
    """(api URL, env without PREFECT_* settings, log): `prefect server start` on sqlite in its own PREFECT_HOME."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_LOGGING_LEVEL="WARNING")
    log = tmp / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, cwd=tmp, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        _wait("server health", lambda: _health(api), 120, [log])
        yield api, env, log
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(api base URL, storage, log files): a Prefect server, and the serve process registering Kiln's
    deployments against it (`python -m flows.deploy`, what `kiln serve` runs). Both stopped at the end."""
    tmp = tmp_path_factory.mktemp("prefect")
    with prefect_server(tmp) as (api, env, server_log):
        storage, serve_log = str(tmp / "art"), tmp / "serve.log"
        serve_env = {**env, "PREFECT_API_URL": api, "KILN_STORAGE": storage, "PREFECT_LOGGING_LEVEL": "INFO"}
        serve = subprocess.Popen([sys.executable, "-m", "flows.deploy"], env=serve_env, cwd=ROOT,
                                 stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
        try:
            yield api, storage, [server_log, serve_log]
        finally:
            _stop(serve)


def _health(api: str) -> bool:
    try:
        return _api(api, "GET", "/health")[0] == 200
    except OSError:
        return False


def _deployment(api: str, flow: str, name: str, logs) -> dict:
    def find():
        code, body = _api(api, "GET", f"/deployments/name/{flow}/{name}")
        return body if code == 200 else None
    return _wait(f"deployment {flow}/{name}", find, 120, logs)


def _ui_run(api: str, deployment_id: str, parameters: dict) -> tuple[int, object]:
    """What the UI's Run -> Custom run button posts."""
    return _api(api, "POST", f"/deployments/{deployment_id}/create_flow_run", {
        "parameters": parameters, "tags": [],
        "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI", "state_details": {}}})


def _final(api: str, run_id: str, logs, timeout=240) -> dict:
    def done():
        body = _api(api, "GET", f"/flow_runs/{run_id}")[1]
        return body if body["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None
    return _wait(f"flow run {run_id}", done, timeout, logs)


def _task_runs(api: str, flow_run_id: str) -> list[dict]:
    return _api(api, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})[1]


def test_ui_run_of_pipeline_deployment_completes_resumes_and_refuses_bad_parameters(served):
    api, storage, logs = served
    dep = _deployment(api, "kiln-run", "pipeline", logs)
    assert dep["enforce_parameter_schema"] and not dep["schedules"]
    params = {"run": {"run_id": "ui", "overrides": {"ingest.inputs": [ONE_FILE]}},
              "stages": ["ingest", "normalize", "dedup"]}
    code, fr = _ui_run(api, dep["id"], params)
    assert code == 201, fr
    run = _final(api, fr["id"], logs)
    assert run["state"]["type"] == "COMPLETED", (run["state"], Path(logs[1]).read_text()[-4000:])

    tasks = _task_runs(api, fr["id"])
    assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks) == ["dedup", "ingest", "normalize"]
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    root = Storage(storage).sub("ui")  # storage came from KILN_STORAGE of the serve process (parameter left empty)
    for stage in ("ingest", "normalize", "dedup"):
        m = root.read_json(f"{stage}/manifest.json")
        assert m["counts"]["documents_out"] > 0
        assert all(root.sub(stage).sha256(o["path"]) == o["sha256"] for o in m["outputs"])
    assert not root.exists("filter")
    arts = _api(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})[1]
    assert any(a["key"] == "kiln-summary-ui" and "dedup" in a["data"] for a in arts)
    assert {"kiln-report-ui", "kiln-funnel-ui"} <= {a["key"] for a in arts}  # the run report (flows/pipeline.py)
    assert root.exists("report/report.md")

    # resume at the failed stage: dedup with another MinHash seed than the index's fails (StageError, after ingest
    # and normalize completed); the re-run with a fresh index of its own (against the first index, every page is a
    # duplicate of run "ui") skips ingest and normalize by their manifests and runs dedup
    resume = {"run": {"run_id": "resume", "overrides": {"ingest.inputs": [ONE_FILE], "dedup.seed": 2}},
              "stages": ["ingest", "normalize", "dedup"]}
    run = _final(api, _ui_run(api, dep["id"], resume)[1]["id"], logs)
    assert run["state"]["type"] == "FAILED" and "dedup" in run["state"]["message"], run["state"]
    states = {t["name"].rsplit("-", 1)[0]: t["state"]["type"] for t in _task_runs(api, run["id"])}
    assert states == {"ingest": "COMPLETED", "normalize": "COMPLETED", "dedup": "FAILED"}
    rroot = Storage(storage).sub("resume")
    before = {s: rroot.read_json(f"{s}/manifest.json") for s in ("ingest", "normalize")}
    assert not rroot.exists("dedup/manifest.json")
    resume["run"]["overrides"]["dedup.index"] = "index/resume"
    run = _final(api, _ui_run(api, dep["id"], resume)[1]["id"], logs)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert {s: rroot.read_json(f"{s}/manifest.json") for s in ("ingest", "normalize")} == before  # not recomputed
    assert rroot.read_json("dedup/manifest.json")["counts"]["documents_out"] > 0
    # the flow process ships its logs in batches (APILogHandler) and may reach COMPLETED before the last batch lands
    # (CI saw an empty list once): wait for them instead of reading once
    def skipped_logged():
        text = json.dumps(_api(api, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})[1])
        return "ingest: skipped (already complete)" in text and "normalize: skipped (already complete)" in text
    _wait("the 'skipped (already complete)' logs of the resumed run", skipped_logged, 60, logs)

    # refused by the server (409, from the deployment's parameter schema): no flow run is created
    n_runs = len(_api(api, "POST", "/flow_runs/filter", {})[1])
    for bad in ({"stages": ["ingest", "bogus"]}, {"run": {"run_id": "../escape"}}, {"run": {"force": "often"}},
                {"run": {"unknown_key": 1}}):
        code, body = _ui_run(api, dep["id"], bad)
        assert code == 409 and "Validation failed" in body["detail"], (bad, code, body)
    assert len(_api(api, "POST", "/flow_runs/filter", {})[1]) == n_runs

    # schema-valid but wrong: a profile that does not exist -> the flow run fails on parameter validation,
    # before any task run
    code, fr = _ui_run(api, dep["id"], {"run": {"profile": "no-such-profile", "run_id": "bad"}})
    assert code == 201
    run = _final(api, fr["id"], logs)
    assert run["state"]["type"] == "FAILED" and "no-such-profile" in run["state"]["message"], run["state"]
    assert _task_runs(api, fr["id"]) == [] and not Storage(storage).exists("bad")


def test_nightly_deployment_has_cron_and_server_schedules_runs(served):
    api, _, logs = served
    dep = _deployment(api, "kiln-nightly-refresh", "nightly-refresh", logs)
    (sched,) = dep["schedules"]
    assert sched["active"] and sched["schedule"]["cron"] == "0 2 * * *" and sched["schedule"]["timezone"] == "UTC"

    def scheduled():
        runs = _api(api, "POST", "/flow_runs/filter", {"flow_runs": {
            "deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}})[1]
        return runs or None
    runs = _wait("scheduled nightly runs", scheduled, 60, logs)
    times = sorted(r["expected_start_time"] for r in runs)
    assert all("T02:00:00" in t for t in times), times  # 02:00 UTC, one a day
    assert len(set(t[:10] for t in times)) == len(times)


def test_prefect_yaml_deploys_onto_a_work_pool_and_a_process_worker_runs_it(tmp_path):
    """prefect.yaml as `prefect deploy` reads it (docker/compose.yaml's path): the `data` deployment on the
    process pool `kiln`, executed by `prefect worker start` (a server of its own: no serve process competing)."""
    with prefect_server(tmp_path) as (api, env, server_log):
        _deploy_and_work(api, {**env, "PREFECT_API_URL": api, "KILN_HOME": str(ROOT),
                               "KILN_STORAGE": str(tmp_path / "art")}, [server_log], tmp_path)
    m = Storage(str(tmp_path / "art")).sub("w").read_json("ingest/manifest.json")
    assert m["counts"]["documents_out"] > 0


def _deploy_and_work(api, env, logs, tmp_path):
    from flows.deploy import deploy

    with pytest.MonkeyPatch.context() as mp:  # `kiln deploy --name data`: creates the pool, then prefect deploy
        for k in ("PREFECT_API_URL", "PREFECT_HOME", "KILN_HOME"):
            mp.setenv(k, env[k])
        assert deploy(names=["data"]) == 0
        assert deploy(names=["data"]) == 0  # again: the pool exists, the deployment is updated
    d = _deployment(api, "kiln-data", "data", logs)
    assert d["work_pool_name"] == "kiln" and d["enforce_parameter_schema"]
    assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    cli = [sys.executable, "-m", "prefect"]
    wlog = tmp_path / "worker.log"
    worker = subprocess.Popen(cli + ["worker", "start", "--pool", "kiln", "--type", "process"], env=env,
                              cwd=tmp_path, stdout=open(wlog, "w"), stderr=subprocess.STDOUT)
    try:
        code, fr = _ui_run(api, d["id"], {"run": {"run_id": "w", "overrides": {"ingest.inputs": [ONE_FILE]}},
                                          "stages": ["ingest"]})
        assert code == 201, fr
        run = _final(api, fr["id"], [*logs, wlog])
        assert run["state"]["type"] == "COMPLETED", (run["state"], wlog.read_text()[-4000:])
        code, body = _ui_run(api, d["id"], {"stages": ["train"]})  # not a data stage: refused by the schema
        assert code == 409, body
    finally:
        _stop(worker)


# -- one writer per run id ----------------------------------------------------------------------------------------
HOLD = """
import sys, time
from stages.core.runner import run_lock
with run_lock(sys.argv[1], "r1", purpose="holder test", stale_s=float(sys.argv[3])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(storage: str, seconds: float, stale_s: float = 120) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, storage, str(seconds), str(stale_s)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_lock_refuses_then_waits_then_takes_over_a_dead_holder(where, tmp_path, request):
    from stages.core.runner import LOCK, RunLocked, run_lock

    storage = str(tmp_path / "art") if where == "local" else request.getfixturevalue("s3_bucket") + "/runs"
    root = Storage(storage).sub("r1")
    p = _holder(storage, 60)
    try:
        assert root.read_json(LOCK)["pid"] == p.pid
        t0 = time.time()
        with pytest.raises(RunLocked, match=rf"run 'r1' .* in use by pid {p.pid} on .*\(holder test\)"):
            with run_lock(storage, "r1", wait_s=1.5):
                pass
        assert time.time() - t0 >= 1.5  # waited, then refused
        p.kill()  # dies without releasing: same host, dead pid -> stale
        p.wait()
        assert root.exists(LOCK)
        with run_lock(storage, "r1", wait_s=0) as token:
            assert root.read_json(LOCK)["token"] == token and root.read_json(LOCK)["pid"] == os.getpid()
            with run_lock(storage, "r1", wait_s=0):  # re-entrant in its own process (a flow, then its stages)
                pass
            assert root.exists(LOCK)
        assert not root.exists(LOCK)  # released
    finally:
        p.kill()
        p.wait()
    # a holder that lets go is waited for
    p = _holder(storage, 2)
    with run_lock(storage, "r1", wait_s=30):
        assert root.read_json(LOCK)["pid"] == os.getpid()
    p.wait()


def test_run_lock_heartbeat_keeps_a_live_holder_and_an_expired_one_is_taken_over(tmp_path):
    from stages.core.runner import LOCK, RunLocked, run_lock

    storage = str(tmp_path / "art")
    p = _holder(storage, 4, stale_s=0.8)  # heartbeat every 0.2 s: older than 0.8 s never happens while alive
    try:
        time.sleep(1.5)
        with pytest.raises(RunLocked):
            with run_lock(storage, "r1", wait_s=0, stale_s=0.8):
                pass
    finally:
        p.wait()
    # another host's lock (pid unknown here) counts only by its heartbeat
    Storage(storage).sub("r1").write_json(LOCK, {"token": "x", "pid": 1, "host": "elsewhere", "purpose": "p",
                                                 "heartbeat": time.time() - 300})
    with run_lock(storage, "r1", wait_s=0, stale_s=120) as token:
        assert Storage(storage).sub("r1").read_json(LOCK)["token"] == token


def test_two_cli_runs_of_one_run_id_run_the_stage_once(tmp_path):
    """Two processes start the same stage of the same run id at once: one runs it, the other waits for the lock
    and then finds the manifest complete (skipped): one set of outputs, no interleaved writes."""
    env = {**os.environ, "KILN_STORAGE": str(tmp_path / "art"), "KILN_LOCK_WAIT_S": "300"}
    cmd = [sys.executable, "-m", "flows.cli", "stage", "ingest", "--run-id", "same",
           "--set", f"ingest.inputs=[{ONE_FILE}]", "--set", "run.workers=1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    said = sorted("skipped" if "already complete, skipped" in o[0] else "ran" if "ingest: done" in o[0] else o[0]
                  for o in outs)
    assert said == ["ran", "skipped"]
    root = Storage(str(tmp_path / "art")).sub("same")
    m = root.read_json("ingest/manifest.json")
    assert m["counts"]["documents_out"] > 0
    assert all(root.sub("ingest").sha256(o["path"]) == o["sha256"] for o in m["outputs"])
    assert not root.exists(".lock.json")


# -- flows in-process (prefect test harness): retries and the flow-level lock -------------------------------------
def _task_runs_of(flow_run_id) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return asyncio.run(read())


def test_transient_errors_are_network_and_object_store_hiccups_only():
    import errno

    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from flows.params import is_transient
    from stages.core.config import ConfigError
    from stages.core.runner import StageError

    def wrapped(inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise RuntimeError("datatrove task failed") from e
        except RuntimeError as outer:
            return outer

    yes = [EndpointConnectionError(endpoint_url="http://minio:9000"), ReadTimeoutError(endpoint_url="x"),
           ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"), ConnectionResetError(),
           OSError(errno.EBUSY, "SlowDown (s3fs)"), TimeoutError(), wrapped(ConnectionRefusedError())]
    no = [ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject"), FileNotFoundError(2, "gone"),
          PermissionError(13, "no"), OSError(errno.ENOSPC, "disk full"), StageError("0 documents"),
          ConfigError("bad key"), ValueError("bug"), wrapped(KeyError("bug"))]
    assert [is_transient(e) for e in yes] == [True] * len(yes)
    assert [is_transient(e) for e in no] == [False] * len(no)


def test_stage_task_retries_unreachable_storage_but_not_bad_data(prefect_api, tmp_path, monkeypatch):
    import random

    from prefect import flow

    from flows.nightly import kiln_stage
    from flows.params import RETRIES, profile_path

    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "random.warc.gz").write_bytes(random.Random(7).randbytes(10_000))
    task = kiln_stage.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
    cfg = profile_path("tiny")
    # an S3 endpoint with nothing listening (connection refused); botocore's own retries off to keep it short
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("KILN_S3_ATTEMPTS", "1")  # and Kiln's own: one try per request, a 2 s window per operation
    monkeypatch.setenv("KILN_STORAGE_RETRY_S", "2")  # (default 120 s: x 4 task attempts this test took 8 minutes)

    @flow
    def both():
        down = task.with_options(name="ingest")("ingest", cfg, {"ingest.inputs": [ONE_FILE]}, "s3://kiln-down/runs",
                                               "r", False, return_state=True)
        data = task.with_options(name="ingest")("ingest", cfg, {"ingest.inputs": [str(bad / "*.warc.gz")],
                                                                 "run.workers": 1}, str(tmp_path / "art"), "r", False,
                                                return_state=True)
        return {k: (s.is_failed(), s.message, s.state_details.task_run_id) for k, s in (("down", down), ("data", data))}

    state = both(return_state=True)
    got = state.result()
    assert got["down"][0] and got["data"][0]
    assert "produced 0 documents" in got["data"][1] and "onnect" in got["down"][1]  # Cannot connect / ConnectionRefused
    runs = {r.id: r for r in _task_runs_of(state.state_details.flow_run_id)}
    assert runs[got["down"][2]].run_count == RETRIES + 1  # transient: every retry used
    assert runs[got["data"][2]].run_count == 1  # bad data: no retry


def test_flow_on_a_locked_run_id_fails_at_once_naming_the_holder(prefect_api, tmp_path):
    from flows.nightly import kiln_data
    from flows.params import RunParams

    storage = str(tmp_path / "art")
    p = _holder(storage, 60)
    try:
        state = kiln_data(RunParams(storage=storage, run_id="r1", overrides={"ingest.inputs": [ONE_FILE]}),
                          return_state=True)
    finally:
        p.kill()
        p.wait()
    assert state.is_failed() and f"in use by pid {p.pid}" in state.message
    assert _task_runs_of(state.state_details.flow_run_id) == []
    assert not Storage(storage).exists("r1/ingest")


# -- prefect.yaml, compose.yaml and the Dockerfile agree with the code ----------------------------------------------
def test_prefect_yaml_and_compose_match_the_served_deployments():
    import yaml

    from flows.deploy import DEFAULT_CRON, deployments

    served = {d.name: d for d in deployments()}
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in spec["deployments"]}
    assert declared.keys() == served.keys()
    for name, d in declared.items():
        module, fn = d["entrypoint"].split(":")
        assert served[name].flow_name == getattr(__import__(module[:-3].replace("/", "."), fromlist=[fn]), fn).name
        assert d["enforce_parameter_schema"] is True and d["work_pool"]["name"] == "kiln"
        crons = [(s["cron"], s["timezone"]) for s in d["schedules"]]
        assert crons == [(s.schedule.cron, s.schedule.timezone) for s in served[name].schedules]
    assert crons == [(DEFAULT_CRON, "UTC")]  # nightly-refresh, last
    (other,) = deployments(cron="30 3 * * 1-5", timezone="Europe/Paris")[-1].schedules
    assert (other.schedule.cron, other.schedule.timezone) == ("30 3 * * 1-5", "Europe/Paris")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_NIGHTLY_TZ", "America/New_York")
        assert deployments()[-1].schedules[0].schedule.timezone == "America/New_York"
    assert [d.name for d in deployments(nightly=False)] == ["pipeline", "data", "train"]

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]
    assert "postgresql+asyncpg://" in svc["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    worker_env = svc["worker"]["environment"]
    assert worker_env["KILN_STORAGE"].startswith("s3://kiln/") and worker_env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "mb -p s3/kiln" in svc["create-bucket"]["entrypoint"][-1]
    assert svc["worker"]["command"][-3:] == ["kiln", "--type", "process"] and "deploy --all" in svc["deploy"]["command"][-1]
    assert svc["serve"]["command"] == ["python", "-m", "flows.deploy"]
    assert (ROOT / svc["worker"]["build"]["context"].replace("..", ".") / svc["worker"]["build"]["dockerfile"]).is_file()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and "\nUSER ${KILN_UID}" in dockerfile
    assert '"prefect", "worker", "start", "--pool", "kiln"' in dockerfile


def test_nightly_refresh_second_snapshot_adds_only_new_documents(prefect_api, tmp_path):
    """Version v1 = one crawl file; v2 = that file again plus another: dedup against the cross-snapshot index
    keeps only v2's new pages, both versions stay published in nightly/versions.json."""
    import gzip

    from flows.nightly import nightly_refresh
    from flows.params import NightlyParams

    storage = str(tmp_path / "art")
    other = str(CRAWL / "docs.djangoproject.com-0001.warc.gz")
    v1 = nightly_refresh(NightlyParams(storage=storage, source=[ONE_FILE], version="v1"))
    # only_new=False: v1's file goes through dedup again, which must drop all of it (cross-snapshot index)
    v2 = nightly_refresh(NightlyParams(storage=storage, source=[ONE_FILE, other], version="v2", only_new=False))
    assert (v1["run_id"], v2["run_id"]) == ("nightly-v1", "nightly-v2")
    root = Storage(storage)
    d1 = root.read_json("nightly-v1/dedup/manifest.json")["counts"]
    d2 = root.read_json("nightly-v2/dedup/manifest.json")["counts"]
    across = d2["index"]["exact"] + d2["index"]["url"] + d2["index"]["near"]
    assert d2["index"]["prior_documents"] == d1["documents_out"] > 0
    assert across >= d1["documents_out"]  # every v1 page came again and was dropped as an earlier snapshot's
    assert d2["documents_out"] == d2["documents_in"] - sum(d2["removed"].values()) and across <= sum(d2["removed"].values())
    kept = root.sub("nightly-v2", "dedup")
    hosts = {json.loads(line)["metadata"]["url"].split("/")[2]
             for rel in kept.list("data", suffix=".jsonl.gz") for line in gzip.decompress(kept.read_bytes(rel)).splitlines()}
    assert hosts == {"docs.djangoproject.com"}  # nothing of the v1 snapshot (docs.python.org) is published again
    book = root.read_json("nightly/versions.json")["versions"]
    assert [v["version"] for v in book] == ["v1", "v2"] and v2["version"]["documents"] > 0
    assert [v["files"] for v in book] == [[ONE_FILE], [other, ONE_FILE]]
    assert root.exists("nightly-v1/shard/manifest.json") and root.exists("nightly-v2/shard/manifest.json")
    # the next night, no new file in the source: completed, nothing ingested or published
    v3 = nightly_refresh(NightlyParams(storage=storage, version="v3",
                                       source=[str(CRAWL / "docs.djangoproject.com-000[1].warc.gz"), ONE_FILE]))
    assert v3["version"] is None and v3["new_files"] == 0 and v3["source_files"] == 2
    assert not root.exists("nightly-v3") and len(root.read_json("nightly/versions.json")["versions"]) == 2
    # a snapshot made only of pages already in the index (only_new off: the file is ingested again): dedup removes
    # every page, completes with a counted all-duplicates result, and the chain stops without publishing
    v4 = nightly_refresh(NightlyParams(storage=storage, source=[ONE_FILE], version="v4", only_new=False))
    assert v4["version"] is None and v4["stopped_after"] == "dedup"
    d4 = root.read_json("nightly-v4/dedup/manifest.json")["counts"]
    assert d4["documents_out"] == 0 and d4["all_duplicates"] and d4["documents_in"] > 0
    assert sum(d4["removed"].values()) == d4["documents_in"]
    assert len(root.read_json("nightly/versions.json")["versions"]) == 2


def test_nightly_source_files_are_the_files_ingest_reads(tmp_path):
    """A watched folder: the version records the crawl files in it (not the folder), so a file dropped in later
    is new the next night; files ingest cannot read are left out; a source matching nothing is a clear error."""
    from conftest import load_tiny

    from flows.nightly import source_files
    from stages.core.runner import StageError

    cfg = load_tiny(tmp_path, {})
    watched = tmp_path / "incoming"
    watched.mkdir()
    (watched / "a.warc.gz").symlink_to(ONE_FILE)
    (watched / "notes.txt").write_text("not a crawl file")
    first = source_files(cfg, [str(watched)])
    assert first == [str(watched / "a.warc.gz")]
    (watched / "b.warc.gz").symlink_to(CRAWL / "docs.djangoproject.com-0001.warc.gz")
    second = source_files(cfg, [str(watched)])
    assert second == [str(watched / "a.warc.gz"), str(watched / "b.warc.gz")]
    assert [f for f in second if f not in first] == [str(watched / "b.warc.gz")]
    assert source_files(cfg, [str(watched / "*.warc.gz"), ONE_FILE]) == sorted(second + [ONE_FILE])
    with pytest.raises(StageError, match="matches no file"):
        source_files(cfg, [str(tmp_path / "nothing-*.warc.gz")])
