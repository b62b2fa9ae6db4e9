"""Faults outside the stage: the S3 endpoint going away (and coming back), and a full disk under the shard writer.

S3: a moto_server of this module's own, reached through a TCP proxy on another port that the test stops (listener
closed, every open connection reset: clients get connection refused/reset) and starts again on the same port,
while moto keeps its state. That is an outage of the endpoint, not a fresh empty server (a restarted moto would
have lost every object: a different scenario, data loss, which no retry can fix).
Disk full: a 1-2 MB tmpfs mounted at the storage folder (we run as root; else RLIMIT_FSIZE in this process, writes
past the limit fail with EFBIG), the upstream copied in, the shard stage's outputs do not fit.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid

import boto3
import pytest
from conftest import ROOT, TcpProxy, _free_port, load_tiny, moto_server, mount_tmpfs
from test_reweight import mixed_docs, seed_split

from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage

# the shard's own settings as tests/test_shard.py runs it (two tasks, one after the other, in the stage's process)
FAST = {"run.tasks": 2, "run.workers": 1, "tokenizer.vocab_size": 2048, "shard.inprocess_below_mb": 0}
RUN = "r"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server (state in memory, kept across proxy outages) behind a TcpProxy; a bucket holding reweight's output
    (real documents, two files) and a trained tokenizer; the shard stage's outputs of an uninterrupted run."""
    port = _free_port()
    proxy = TcpProxy(port)
    old = os.environ.get("AWS_ENDPOINT_URL")
    with moto_server(port):
        proxy.start()
        try:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url  # Storage picks the endpoint up when created
            bucket = f"kiln-faults-{uuid.uuid4().hex[:8]}"
            direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")  # around the proxy
            direct.create_bucket(Bucket=bucket)
            store = f"s3://{bucket}"
            cfg = load_tiny(None, FAST)
            seed_split(store, RUN, "reweight", mixed_docs(60, 60, 10))
            tok = run_stage("tokenizer", cfg, store, RUN)
            ref = run_stage("shard", cfg, store, RUN)
            Storage(store).sub(RUN).rm("shard")
            yield {"store": store, "bucket": bucket, "proxy": proxy, "direct": direct, "ref": ref, "tokenizer": tok}
        finally:
            proxy.stop()
            if old is None:
                os.environ.pop("AWS_ENDPOINT_URL", None)
            else:
                os.environ["AWS_ENDPOINT_URL"] = old


@contextlib.contextmanager
def outage(s3: dict, proc: subprocess.Popen):
    """Around a test that stops the endpoint under a running `kiln`: whatever fails, the endpoint comes back and
    the child is gone afterwards (later tests of the module share the endpoint and the run's lock)."""
    try:
        yield
    finally:
        if s3["proxy"].ls is None:
            s3["proxy"].start()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def kiln(stage: str, s3: dict, env: dict | None = None) -> subprocess.Popen:
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", stage, "--storage", s3["store"],
                             "--run-id", RUN, *sets], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "AWS_ENDPOINT_URL": s3["proxy"].url, "KILN_LOCK_WAIT_S": "0",
                                            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})})


def lock_present(s3: dict) -> bool:
    """Whether the run's lock object exists, asked of moto directly (not through the proxy)."""
    return s3["direct"].list_objects_v2(Bucket=s3["bucket"], Prefix=f"{RUN}/.lock.json")["KeyCount"] > 0


