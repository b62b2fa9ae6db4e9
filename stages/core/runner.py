"""Running one stage: fingerprints, skip-if-done, inputs from upstream manifests, manifest written last.

Layout: ``<storage>/<run_id>/<stage>/`` holds the stage's files and, written last, ``manifest.json``.
Downstream stages only read a stage whose manifest exists, and only the files its manifest lists.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from stages import NEEDS, stage_module
from stages.core.config import fingerprint
from stages.core.storage import Storage, StorageUnavailable, _retrying

log = logging.getLogger("kiln")
MANIFEST = "manifest.json"


class StageError(Exception):
    """A stage could not produce a valid result; the message is one line meant for the user."""


class MissingInput(StageError):
    pass


class RunLocked(StageError):
    """Another process holds the run's lock (the message names it)."""


# -- names used as one folder in storage: run ids (--run-id, the profile's name) and dedup.snapshot -------------
SAFE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"  # letters, digits, . _ -; not starting with "."; <= 128 chars
NAME_RULE = "one folder name (letters, digits, '.', '_', '-'; not starting with '.'; at most 128 characters)"


def name_problem(value, key: str) -> str | None:
    """Why ``value`` (given as ``key``) cannot be one folder name in storage, or None. ``--run-id ../x`` wrote
    outside the storage folder before this check; Prefect forms use the same pattern (flows/params.py)."""
    if isinstance(value, str) and re.fullmatch(SAFE_NAME, value):
        return None
    return f"{key} must be {NAME_RULE}, got {value!r}"


def check_name(value, key: str) -> str:
    """``value`` if it is a safe folder name, else StageError naming ``key``."""
    if (why := name_problem(value, key)):
        raise StageError(why)
    return value


@dataclass
class StageResult:
    """What a stage returns: the files it wrote (relative to its folder) and what it did."""

    outputs: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("kiln")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if sha:
            v += f"+g{sha}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


@dataclass
class StageContext:
    stage: str
    run_id: str
    cfg: Any  # the whole KilnConfig (stages use their own section, plus cfg.run)
    root: Storage  # <storage>/<run_id>
    out: Storage  # <storage>/<run_id>/<stage>
    inputs: dict[str, dict]  # upstream stage -> its manifest
    workdir: str  # local scratch space, removed after the stage
    _sent: list = field(default_factory=lambda: [float("-inf"), -1.0], init=False, repr=False)  # [when, fraction]
    _mu: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _sending: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _watchers: list = field(default_factory=list, init=False, repr=False)

    def progress(self, done: float, total: float, what: str = "") -> None:
        """Report ``done`` of ``total`` (steps, tasks, files; ``what`` names them) to the progress hook
        (``set_progress_hook``; none by default: free). Throttled to one call per ``PROGRESS_EVERY_S`` and dropped
        while a previous report is still being sent (a slow API never holds a stage up); ``done >= total`` always
        goes through. A stage's own reports stop at 99%: 100% is the runner's, once the manifest is written (a
        stage that runs several pipelines, dedup, reaches 99% once per pipeline; ``what`` tells them apart).
        Thread-safe; a hook that raises is logged, never fails the stage."""
        frac = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
        said = f"{done:g}/{total:g}"  # "steps: 40/200"
        self._report(min(frac, MAX_STAGE_PROGRESS), f"{what}: {said}" if what else said, force=frac >= 1.0)

    def _report(self, frac: float, what: str, force: bool) -> None:
        if _progress_hook is None:
            return
        with self._mu:
            if not force and (time.monotonic() - self._sent[0] < PROGRESS_EVERY_S or frac == self._sent[1]):
                return
        if not self._sending.acquire(blocking=force):  # dropped: the throttle still counts from the last sent
            return
        with self._mu:
            self._sent[:] = [time.monotonic(), frac]
        try:
            _call_hook(self.stage, self.run_id, frac, what)
        finally:
            self._sending.release()

    def watch(self, count: Callable[[], float], total: float, what: str = "", every_s: float = 1.0) -> threading.Event:
        """Report ``count()`` of ``total`` every ``every_s`` from a daemon thread, for work that gives no
        callback (datatrove's executors: count their ``completions/`` files). It stops once ``count() >= total``,
        when the stage's ``run`` returns or raises (the runner stops every watcher), or when the returned Event
        is set. A ``count`` that raises (a folder not there yet) is tried again at the next tick."""
        stop = threading.Event()
        if _progress_hook is None:  # nobody listens (the CLI): no polling (on S3 a listing per tick)
            stop.set()
            return stop
        self._watchers.append(stop)

        def poll():
            while not stop.is_set():
                try:
                    n = count()
                    self.progress(n, total, what)
                    if n >= total:
                        return
                except Exception as e:
                    log.debug("%s: progress count failed: %s", self.stage, e)
                stop.wait(every_s)

        threading.Thread(target=poll, daemon=True, name=f"kiln-progress-{self.stage}").start()
        return stop

    def input(self, stage: str) -> Storage:
        """Storage folder of an upstream stage (checked to exist by the runner)."""
        return self.root.sub(stage)

    def input_files(self, stage: str, prefix: str = "", suffix: str = "") -> list[str]:
        """Files an upstream manifest lists (relative to that stage's folder)."""
        return [o["path"] for o in self.inputs[stage]["outputs"]
                if o["path"].startswith(prefix) and o["path"].endswith(suffix)]


