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


# -- progress hook (flows/pipeline.py turns it into Prefect progress artifacts) ------------------------------------
def test_progress_hook_sees_start_and_100_only_after_the_manifest_and_a_failing_hook_fails_nothing(seeded):
    from stages.core.runner import progress_hook, stage_progress

    root, calls = Storage(seeded).sub("r"), []

    def hook(stage, run_id, fraction, what):
        calls.append((stage, run_id, fraction, what, root.exists(f"{stage}/manifest.json")))

    cfg = load_tiny(None, {"run.workers": 1})
    with progress_hook(hook):
        stage_progress(1, 2, "outside a stage")  # no stage running: nothing reported
        m = run_stage("normalize", cfg, seeded, "r")
        assert calls[0] == ("normalize", "r", 0.0, "started", False)
        assert calls[-1][:3] == ("normalize", "r", 1.0) and calls[-1][3] == f"complete in {m['wall_time_s']:.1f}s"
        assert calls[-1][4] and not any(c[4] for c in calls[:-1])  # 100% once the manifest exists, not before
        assert all(c[2] < 1 for c in calls[:-1])
        calls.clear()
        run_stage("normalize", cfg, seeded, "r")  # skipped: its task run still ends at 100%
        assert calls == [("normalize", "r", 1.0, "already complete", True)]

    def broken(*a):
        raise ConnectionError("the API is down")

    with progress_hook(broken):  # progress is display only: the stage completes
        m = run_stage("normalize", load_tiny(None, {"run.workers": 1, "normalize.symbol_lines": False}), seeded, "r")
    assert not m.get("skipped") and Storage(seeded).exists("r/normalize/manifest.json")


def test_progress_is_throttled_never_waits_for_a_slow_hook_and_always_reports_the_end(tmp_path, monkeypatch):
    import threading
    import time

    from stages.core import runner
    from stages.core.runner import StageContext, progress_hook

    ctx = StageContext("train", "r", None, None, None, {}, str(tmp_path))
    calls = []
    with progress_hook(lambda *a: calls.append(a[2:])):
        for step in range(1, 1001):  # a tight loop (well under PROGRESS_EVERY_S)
            ctx.progress(step, 1000, "steps")
    # the first report, then the end; a stage's own end is 99%, not 100% (the runner's, after the manifest)
    assert calls == [(0.001, "steps: 1/1000"), (runner.MAX_STAGE_PROGRESS, "steps: 1000/1000")]

    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)
    ctx, calls, entered, release = StageContext("train", "r", None, None, None, {}, str(tmp_path)), [], \
        threading.Event(), threading.Event()

    def slow(stage, run_id, fraction, what):
        if not calls:
            entered.set()
            release.wait(10)
        calls.append(fraction)

    with progress_hook(slow):
        t = threading.Thread(target=ctx.progress, args=(1, 10))
        t.start()
        assert entered.wait(10)
        t0 = time.monotonic()
        ctx.progress(2, 10)  # a report is being sent: this one is dropped at once
        assert time.monotonic() - t0 < 0.5
        threading.Timer(0.3, release.set).start()
        ctx.progress(10, 10)  # the end waits for the send in flight, then goes through
        t.join()
    assert calls == [0.1, runner.MAX_STAGE_PROGRESS]

    # a watcher polls a count (datatrove's completions/ files) until it reaches the total, then ends by itself
    ctx, calls, done = StageContext("dedup", "r", None, None, None, {}, str(tmp_path)), [], tmp_path / "completions"
    done.mkdir()
    with progress_hook(lambda *a: calls.append(a[2])):
        ctx.watch(lambda: len(list(done.iterdir())), 4, "tasks", every_s=0.02)
        for rank in range(4):
            time.sleep(0.15)
            (done / f"{rank:05d}").touch()
        t0 = time.monotonic()
        while calls[-1:] != [runner.MAX_STAGE_PROGRESS] and time.monotonic() - t0 < 5:
            time.sleep(0.02)
    assert calls[0] == 0.0 and calls[-1] == runner.MAX_STAGE_PROGRESS and calls == sorted(set(calls)), calls
    for t in [t for t in threading.enumerate() if t.name == "kiln-progress-dedup"]:
        t.join(2)
        assert not t.is_alive()  # ended by itself at 4 of 4


