"""The flows users deploy (named for the nightly refresh; not flows/flows.py: prefect loads an entrypoint as a
script with its folder on sys.path, and a module named flows.py would shadow the package): typed parameters
(flows/params.py) over the same per-stage task as flows/pipeline.py.

- ``kiln-run``: the whole DAG (deployment ``pipeline``, triggered from the UI), optionally a stage subset;
- ``kiln-data``: ingest -> shard, a dataset version; ``kiln-train``: train -> evaluate on an existing run's shards;
- ``kiln-nightly-refresh``: ingest the files of ``source`` no earlier version ingested (the newest snapshot's) under
  run id ``nightly-<version>``, dedup them against the
  persistent cross-snapshot index (dedup.index; this snapshot's name in it is the version), filter, shard; old
  versions stay in their own run folders; ``<storage>/nightly/versions.json`` lists them (newest last).

No stage logic here: each stage is one task run of ``run_stage``; a re-run with the same run id resumes at the
first stage whose manifest is missing or stale (the others are skipped by their manifests). A flow holds the
run id's lock (runner.run_lock) for its whole chain: a second flow run on the same run id fails at once naming
the holder (or waits $KILN_LOCK_WAIT_S). Stage tasks retry
transient storage errors with exponential backoff (params.retry_transient), never a StageError/ConfigError.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.params import (DATA_STAGES, RETRIES, RETRY_DELAYS, TRAIN_STAGES, DataStage, NightlyParams, RunParams,
                          StageName, TrainStage, retry_transient)
from flows.pipeline import artifact_key, stage_task, write_and_publish_report
from stages import STAGES
from stages.core import summary
from stages.core.config import ConfigError
from stages.core.runner import RunLocked, StageError, run_lock
from stages.core.storage import Storage
from stages.ingest.sources import listing

kiln_stage = stage_task.with_options(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=0.2,
                                     retry_condition_fn=retry_transient)


def run_chain(p: RunParams, stages: list[str], extra: dict | None = None, stop_if_empty: tuple = ()):
    """Run ``stages`` (DAG order) as task runs; a Failed state at the first failed stage, else the run summary.
    A stage in ``stop_if_empty`` that keeps no document ends the chain there (``stopped_after``), completed."""
    try:
        _, uri, rid = p.load(extra)  # a bad profile or override fails here, before any task run
    except ConfigError as e:
        get_run_logger().error("config error: %s", e)
        return Failed(message=f"config error: {e}")
    overrides = {**p.overrides, **(extra or {})}
    ran = {}
    try:  # the run id is this flow run's until its report is written (its stage tasks re-enter the lock)
        with run_lock(uri, rid, purpose=f"flow run {flow_run.name or flow_run.id}"):
            for stage in [s for s in STAGES if s in stages]:
                state = kiln_stage.with_options(name=stage)(stage, p.config_path(), overrides, uri, rid, p.force,
                                                            return_state=True)
                if not state.is_completed():
                    return Failed(message=state.message or f"stage '{stage}' failed")
                ran[stage] = state.result()
                if stage in stop_if_empty and ran[stage]["counts"].get("documents_out") == 0:
                    break
            result = summary.collect(uri, rid)
            for row in result["stages"]:
                row["skipped"] = ran.get(row["stage"], {}).get("skipped", False)
            last = list(ran)[-1] if ran else None
            result.update(storage=uri, run_id=rid, ran=list(ran),
                          stopped_after=last if last in stop_if_empty and ran[last]["counts"].get("documents_out") == 0
                          else None)
            create_markdown_artifact(key=artifact_key("summary", rid), markdown="```\n" + summary.render(result)
                                     + "\n```", description=f"Kiln run {rid}: {', '.join(ran)}")
            result["report"] = write_and_publish_report(uri, rid)["files"]["report.md"]  # + report artifacts
    except RunLocked as e:
        get_run_logger().error("%s", e)
        return Failed(message=str(e))
    return result


@flow(name="kiln-run", log_prints=True)
def kiln_run(run: RunParams = RunParams(), stages: list[StageName] | None = None) -> dict:
    """Crawl to evaluated checkpoint (all stages, or the selected ones: their inputs must exist in the run)."""
    return run_chain(run, stages or STAGES)


@flow(name="kiln-data", log_prints=True)
def kiln_data(run: RunParams = RunParams(), stages: list[DataStage] | None = None) -> dict:
    """Crawl to token shards: ingest -> normalize -> dedup -> filter -> reweight -> tokenizer -> shard."""
    return run_chain(run, stages or DATA_STAGES)


@flow(name="kiln-train", log_prints=True)
def kiln_train(run: RunParams = RunParams(), stages: list[TrainStage] | None = None) -> dict:
    """Shards to checkpoint and evaluation report (the run's shard and tokenizer must be complete)."""
    return run_chain(run, stages or TRAIN_STAGES)


def published(storage: str) -> list[dict]:
    """The dataset versions in ``<storage>/nightly/versions.json``, oldest first."""
    book = Storage(storage).sub("nightly")
    return book.read_json("versions.json")["versions"] if book.exists("versions.json") else []


def publish_version(storage: str, version: str, result: dict, files: list[str]) -> dict:
    """Append this version to ``<storage>/nightly/versions.json`` (one atomic write; earlier versions kept)."""
    book = Storage(storage).sub("nightly")
    versions = {"versions": published(storage)}
    rows = {r["stage"]: r for r in result["stages"]}
    entry = {"version": version, "run_id": result["run_id"],
             "shards": f"{Storage(storage).sub(result['run_id']).url()}/shard",
             "documents": (rows.get("shard") or {}).get("documents_out"),
             "dedup": (rows.get("dedup") or {}).get("documents_out"), "files": files,
             "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    versions["versions"] = [v for v in versions["versions"] if v["version"] != version] + [entry]
    book.write_json("versions.json", versions)
    return entry


def source_files(cfg, source: list[str]) -> list[str]:
    """The crawl files behind ``source``, exactly as ingest would read them (``stages.ingest.sources.listing``:
    folders and globs expanded, files ingest cannot read left out), sorted: what a version records and the next
    night compares against, so a new file dropped into a watched folder is new."""
    ingest = cfg.ingest.model_copy(update={"inputs": list(source), "common_crawl": None})
    return sorted(u for u, _ in listing(ingest, cfg))


@flow(name="kiln-nightly-refresh", log_prints=True)
def nightly_refresh(run: NightlyParams = NightlyParams()) -> dict:
    """One snapshot in, one dataset version out (dedup against every earlier snapshot in the index)."""
    version = run.version or datetime.now(timezone.utc).strftime("%Y%m%d")
    p = run.model_copy(update={"run_id": run.run_id or f"nightly-{version}"})
    try:
        cfg, uri, _ = p.load()
    except ConfigError as e:
        return Failed(message=f"config error: {e}")
    try:
        files = source_files(cfg, run.source)
    except StageError as e:
        return Failed(message=str(e))
    seen = {f for v in published(uri) if v["version"] != version for f in v.get("files", [])}
    new = [f for f in files if f not in seen] if run.only_new else files
    if not new:
        get_run_logger().info("version %s: the %d source files were all ingested by earlier versions; nothing "
                              "to do", version, len(files))
        return {"version": None, "new_files": 0, "source_files": len(files), "storage": uri}
    extra = {"ingest.inputs": new, "dedup.snapshot": version}
    result = run_chain(p, DATA_STAGES + (TRAIN_STAGES if run.continue_training else []), extra,
                       stop_if_empty=("dedup",))
    if not isinstance(result, dict):
        return result
    if result["stopped_after"]:  # every document was already in an earlier snapshot: nothing to publish
        dedup = next(r for r in result["stages"] if r["stage"] == "dedup")
        get_run_logger().info("version %s: no new documents (all %s were duplicates of earlier snapshots); "
                              "nothing published", version, dedup.get("documents_in"))
        return {**result, "version": None}
    entry = publish_version(result["storage"], version, result, new)
    get_run_logger().info("published dataset version %s: %s", version, entry)
    return {**result, "version": entry}