# -- progress: stages report it, whoever runs them (the Prefect flow) shows it -----------------------------------
PROGRESS_EVERY_S = 1.0
MAX_STAGE_PROGRESS = 0.99
ProgressHook = Callable[[str, str, float, str], None]  # (stage, run_id, fraction 0..1, what)
_progress_hook: ProgressHook | None = None  # process-wide: stage threads (a log pump, a poller) report too
_current: list[StageContext] = []  # the stage this process is running (stage_progress reports to it)


def set_progress_hook(fn: ProgressHook | None) -> ProgressHook | None:
    """Install the process-wide progress hook (None: off); returns the previous one. The Prefect flow installs
    one per stage task (flows/pipeline.py: a progress artifact); stages never see Prefect."""
    global _progress_hook
    prev, _progress_hook = _progress_hook, fn
    return prev


@contextmanager
def progress_hook(fn: ProgressHook | None):
    prev = set_progress_hook(fn)
    try:
        yield fn
    finally:
        set_progress_hook(prev)


def _call_hook(stage: str, run_id: str, frac: float, what: str) -> None:
    hook = _progress_hook
    if hook is not None:
        try:
            hook(stage, run_id, frac, what)
        except Exception as e:  # progress is display only
            log.warning("%s: progress hook failed: %s", stage, e)


def stage_progress(done: float, total: float, what: str = "") -> None:
    """``ctx.progress`` of the stage this process is running, for code that has no ctx (train's log pump);
    a no-op outside a stage (e.g. ``stages.train.join_node``)."""
    if _current:
        _current[-1].progress(done, total, what)


def read_manifest(root: Storage, stage: str) -> dict | None:
    if not root.exists(f"{stage}/{MANIFEST}"):
        return None
    return root.read_json(f"{stage}/{MANIFEST}")


def manifest_hash(m: dict) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def stage_fingerprint(cfg, stage: str, inputs: dict[str, dict]) -> str:
    """Hash of what a stage's output depends on: its config, the seed, its inputs' manifests, and the content of
    files outside the DAG it reads (a stage module's optional ``external_inputs(section, cfg) -> dict``)."""
    external = getattr(stage_module(stage), "external_inputs", None)
    return fingerprint({
        "stage": stage,
        "config": getattr(cfg, stage).model_dump(mode="json"),
        "seed": cfg.run.seed,
        "inputs": {k: manifest_hash(v) for k, v in sorted(inputs.items())},
        **({"external": external(getattr(cfg, stage), cfg)} if external else {}),
    })


def load_inputs(root: Storage, stage: str) -> dict[str, dict]:
    inputs = {}
    for dep in NEEDS[stage]:
        m = read_manifest(root, dep)
        if m is None:
            raise MissingInput(f"stage '{stage}' needs the output of '{dep}' in {root.url()}, "
                               f"which is missing: run `kiln stage {dep}` first")
        inputs[dep] = m
    return inputs


# -- one writer per run id ------------------------------------------------------------------------------------
LOCK = ".lock.json"
_held: dict[str, list] = {}  # lock URL -> [token, depth]: re-entrant within a process (a flow holding the
_held_mu = threading.Lock()  # lock for its whole chain calls run_stage, which takes it again)