# -- faults: a kill mid-lock or mid-rm, storage down at release, unsafe run ids --------------------------------------
def test_unreadable_lock_is_refused_while_young_and_taken_over_once_old(tmp_path, caplog):
    """A kill between creating the lock and writing it left an empty ``.lock.json`` (now the lock is written to a
    temporary file and linked into place: never empty) and every re-run got ``RunLocked ... pid None``."""
    import os
    import time

    from stages.core.runner import LOCK, RunLocked, run_lock

    root = Storage(str(tmp_path)).sub("r")
    for content in (b"", b'{"token": "x", "pid": 12'):  # empty; cut mid-write
        root.write_bytes(LOCK, content)
        with pytest.raises(RunLocked, match=r"unreadable .*taken over once 30 s old"):
            with run_lock(str(tmp_path), "r", wait_s=0):
                pass
        old = time.time() - 60
        os.utime(root._p(LOCK), (old, old))
        caplog.clear()
        with caplog.at_level("WARNING", logger="kiln"), run_lock(str(tmp_path), "r", wait_s=0) as token:
            assert root.read_json(LOCK)["token"] == token and root.read_json(LOCK)["pid"] == os.getpid()
        assert "taking over an unreadable lock" in caplog.text
        assert os.listdir(root._p("")) == []  # released; no temporary left


def test_unreadable_lock_on_s3_is_taken_over_by_its_age(s3_bucket, monkeypatch, caplog):
    import time

    from stages.core import runner
    from stages.core.runner import LOCK, RunLocked, run_lock

    root = Storage(s3_bucket).sub("r")
    root.write_bytes(LOCK, b"")
    with pytest.raises(RunLocked, match="unreadable"):
        with run_lock(s3_bucket, "r", wait_s=0):
            pass
    monkeypatch.setattr(runner, "UNREADABLE_STALE_S", 1.0)  # S3 keeps LastModified: wait for it instead of 30 s
    time.sleep(1.5)
    with caplog.at_level("WARNING", logger="kiln"), run_lock(s3_bucket, "r", wait_s=0) as token:
        assert root.read_json(LOCK)["token"] == token
    assert "taking over an unreadable lock" in caplog.text and not root.exists(LOCK)


def test_clearing_a_stage_deletes_its_manifest_before_any_output(tmp_path):
    """``--force`` clears the stage folder first, and a plain ``rm`` deletes in directory order (locally) or key
    order, data/... before manifest.json (s3fs): killed in between, it left a manifest listing deleted files.
    The delete is stopped for real at the first output the directory order reaches before the manifest: that
    output is a tmpfs mount point (its file is deleted, the mount point cannot be: EBUSY)."""
    import json
    import os

    from conftest import mount_tmpfs

    from stages.core.runner import MANIFEST, clear_stage_folder

    for attempt in range(10):  # an output must come before the manifest in directory order, or this proves nothing
        out = tmp_path / f"r{attempt}" / "normalize"
        names = [f"d{attempt}-{i:03d}" for i in range(100)]
        for n in names:
            (out / n).mkdir(parents=True)
        (out / MANIFEST).write_text(json.dumps({"outputs": [{"path": f"{n}/x"} for n in names]}))
        order = [e.name for e in os.scandir(out)]  # the order rmtree deletes in
        if order[0] != MANIFEST:
            break
    first = order[0]  # the first output the delete reaches, before the manifest
    if not mount_tmpfs(out / first, 64):
        pytest.skip("no permission to mount a tmpfs")
    try:
        for n in names:
            (out / n / "x").write_bytes(b"data")
        with pytest.raises(OSError):
            clear_stage_folder(Storage(str(out)))
        assert not (out / first / "x").exists()  # the delete got that far
        assert not (out / MANIFEST).exists()  # and the manifest went first: nothing listed that is gone
    finally:
        subprocess.run(["umount", "-l", str(out / first)], check=False, timeout=30)


