"""The whole DAG as one Prefect flow: one task run per stage, in dependency order.

Parameters are plain values (a profile path, a storage URI, a run id), so the Prefect UI renders a form
and a worker can run the flow with nothing but the repository.
"""

from __future__ import annotations

import base64
import contextvars
import re
import threading

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_image_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flows import DEFAULT_CONFIG
from flows.params import RETRIES, RETRY_DELAYS, retry_transient
from stages import STAGES
from stages.core import report, summary
from stages.core.config import ConfigError, default_run_id, load_config, storage_uri
from stages.core.runner import RunLocked, StageError, progress_hook, run_lock, run_stage
from stages.core.storage import Storage


@task(cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=0.2,
      retry_condition_fn=retry_transient)  # storage / network hiccups only (flows/params.py), never bad data
def stage_task(stage: str, config: str, overrides: dict, storage: str, run_id: str, force: bool):
    try:
        with progress_hook(ProgressArtifact()):  # the stage's progress bar on this task run (and the Artifacts page)
            manifest = run_stage(stage, load_config(config, overrides), storage, run_id, force=force)
    except (StageError, ConfigError) as e:  # the user's problem, said in one line: no traceback
        get_run_logger().error("%s", e)
        return Failed(message=str(e))
    c = manifest.get("counts", {})
    state = "skipped (already complete)" if manifest.get("skipped") else f"{manifest['wall_time_s']:.1f}s"
    docs = f"; documents {c['documents_in']} -> {c['documents_out']}" if "documents_out" in c else ""
    get_run_logger().info("%s: %s%s", stage, state, docs)
    return {"stage": stage, "location": manifest["location"], "fingerprint": manifest["fingerprint"],
            "counts": c, "skipped": bool(manifest.get("skipped"))}


class ProgressArtifact:
    """A stage's progress as one Prefect progress artifact of its task run, key ``kiln-progress-<run_id>-<stage>``
    (the latest attempt is the key's current version): created at the stage's first report (0%, from the runner),
    updated by later ones (the runner throttles them to ~1/s; 100% only once the stage's manifest is written).
    Made in the task run's thread, it keeps that thread's Prefect context (client settings, task run) and runs
    reports from other threads (train's log pump, a datatrove poller) in a copy of it."""

    def __init__(self):
        self.context = contextvars.copy_context()
        self.ids: dict[str, object] = {}
        self.mu = threading.Lock()

    def __call__(self, stage: str, run_id: str, fraction: float, what: str) -> None:
        self.context.copy().run(self._send, stage, run_id, round(100 * fraction, 1), what)

    def _send(self, stage: str, run_id: str, percent: float, what: str) -> None:
        description = f"Kiln run {run_id}, stage {stage}: {what or f'{percent:g}%'}"
        with self.mu:
            if stage not in self.ids:
                self.ids[stage] = create_progress_artifact(progress=percent, key=progress_key(run_id, stage),
                                                           description=description)
                return
        update_progress_artifact(self.ids[stage], progress=percent, description=description)


def progress_key(run_id: str, stage: str) -> str:
    return artifact_key("progress", f"{run_id}-{stage}")


@flow(name="kiln-pipeline", log_prints=True)
def pipeline(config: str = DEFAULT_CONFIG, storage: str | None = None, run_id: str | None = None,
             stages: list[str] | None = None, overrides: dict | None = None, force: bool = False) -> dict:
    """Crawl to checkpoint. `stages` limits the run to some stages (their inputs must exist)."""
    overrides = overrides or {}
    try:
        cfg = load_config(config, overrides)  # a bad profile fails here, before any stage starts
    except ConfigError as e:
        get_run_logger().error("config error: %s", e)
        return Failed(message=f"config error: {e}")
    uri, rid = storage_uri(cfg, storage), run_id or default_run_id(cfg)
    selected = [s for s in STAGES if not stages or s in stages]
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    try:
        with run_lock(uri, rid, purpose="flow run"):  # one writer per run id: a second run is refused by name
            return _chain(config, overrides, uri, rid, selected, force)
    except StageError as e:  # RunLocked (another run holds the id), or a run id that is not one folder name
        get_run_logger().error("%s", e)
        return Failed(message=str(e))