UNREADABLE_STALE_S = 30.0  # a lock file that exists but cannot be parsed, older than this (mtime), is stale


def _lock_info(root: Storage) -> dict | None:
    """The lock's content; None if it is absent or unreadable (empty, cut, not a JSON object). Storage errors
    (StorageUnavailable) propagate."""
    try:
        info = json.loads(root.read_bytes(LOCK))
    except (FileNotFoundError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _lock_age(root: Storage) -> float | None:
    """Seconds since the lock file was last written (its mtime / S3 LastModified); None if it is gone."""
    try:
        root.fs.invalidate_cache()
        info = root.fs.info(root._p(LOCK))
    except FileNotFoundError:
        return None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return time.time() - float(mtime) if mtime is not None else None


_lock_age = _retrying(_lock_age)  # remote: retried on transient errors like every Storage operation


def _alive(info: dict, stale_s: float) -> bool:
    """A holder is gone when its process is dead (same host) or its heartbeat is older than ``stale_s``."""
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OSError, ValueError, KeyError, TypeError):
            pass
    try:
        return time.time() - float(info.get("heartbeat", 0)) < stale_s
    except (TypeError, ValueError):
        return False


def _put_if_absent(root: Storage, data: bytes) -> None:
    """One conditional PUT (If-None-Match: *): atomic (a PUT is all or nothing) and exclusive (412 ->
    FileExistsError). Retried whole on transient errors like every remote Storage operation (a concurrent
    conditional PUT answers 409, EBUSY: retried, then 412)."""
    root.fs.pipe_file(root._p(LOCK), data, mode="create")


_put_if_absent = _retrying(_put_if_absent)


def _create_exclusive(root: Storage, data: bytes, token: str) -> bool:
    """Write the lock, whole, only if absent. Locally: the content goes to ``<lock>.tmp-<uuid>`` first, then
    ``os.link`` names it (atomic and exclusive: FileExistsError = taken): a kill at any point leaves either no
    lock or a complete one (O_EXCL then write left an empty lock when killed in between, and every re-run got
    ``RunLocked ... pid None``). On S3 a conditional PUT (``_put_if_absent``); if a retried PUT finds the lock
    there and it carries our token, our first attempt landed: ours."""
    path = root._p(LOCK)
    if root.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except OSError as e:  # a filesystem without hard links: O_EXCL, then the write (not atomic)
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    try:
        _put_if_absent(root, data)
        root.fs.invalidate_cache()
        return True
    except FileExistsError:
        root.fs.invalidate_cache()
        return (_lock_info(root) or {}).get("token") == token


@contextmanager
def run_lock(storage: str | Storage, run_id: str, purpose: str = "", wait_s: float | None = None,
             stale_s: float | None = None):
    """Hold ``<storage>/<run_id>/.lock.json`` (owner pid, host, purpose, start, heartbeat) while writing the run.

    A second holder waits up to ``wait_s`` (default $KILN_LOCK_WAIT_S, else 0) then gets RunLocked naming the
    holder. The holder's thread refreshes the heartbeat every ``stale_s``/4; a lock whose process is dead (same
    host) or whose heartbeat is older than ``stale_s`` (default $KILN_LOCK_STALE_S, else 120 s: a dead host) is
    taken over, and so is a lock file that cannot be read (empty, cut) once older than ``UNREADABLE_STALE_S``
    by mtime. Creation is exclusive and whole (``_create_exclusive``); a takeover of a stale lock is
    best-effort (two processes taking over the same stale lock within one poll could both proceed). Releasing
    never raises: if storage is down the lock stays, with a warning, and the next run takes it over."""
    base = storage if isinstance(storage, Storage) else Storage(storage)
    with folder_lock(base.sub(check_name(run_id, "run id")), f"run '{run_id}'", purpose, wait_s, stale_s) as token:
        yield token