def wait_for_lock(s3: dict, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not lock_present(s3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the stage took no lock in {timeout_s:.0f} s"
        time.sleep(0.02)


def shard_outputs(s3: dict) -> list[dict] | None:
    st = Storage(s3["store"]).sub(RUN)
    return st.read_json("shard/manifest.json")["outputs"] if st.exists("shard/manifest.json") else None


def test_storage_retries_connection_errors_not_4xx(s3, monkeypatch):
    """A missing object (404) fails at once; an unreachable endpoint is retried through the window, then
    StorageUnavailable (a ConnectionError: Prefect's retry rule still sees it as transient) names endpoint and
    bucket."""
    from flows.params import is_transient
    from stages.core.storage import StorageUnavailable

    monkeypatch.setenv("KILN_S3_ATTEMPTS", "1")
    monkeypatch.setenv("KILN_STORAGE_RETRY_S", "2")
    st = Storage(s3["store"]).sub(RUN)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        st.read_bytes("no/such/object")
    assert time.monotonic() - t0 < 1.5
    s3["proxy"].stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as e:
            st.read_bytes("tokenizer/manifest.json")
        assert 1.0 < time.monotonic() - t0 < 10
    finally:
        s3["proxy"].start()
    assert s3["proxy"].url in str(e.value) and f"bucket {s3['bucket']}" in str(e.value)
    assert is_transient(e.value)
    assert st.read_json("tokenizer/manifest.json") == s3["tokenizer"]  # back


def test_s3_outage_mid_stage_is_retried_and_the_run_completes(s3):
    """The endpoint disappears right after the shard stage took its lock and comes back 3 s later: the stage
    waits it out (botocore standard retries + Storage retries) and writes the same outputs as an uninterrupted
    run."""
    proc = kiln("shard", s3)
    with outage(s3, proc):
        wait_for_lock(s3, proc)
        s3["proxy"].stop()
        time.sleep(3)
        assert proc.poll() is None, "the stage finished during the outage: it did not need the endpoint"
        s3["proxy"].start()
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert shard_outputs(s3) == s3["ref"]["outputs"]
    assert not lock_present(s3)
    Storage(s3["store"]).sub(RUN).rm("shard")


def test_s3_down_for_good_fails_clearly_and_a_later_rerun_resumes(s3):
    """The endpoint disappears for good mid-stage: the run gives up after its retry window with a last line
    naming the endpoint and the bucket, leaves no manifest; once the endpoint is back, the same command
    completes (taking over the dead run's lock) and upstream stages stay complete (skipped)."""
    proxy = s3["proxy"]
    proc = kiln("shard", s3, env={"KILN_S3_ATTEMPTS": "2", "KILN_STORAGE_RETRY_S": "3"})
    with outage(s3, proc):
        wait_for_lock(s3, proc)
        proxy.stop()
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
        proxy.start()
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert proxy.url in last and s3["bucket"] in last, err[-3000:]
    assert "unreachable" in last and took < 60
    assert shard_outputs(s3) is None  # no manifest: nothing the next stage would read
    assert lock_present(s3)  # it could not release its lock while the endpoint was gone

    again = kiln("shard", s3)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err[-3000:]
    assert "taking over a stale lock" in err
    assert shard_outputs(s3) == s3["ref"]["outputs"]
    assert Storage(s3["store"]).sub(RUN).read_json("tokenizer/manifest.json") == s3["tokenizer"]  # not redone


# -- disk full ----------------------------------------------------------------------------------------------------
def test_disk_full_while_writing_shards_fails_clearly_and_leaves_no_shard(tmp_path):
    cfg = load_tiny(tmp_path, FAST)
    src = tmp_path / "src"
    seed_split(str(src), RUN, "reweight", mixed_docs(60, 60, 10))
    run_stage("tokenizer", cfg, str(src), RUN)
    ref = run_stage("shard", cfg, str(src), RUN)  # with room: it completes
    assert ref["counts"]["documents_out"] == ref["counts"]["documents_in"] > 0
    shard_kb = sum(o["bytes"] for o in ref["outputs"]) // 1024
    Storage(str(src)).sub(RUN).rm("shard")
    used_kb = sum(f.stat().st_size // 4096 * 4 + 4 for f in src.rglob("*") if f.is_file())  # 4 KB pages
    full = tmp_path / "full"
    full.mkdir()
    mounted = mount_tmpfs(full, used_kb + shard_kb // 2)  # the upstream and half the shard's outputs fit
    try:
        shutil.copytree(src, full, dirs_exist_ok=True)
        if mounted:
            with pytest.raises(StageError) as e:
                run_stage("shard", cfg, str(full), RUN)
        else:  # no mount permission: files may not grow past 64 KB (EFBIG instead of SIGXFSZ)
            import resource
            import signal

            old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            old = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, old[1]))
            try:
                with pytest.raises(StageError) as e:
                    run_stage("shard", cfg, str(full), RUN)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, old)
                signal.signal(signal.SIGXFSZ, old_sig)
        msg = str(e.value)
        assert msg.startswith("shard: cannot write ") and str(full / RUN / "shard") in msg
        assert ("No space left on device" if mounted else "File too large") in msg
        left = sorted(str(p.relative_to(full / RUN / "shard")) for p in (full / RUN / "shard").rglob("*")
                      if p.is_file() and "logs" not in p.parts)
        assert left == [], left  # no shard, index, manifest nor temporary file
        assert not (full / RUN / ".lock.json").exists()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(full)], check=False, timeout=30)  # -l: a log sink may be open
