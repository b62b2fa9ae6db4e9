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
from pathlib import Path

import pytest

from stages.core.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
CRAWL = ROOT.parent / "shared" / "data" / "crawl"
ONE_FILE = str(CRAWL / "docs.python.org-0002.warc.gz")  # 428 KB, ~60 pages: ingest -> dedup in seconds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(api base URL, storage, log files): a Prefect server on sqlite in its own PREFECT_HOME, and the serve
    process registering Kiln's deployments against it. Both stopped at the end."""
    tmp = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_LOGGING_LEVEL="WARNING")
    server_log, serve_log = tmp / "server.log", tmp / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, cwd=tmp, stdout=open(server_log, "w"),
                              stderr=subprocess.STDOUT)
    serve = None
    try:
        _wait("server health", lambda: _health(api), 120, [server_log])
        storage = str(tmp / "art")
        serve_env = {**env, "PREFECT_API_URL": api, "KILN_STORAGE": storage, "PREFECT_LOGGING_LEVEL": "INFO"}
        serve = subprocess.Popen([sys.executable, "-m", "flows.deploy"], env=serve_env, cwd=ROOT,
                                 stdout=open(serve_log, "w"), stderr=subprocess.STDOUT)
        yield api, storage, [server_log, serve_log]
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)


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


def test_ui_run_of_pipeline_deployment_completes_and_bad_parameters_are_refused(served):
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
