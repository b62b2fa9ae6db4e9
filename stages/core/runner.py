"""Running one stage: fingerprints, skip-if-done, inputs from upstream manifests, manifest written last.

Layout: ``<storage>/<run_id>/<stage>/`` holds the stage's files and, written last, ``manifest.json``.
Downstream stages only read a stage whose manifest exists, and only the files its manifest lists.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stages import NEEDS, stage_module
from stages.core.config import fingerprint
from stages.core.storage import Storage

log = logging.getLogger("kiln")
MANIFEST = "manifest.json"


class StageError(Exception):
    """A stage could not produce a valid result; the message is one line meant for the user."""


class MissingInput(StageError):
    pass


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

    def input(self, stage: str) -> Storage:
        """Storage folder of an upstream stage (checked to exist by the runner)."""
        return self.root.sub(stage)

    def input_files(self, stage: str, prefix: str = "", suffix: str = "") -> list[str]:
        """Files an upstream manifest lists (relative to that stage's folder)."""
        return [o["path"] for o in self.inputs[stage]["outputs"]
                if o["path"].startswith(prefix) and o["path"].endswith(suffix)]


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


def run_stage(stage: str, cfg, storage: str | Storage, run_id: str, force: bool = False) -> dict:
    """Run one stage unless an identical run of it is already complete. Returns its manifest."""
    mod = stage_module(stage)
    base = storage if isinstance(storage, Storage) else Storage(storage)
    root = base.sub(run_id)
    inputs = load_inputs(root, stage)
    fp = stage_fingerprint(cfg, stage, inputs)
    existing = read_manifest(root, stage)
    if existing and existing.get("fingerprint") == fp and not force:
        log.info("%s: already complete (fingerprint %s), skipped", stage, fp)
        existing["skipped"] = True
        return existing

    out = root.sub(stage)
    if force or not getattr(mod, "RESUMABLE", False):
        out.rm()  # a stale or partial attempt leaves nothing behind
    # (a RESUMABLE stage, train, keeps what an interrupted attempt stored and decides itself: resume or start over)
    workdir = tempfile.mkdtemp(prefix=f"kiln-{stage}-")
    ctx = StageContext(stage, run_id, cfg, root, out, inputs, workdir)
    t0 = time.time()
    try:
        result: StageResult = mod.run(getattr(cfg, stage), ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.time() - t0

    docs_out = result.counts.get("documents_out")
    if docs_out is not None and docs_out <= 0:
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
    log.info("%s: done in %.1fs, counts %s", stage, wall, result.counts)
    return manifest
