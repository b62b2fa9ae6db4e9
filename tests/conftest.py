"""Shared test fixtures. Real data comes from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import socket
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared" / "data").resolve()
CRAWL = SHARED / "crawl"
TINY = ROOT / "configs" / "tiny.yaml"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_configure(config):
    if not SHARED.is_dir():
        raise pytest.UsageError(f"real test data not found at {SHARED} (clone beside ../shared)")
    # S3 settings go into the environment before any test starts a process: datatrove's worker pools fork
    # from a forkserver that keeps the environment it started with, so variables set later never reach them.
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})


@pytest.fixture
def shared() -> Path:
    return SHARED


def load_tiny(tmp_path: Path, overrides: dict | None = None):
    """The tiny profile with overrides (dotted keys), e.g. {"ingest.inputs": [...]}."""
    from stages.core.config import load_config

    return load_config(TINY, overrides=overrides)


def seed_stage(storage_uri: str, run_id: str, stage: str, docs: list[dict], extra_files: dict | None = None,
               counts: dict | None = None) -> dict:
    """Write `docs` as if `stage` had produced them (datatrove JSONL + a manifest), to test a later stage
    in isolation. Each doc: {"text", "id", "metadata"}."""
    from stages.core.runner import MANIFEST
    from stages.core.storage import Storage

    out = Storage(storage_uri).sub(run_id, stage)
    payload = "".join(json.dumps(d) + "\n" for d in docs).encode()
    out.write_bytes("data/00000.jsonl.gz", gzip.compress(payload, mtime=0))
    for rel, data in (extra_files or {}).items():
        out.write_bytes(rel, data if isinstance(data, bytes) else json.dumps(data).encode())
    outputs = [{"path": p, "bytes": out.size(p), "sha256": out.sha256(p)} for p in out.list()]
    manifest = {"stage": stage, "run_id": run_id, "fingerprint": f"seeded-{stage}", "config": {}, "seed": 0,
                "inputs": {}, "outputs": outputs,
                "counts": counts or {"documents_in": len(docs), "documents_out": len(docs)},
                "metrics": {}, "wall_time_s": 0.0, "code_version": "test", "location": out.url()}
    out.write_json(MANIFEST, manifest)
    return manifest


def real_docs(n: int = 200) -> list[dict]:
    """Real article bodies from the extraction benchmark, as documents."""
    gt = json.loads((SHARED / "extraction-benchmark" / "ground-truth.json").read_text())
    docs = []
    for i, (key, val) in enumerate(sorted(gt.items())[:n]):
        text = val.get("articleBody") or ""
        if text.strip():
            docs.append({"text": text, "id": key, "metadata": {"url": val.get("url", f"https://example/{key}"),
                                                              "domain": (val.get("url") or "x/x/unknown").split("/")[2]}})
    return docs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.S)
_RANGE = re.compile(rb"^range: *bytes=(\d+)-(\d+)\r?$", re.I | re.M)


class TcpProxy:
    """A TCP proxy 127.0.0.1:port -> 127.0.0.1:target in front of a real server (moto_server), for the tests that
    need the endpoint to go away (``stop``: listener closed, every open connection reset, clients get refused /
    reset; ``start`` listens on the same port again, the server keeping its state) or need to see the traffic
    (the requests clients sent, in arrival order, and the bytes the target sent back, counted before they are forwarded,
    so a completed read has been counted whole)."""

    def __init__(self, target: int):
        self.target, self.port, self.ls = target, _free_port(), None
        self.mu, self.conns, self.down, self.accepted = threading.Lock(), [], 0, 0
        self.reqs: list[tuple[str, str, tuple[int, int] | None]] = []  # parsed requests, in arrival order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self.ls = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def _accept(self, ls) -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:  # the listener was closed: stop
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the target is down: this client is reset, the next one tried again
                c.close()
                continue
            with self.mu:
                if self.ls is not ls:  # stopped while this connection was being made: no traffic during an outage
                    c.close()
                    u.close()
                    return
                self.conns += [c, u]
                self.accepted += 1
            buf = bytearray()
            threading.Thread(target=self._pipe, args=(c, u, buf), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, None), daemon=True).start()

    def _pipe(self, a, b, buf) -> None:
        try:
            while data := a.recv(1 << 16):
                with self.mu:
                    if buf is None:
                        self.down += len(data)
                    else:  # requests parsed as they complete, so their order is arrival order across connections
                        buf += data
                        while m := _REQUEST.search(buf):  # (a PUT's body is skipped over)
                            r = _RANGE.search(m[3])
                            self.reqs.append((m[1].decode(), m[2].decode(), (int(r[1]), int(r[2])) if r else None))
                            del buf[:m.end()]
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def snapshot(self) -> tuple[int, int]:
        """(bytes received from the target so far, requests so far): a mark to measure what a read costs."""
        with self.mu:
            return self.down, len(self.reqs)

    def requests(self) -> list[tuple[str, str, tuple[int, int] | None]]:
        """(method, path, inclusive byte range or None) of every request, in arrival order (all connections)."""
        with self.mu:
            return list(self.reqs)

    def stop(self) -> None:
        if self.ls is not None:
            self.ls.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
            self.ls.close()
            self.ls = None
        with self.mu:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST, not FIN
                s.close()


@contextlib.contextmanager
def moto_server(port: int):
    """A real S3 endpoint over HTTP: moto_server on 127.0.0.1:port (state in memory), stopped on exit."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server not installed (pip install 'moto[server]')"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"moto_server did not start on {url}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """The session's moto_server, on the port pytest_configure put in AWS_ENDPOINT_URL."""
    with moto_server(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])) as url:
        yield url


def mount_tmpfs(path: Path, size_kb: int) -> bool:
    """Mount a tmpfs of ``size_kb`` at ``path`` (a full disk for tests); False without permission to mount."""
    import subprocess

    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto endpoint; yields its s3:// URL."""
    import uuid

    import boto3

    name = f"kiln-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield f"s3://{name}"


def seed_files(storage_uri: str, run_id: str, stage: str, files: dict, counts: dict | None = None,
               metrics: dict | None = None) -> dict:
    """Write arbitrary artifacts (rel path -> bytes, or a local file path) as if `stage` had produced them,
    with a manifest listing them (for stages whose outputs are not JSONL: tokenizer, shard, train)."""
    from stages.core.runner import MANIFEST
    from stages.core.storage import Storage

    out = Storage(storage_uri).sub(run_id, stage)
    for rel, data in files.items():
        if isinstance(data, (str, Path)):
            out.put_file(str(data), rel)
        else:
            out.write_bytes(rel, data)
    outputs = [{"path": p, "bytes": out.size(p), "sha256": out.sha256(p)} for p in out.list() if p != MANIFEST]
    manifest = {"stage": stage, "run_id": run_id, "fingerprint": f"seeded-{stage}", "config": {}, "seed": 0,
                "inputs": {}, "outputs": outputs, "counts": counts or {}, "metrics": metrics or {},
                "wall_time_s": 0.0, "code_version": "test", "location": out.url()}
    out.write_json(MANIFEST, manifest)
    return manifest


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (/proc/<pid>/stat state field)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