@contextmanager
def folder_lock(root: Storage, what: str, purpose: str = "", wait_s: float | None = None,
                stale_s: float | None = None, poll_s: float = 1.0):
    """``run_lock`` on any folder: holds ``<root>/.lock.json``; ``what`` names the folder in messages (e.g. the
    dedup index, stages/dedup/index.py); a waiter polls every ``poll_s`` (+-50%: waiters do not move in step)."""
    key = root.url(LOCK)
    with _held_mu:
        if key in _held:
            _held[key][1] += 1
            mine = True
        else:
            mine = False
    if mine:
        try:
            yield _held[key][0]
        finally:
            with _held_mu:
                _held[key][1] -= 1
        return
    wait_s = float(os.environ.get("KILN_LOCK_WAIT_S", 0)) if wait_s is None else wait_s
    stale_s = float(os.environ.get("KILN_LOCK_STALE_S", 120)) if stale_s is None else stale_s
    token = uuid.uuid4().hex
    info = {"token": token, "pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": time.time()}
    deadline = time.time() + wait_s
    while not _create_exclusive(root, json.dumps(info).encode(), token):
        holder = _lock_info(root)
        if holder is None:
            age = _lock_age(root)
            if age is None:  # released meanwhile: try again at once
                continue
            if age > UNREADABLE_STALE_S:
                log.warning("%s: taking over an unreadable lock %s (last written %.0f s ago)", what, key, age)
                root.rm(LOCK)
                continue
        elif not _alive(holder, stale_s):
            log.warning("%s: taking over a stale lock of pid %s on %s (%s)", what, holder.get("pid"),
                        holder.get("host"), holder.get("purpose"))
            root.rm(LOCK)
            continue
        if time.time() >= deadline:
            if holder is None:
                raise RunLocked(f"{what} in {root.url()} is locked by an unreadable {key} (being written, or left "
                                f"by a killed process: taken over once {UNREADABLE_STALE_S:.0f} s old)")
            raise RunLocked(f"{what} in {root.url()} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                            f"({holder.get('purpose') or 'unknown'}) since {holder.get('acquired_at')}; wait for "
                            f"it, or delete {key} if that process is gone")
        time.sleep(min(poll_s * random.uniform(0.5, 1.5), max(0.01, deadline - time.time())))
    with _held_mu:
        _held[key] = [token, 1]
    stop = threading.Event()

    def beat():
        while not stop.wait(stale_s / 4):
            try:
                cur = _lock_info(root)
                if not cur or cur.get("token") != token:
                    log.error("%s: lost the lock to %s", what, cur)
                    return
                if not stop.is_set():  # one attempt (no storage-level retry window): a missed beat is harmless
                    Storage.write_bytes.__wrapped__(root, LOCK, json.dumps({**info, "heartbeat": time.time()}).encode())
                    if stop.is_set():  # released while this write was in flight: it re-created our lock
                        cur = _lock_info(root)
                        if cur and cur.get("token") == token:
                            root.rm(LOCK)
            except Exception as e:  # storage down: the holder's own work fails (or rides it out) by itself
                log.warning("%s: lock heartbeat failed (%s: %s)", what, type(e).__name__, e)

    t = threading.Thread(target=beat, daemon=True, name=f"kiln-lock-{os.path.basename(root.uri)}")
    t.start()
    failure: BaseException | None = None
    try:
        yield token
    except BaseException as e:
        failure = e
        raise
    finally:
        stop.set()
        t.join(timeout=5)  # a heartbeat write still in flight: left behind (daemon); it removes what it re-wrote
        with _held_mu:
            _held.pop(key, None)
        _release(root, key, token, what, failure)


def _release(root: Storage, key: str, token: str, what: str, failure: BaseException | None) -> None:
    """Remove our lock; never raises (it ran in ``finally`` and masked the error that got there, e.g. storage
    going down, after a second retry window). This storage already found unreachable (the error names its
    endpoint and bucket): not even tried."""
    why = None
    if isinstance(failure, StorageUnavailable) and failure.endpoint == root.endpoint():
        why = "storage is unreachable"
    else:
        try:
            cur = _lock_info(root)
            if cur and cur.get("token") == token:
                root.rm(LOCK)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
    if why:
        log.warning("%s: could not release the lock %s (%s); the next run takes it over (at once on this host, "
                    "else once its heartbeat is older than $KILN_LOCK_STALE_S)", what, key, why)


