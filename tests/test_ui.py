"""The Prefect UI as users see it: a real `prefect server start` on 127.0.0.1, `kiln run` against it (ingest and
normalize of one WARC file), and headless Chromium (Debian's `chromium`, driven over the DevTools protocol) on the
completed run's page. Kept as artifacts: tests/_artifacts/ui_flow_run.png (the screenshot) and .html (the DOM).

Found while writing it: `prefect server start --port P` alone serves a UI that calls the API on port 4200 (the UI's
API URL comes from PREFECT_SERVER_API_HOST/PORT or PREFECT_UI_API_URL, never from --port): every page is empty
with "Can't connect to Server API at http://127.0.0.1:4200/api". The server here sets PREFECT_SERVER_API_PORT.
The flow run page opens on its Logs tab; a deep link ``?tab=Task+Runs`` falls back to Logs (the tab is hidden
until the run has loaded), so the test clicks the tab, as a user does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import _free_port
from test_deploy import ONE_FILE, ROOT, _api, _health, _stop, _task_runs, _wait

ARTIFACTS = ROOT / "tests" / "_artifacts"  # gitignored; CI keeps it
WIDTH, HEIGHT = 1400, 1000


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's `chromium`; installed with apt-get when missing (update first only if that fails),
    skipped with apt's error when it cannot be installed (no apt, no network)."""
    exe = shutil.which("chromium")
    if exe:
        return exe
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # proxy settings, if any, reach apt
    r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=300)
        r = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    exe = shutil.which("chromium")
    if r.returncode != 0 or not exe:
        pytest.skip(f"chromium could not be installed: {(r.stderr or r.stdout).strip()[-500:]}")
    return exe


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory):
    """(server base URL, api URL, flow run, its task runs, logs): `kiln run --stages ingest,normalize` on one WARC
    file against a `prefect server start` of its own (sqlite in its own PREFECT_HOME), completed."""
    tmp = tmp_path_factory.mktemp("ui")
    port = _free_port()
    base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),  # the UI's API URL
               PREFECT_LOGGING_LEVEL="WARNING")
    log, run_log = tmp / "server.log", tmp / "run.log"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, cwd=tmp, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        _wait("server health", lambda: _health(api), 120, [log])
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--storage", str(tmp / "art"), "--run-id", "ui",
                            "--stages", "ingest,normalize", "--set", f"ingest.inputs=[{ONE_FILE}]"],
                           env={**env, "PREFECT_API_URL": api}, cwd=ROOT, stdout=open(run_log, "w"),
                           stderr=subprocess.STDOUT, timeout=300)
        assert r.returncode == 0, run_log.read_text()[-4000:]
        (run,) = _api(api, "POST", "/flow_runs/filter", {})[1]
        yield base, api, run, _task_runs(api, run["id"]), [log, run_log]
    finally:
        _stop(server)


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands on one page target over its websocket."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def __call__(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str):
        return self("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def until(self, what: str, expr: str, timeout: float = 30):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if got := self.js(expr):
                return got
            time.sleep(0.25)
        raise AssertionError(f"page never showed {what} in {timeout}s; it shows:\n{self.js('document.body.innerText')}")


@contextmanager
def browser(exe: str):
    """Headless Chromium with a fresh profile and the DevTools port on 127.0.0.1; yields a DevTools page."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="kiln-chromium-")
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = Path(profile, "DevToolsActivePort")
        port = _wait("chromium's DevTools port", lambda: active.exists() and (active.read_text().split() or [""])[0], 30)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            dt = DevTools(ws)
            dt("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
            yield dt
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


def _cls(name: str) -> str:
    """XPath predicate: the element has CSS class ``name`` (not merely a class containing it)."""
    return f"[contains(concat(' ', normalize-space(@class), ' '), ' {name} ')]"


def _text(el) -> str:
    return " ".join(" ".join(el.itertext()).split())


def test_flow_run_page_shows_the_run_its_state_and_its_task_runs(chromium, completed_run):
    import lxml.html
    from PIL import Image

    base, api, run, tasks, logs = completed_run
    assert run["state"]["type"] == "COMPLETED" and len(tasks) == 2
    ARTIFACTS.mkdir(exist_ok=True)
    png, html = ARTIFACTS / "ui_flow_run.png", ARTIFACTS / "ui_flow_run.html"
    png.unlink(missing_ok=True)
    with browser(chromium) as page:
        page("Page.navigate", url=f"{base}/runs/flow-run/{run['id']}")
        page.until("the flow run's heading and its Task Runs tab",
                   "!!document.querySelector('.page-heading-flow-run') && !!document.querySelector('li#task-runs')")
        page.js("document.querySelector('li#task-runs').click()")
        page.until(f"{len(tasks)} task runs in the Task Runs tab", "document.querySelectorAll("
                   f"'#task-runs-content .task-run-list-item').length >= {len(tasks)}")
        time.sleep(1)  # the run graph (a canvas) draws its last frame
        png.write_bytes(base64.b64decode(page("Page.captureScreenshot", format="png")["data"]))
        html.write_text(page.js("document.documentElement.outerHTML"))  # what --dump-dom prints
        badges = page.js("[...document.querySelectorAll('.state-badge.state--completed')].map(e => {"
                         "const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]})")
        url = page.js("location.href")
    assert url.endswith(f"/runs/flow-run/{run['id']}?tab=Task+Runs")

    dom = lxml.html.fromstring(html.read_text())
    (heading,) = dom.xpath(f"//header{_cls('page-heading-flow-run')}")
    assert _text(heading).startswith(f"Runs {run['name']} Completed "), _text(heading)
    assert heading.xpath(f".//*{_cls('state-badge')}{_cls('state--completed')}")
    (panel,) = dom.xpath("//section[@id='task-runs-content']")
    assert "2 Task runs (2 completed)" in _text(panel), _text(panel)[:300]
    rows = {}
    for item in panel.xpath(f".//*{_cls('task-run-list-item')}"):
        (link,) = item.xpath(".//a[starts-with(@href, '/runs/task-run/')]")
        (badge,) = item.xpath(f".//*{_cls('state-badge')}")
        rows[_text(link)] = (link.get("href").rsplit("/", 1)[1], _text(badge))
    assert rows == {t["name"]: (t["id"], "Completed") for t in tasks}, rows
    assert sorted(name.rsplit("-", 1)[0] for name in rows) == ["ingest", "normalize"]

    img = Image.open(png)
    assert img.format == "PNG" and img.size == (WIDTH, HEIGHT)
    colours = img.convert("RGB").getcolors(maxcolors=WIDTH * HEIGHT)
    assert len(colours) > 200, len(colours)  # text, badges, the run graph: not a blank or single-tone page
    assert max(n for n, _ in colours) < 0.8 * WIDTH * HEIGHT
    # the screenshot shows the Completed badges (the heading's, one per task run) where the DOM lays them out:
    # mostly Prefect's state-completed green
    assert len(badges) == 1 + len(tasks), badges
    for box in badges:
        px = img.convert("RGB").crop(tuple(round(v) for v in box)).get_flattened_data()
        green = sum(1 for r, g, b in px if g > 120 and g > r + 60 and g > b + 40)
        assert green > 0.5 * len(px), (box, green, len(px))


def test_each_stage_task_leaves_a_progress_artifact_at_100_percent(completed_run):
    """flows/pipeline.py's ProgressArtifact over the runner's progress hook: one progress artifact per stage task
    run, created at 0% when the stage started, updated to 100% once its manifest was written."""
    _, api, run, tasks, _ = completed_run
    arts = _api(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]},
                                                                 "type": {"any_": ["progress"]}}})[1]
    by_task = {t["id"]: t["name"].rsplit("-", 1)[0] for t in tasks}
    got = {by_task[a["task_run_id"]]: a for a in arts}
    assert sorted(got) == ["ingest", "normalize"] and len(arts) == 2, arts
    for stage, a in got.items():
        assert a["key"] == f"kiln-progress-ui-{stage}" and a["data"] == 100, a
        assert a["description"].startswith(f"Kiln run ui, stage {stage}: complete in "), a["description"]
        assert a["updated"] > a["created"]  # created when the stage started, then updated
    latest = _api(api, "POST", "/artifacts/latest/filter", {"artifacts": {"key": {"like_": "kiln-progress-ui-"}}})[1]
    assert {a["key"]: a["data"] for a in latest} == {"kiln-progress-ui-ingest": 100, "kiln-progress-ui-normalize": 100}


def test_report_plot_image_artifact_renders_in_the_ui(chromium, completed_run):
    """The run report's plots are Prefect image artifacts (PNG as a data URL): the UI's artifact page shows the
    funnel plot as a loaded image of the PNG's own size (not a broken image), the same bytes as in storage."""
    from PIL import Image

    base, api, run, _, _ = completed_run
    arts = _api(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]},
                                                                 "type": {"any_": ["image"]}}})[1]
    (funnel,) = [a for a in arts if a["key"] == "kiln-plot-funnel-ui"]
    head = "data:image/png;base64,"
    assert funnel["data"].startswith(head)
    raw = base64.b64decode(funnel["data"][len(head):])
    stored = funnel["description"].rsplit("(", 1)[1].rstrip(")")  # "Kiln run ui: funnel.png (<storage URL>)"
    assert stored.endswith("/ui/report/plots/funnel.png") and raw == Path(stored).read_bytes()
    png = Image.open(io.BytesIO(raw))
    with browser(chromium) as page:
        page("Page.navigate", url=f"{base}/artifacts/artifact/{funnel['id']}")
        shown = page.until("the funnel plot as a loaded image", "(() => {const i = [...document.images].find("
                           "e => e.src.startsWith('data:image/png')); return i && i.complete && i.naturalWidth > 0"
                           " && [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]})()")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "ui_plot_artifact.png").write_bytes(
            base64.b64decode(page("Page.captureScreenshot", format="png")["data"]))
    assert shown[:2] == list(png.size) and shown[2] > 300, shown