def test_skip_requires_the_outputs_the_manifest_lists(seeded, caplog):
    cfg = load_tiny(None, {"run.workers": 1})
    m = run_stage("normalize", cfg, seeded, "r")
    out = Storage(seeded).sub("r", "normalize")
    gone = m["outputs"][0]["path"]
    out.rm(gone)
    with caplog.at_level("WARNING", logger="kiln"):
        again = run_stage("normalize", cfg, seeded, "r")
    assert not again.get("skipped") and out.exists(gone)
    assert f"the manifest lists 1 outputs that are missing ({gone})" in caplog.text
    assert again["outputs"] == m["outputs"]  # the same bytes again
    assert run_stage("normalize", cfg, seeded, "r")["skipped"]


def test_lock_release_with_storage_down_never_masks_the_first_error(s3_endpoint, s3_bucket, monkeypatch, caplog):
    """Releasing the lock read it back through storage: with S3 down that raised from ``run_lock``'s finally,
    after a second retry window, and the stage's own error was lost."""
    import time

    import boto3
    from conftest import TcpProxy

    from stages.core.runner import LOCK, run_lock
    from stages.core.storage import StorageUnavailable

    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("KILN_S3_ATTEMPTS", "1")
    monkeypatch.setenv("KILN_STORAGE_RETRY_S", "1.5")
    store, bucket = Storage(s3_bucket), s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)  # around the proxy
    try:
        with caplog.at_level("WARNING", logger="kiln"), pytest.raises(ValueError, match="the stage's own error"):
            with run_lock(store, "r1", wait_s=0):
                proxy.stop()
                raise ValueError("the stage's own error")
        assert "could not release the lock" in caplog.text and "the next run takes it over" in caplog.text
        proxy.start()
        caplog.clear()
        raised = []
        with caplog.at_level("WARNING", logger="kiln"), pytest.raises(StorageUnavailable) as err:
            with run_lock(store, "r2", wait_s=0):
                proxy.stop()
                try:
                    store.sub("r2").read_bytes("shard/data.bin")  # the stage's storage error
                except StorageUnavailable:
                    raised.append(time.monotonic())
                    raise
        assert time.monotonic() - raised[0] < 1.0  # no second retry window at release
        assert "shard/data.bin" in str(err.value) and "storage is unreachable" in caplog.text
        for rid in ("r1", "r2"):  # left behind, for the next run to take over
            assert s3.list_objects_v2(Bucket=bucket, Prefix=f"{rid}/{LOCK}")["KeyCount"] == 1
    finally:
        proxy.stop()


def test_run_id_must_be_one_folder_name(tmp_path, capsys):
    from flows.cli import main

    for bad in ("../x", ".x", "a/b", "x" * 129, ""):
        with pytest.raises(StageError, match="run id must be one folder name"):
            run_stage("normalize", load_tiny(None), str(tmp_path / "st"), bad)
    assert main(["stage", "normalize", "--run-id", "../x", "--storage", str(tmp_path / "st")]) == 2
    assert "kiln: config error: --run-id must be one folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside or outside the storage


def test_cli_storage_down_for_good_says_it_in_one_line(tmp_path):
    from conftest import _free_port

    port = _free_port()  # nothing listens there
    env = {**__import__("os").environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "KILN_S3_ATTEMPTS": "1",
           "KILN_STORAGE_RETRY_S": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "normalize", "--storage", "s3://kiln-down/art",
                        "--run-id", "r"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln: storage s3://kiln-down/art/r unreachable") and f"127.0.0.1:{port}" in last, last
    assert "bucket kiln-down" in last and "re-run the same command" in last