def clear_stage_folder(out: Storage) -> None:
    """Remove a stage's folder, its manifest first: a kill in the middle leaves files without a manifest (a
    partial attempt, cleared by the next run), never a manifest listing files already deleted (``rm`` of the
    folder deletes in directory order)."""
    if out.exists(MANIFEST):
        out.rm(MANIFEST)
    out.rm()


def _missing_outputs(out: Storage, manifest: dict) -> list[str]:
    """Outputs the manifest lists that are not there (existence only: one listing, no hashing)."""
    present = set(out.list())
    return [o["path"] for o in manifest.get("outputs", []) if o["path"] not in present]


def run_stage(stage: str, cfg, storage: str | Storage, run_id: str, force: bool = False) -> dict:
    """Run one stage unless an identical run of it is already complete (same fingerprint, and every output its
    manifest lists exists: else it runs again, with a warning). Returns its manifest.
    Holds the run's lock (``run_lock``) throughout: two processes never write one run id at once."""
    base = storage if isinstance(storage, Storage) else Storage(storage)
    with run_lock(base, run_id, purpose=f"stage {stage}"):
        return _run_stage(stage, cfg, base, run_id, force)


def _run_stage(stage: str, cfg, base: Storage, run_id: str, force: bool) -> dict:
    mod = stage_module(stage)
    root = base.sub(run_id)
    inputs = load_inputs(root, stage)
    fp = stage_fingerprint(cfg, stage, inputs)
    existing = read_manifest(root, stage)
    out = root.sub(stage)
    if existing and existing.get("fingerprint") == fp and not force:
        missing = _missing_outputs(out, existing)
        if not missing:
            log.info("%s: already complete (fingerprint %s), skipped", stage, fp)
            existing["skipped"] = True
            _call_hook(stage, run_id, 1.0, "already complete")
            return existing
        log.warning("%s: the manifest lists %d outputs that are missing (%s%s): running the stage again", stage,
                    len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")

    if force or not getattr(mod, "RESUMABLE", False):
        clear_stage_folder(out)  # a stale or partial attempt leaves nothing behind
    # (a RESUMABLE stage, train, keeps what an interrupted attempt stored and decides itself: resume or start over)
    workdir = tempfile.mkdtemp(prefix=f"kiln-{stage}-")
    ctx = StageContext(stage, run_id, cfg, root, out, inputs, workdir)
    t0 = time.time()
    ctx._report(0.0, "started", force=True)
    _current.append(ctx)
    try:
        result: StageResult = mod.run(getattr(cfg, stage), ctx)
    finally:
        _current[:] = [c for c in _current if c is not ctx]
        for stop in ctx._watchers:
            stop.set()
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.time() - t0

    docs_out = result.counts.get("documents_out")
    if docs_out is not None and docs_out <= 0 and not result.counts.get("all_duplicates"):
        removed = {k: v for k, v in (result.counts.get("removed") or {}).items() if v}
        files = {k: v for k, v in (result.counts.get("files_skipped") or {}).items() if v}
        why = f"removed: {removed or 'none'}" + (f"; files skipped: {files}" if files else "")
        raise StageError(f"stage '{stage}' produced 0 documents from {result.counts.get('documents_in', 0)} "
                         f"in ({why}); no manifest written")
    outputs = []
    for rel in sorted(set(result.outputs)):
        if not out.exists(rel):
            raise StageError(f"stage '{stage}' declared output '{rel}' but did not write it")
        outputs.append({"path": rel, "bytes": out.size(rel), "sha256": out.sha256(rel)})
    manifest = {
        "stage": stage,
        "run_id": run_id,
        "fingerprint": fp,
        "config": getattr(cfg, stage).model_dump(mode="json"),
        "seed": cfg.run.seed,
        "inputs": {k: {"manifest_sha256": manifest_hash(v), "fingerprint": v["fingerprint"]}
                   for k, v in sorted(inputs.items())},
        "outputs": outputs,
        "counts": result.counts,
        "metrics": result.metrics,
        "wall_time_s": round(wall, 3),
        "code_version": code_version(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "location": out.url(),
    }
    out.write_json(MANIFEST, manifest)  # last: the stage is complete only now
    ctx._report(1.0, f"complete in {wall:.1f}s", force=True)
    log.info("%s: done in %.1fs, counts %s", stage, wall, result.counts)
    return manifest