def _chain(config: str, overrides: dict, uri: str, rid: str, selected: list[str], force: bool):
    ran = {}
    for stage in selected:  # the DAG is a chain in this order: each stage waits for NEEDS[stage]
        state = stage_task.with_options(name=stage)(stage, config, overrides, uri, rid, force, return_state=True)
        if not state.is_completed():  # later stages do not start
            return Failed(message=state.message or f"stage '{stage}' failed")
        ran[stage] = state.result()
    result = summary.collect(uri, rid)
    for row in result["stages"]:
        row["skipped"] = ran.get(row["stage"], {}).get("skipped", False)
    create_markdown_artifact(key=artifact_key("summary", rid), markdown="```\n" + summary.render(result) + "\n```",
                             description=f"Kiln run {rid}: data funnel, checkpoint and evaluation")
    result["report"] = write_and_publish_report(uri, rid)["files"]["report.md"]
    return result


def artifact_key(kind: str, run_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", f"kiln-{kind}-{run_id}".lower())).strip("-")[:100]


def write_and_publish_report(uri: str, run_id: str) -> dict:
    """Write ``<run_id>/report/`` (report.md, report.json, plots/*.png) and publish it as artifacts of the
    current flow run; returns the report (``files``: name -> storage URL)."""
    rep = report.write(uri, run_id)
    publish_report(rep)
    return rep


def publish_report(rep: dict) -> dict[str, str]:
    """The run report as Prefect artifacts (inside a flow run): the removed samples of every stage that keeps
    them as tables (``kiln-removed-<stage>-<run>``), report.md as markdown (plots linked by their storage URLs,
    removed samples by file and by their table artifact in the UI: ``$PREFECT_UI_URL/artifacts/key/<key>``),
    every plot as an image artifact (``kiln-plot-<name>-<run>``, the PNG as a data URL), the funnel and the
    evaluation metrics as tables. Returns artifact key -> kind."""
    from prefect.settings import PREFECT_UI_URL

    rid, keys, links = rep["run_id"], {}, {}
    ui = (PREFECT_UI_URL.value() or "").rstrip("/")
    for stage, e in (rep.get("removed") or {}).items():
        for i, s in enumerate(e.get("samples") or []):
            rows = report.sample_rows(s["url"])
            if not rows:
                continue
            k = artifact_key("removed", f"{stage}{f'-{i}' if i else ''}-{rid}")
            create_table_artifact(key=k, table=rows, description=f"Kiln run {rid}: documents {stage} removed "
                                                                 f"(the first {len(rows)}; all in {s['url']})")
            keys[k], links[s["url"]] = "table", (k, f"{ui}/artifacts/key/{k}")
    k = artifact_key("report", rid)
    create_markdown_artifact(key=k, markdown=report.render_markdown(rep, rep.get("plots") or {}, links),
                             description=f"Kiln run {rid}: funnel, mixes, tokenizer, training, evaluation, lineage")
    keys[k] = "markdown"
    for name, url in (rep.get("plots") or {}).items():  # the PNG inline: a storage path does not open in a browser
        parent, base = url.rsplit("/", 1)
        png = base64.b64encode(Storage(parent).read_bytes(base)).decode()
        k = artifact_key("plot", f"{name.rsplit('.', 1)[0]}-{rid}")
        create_image_artifact(image_url=f"data:image/png;base64,{png}", key=k,
                              description=f"Kiln run {rid}: {name} ({url})")
        keys[k] = "image"
    k = artifact_key("funnel", rid)
    create_table_artifact(key=k, table=report.funnel_table(rep), description=f"Kiln run {rid}: data funnel per stage")
    keys[k] = "table"
    if rows := report.eval_table(rep):
        k = artifact_key("eval", rid)
        create_table_artifact(key=k, table=rows, description=f"Kiln run {rid}: evaluation metrics per set")
        keys[k] = "table"
    return keys
