"""Typed flow parameters (what the Prefect UI renders as a form) and the retry rule of stage tasks.

Two layers reject bad values before any stage runs:
- the server, from the deployment's parameter schema (``enforce_parameter_schema``): wrong types, unknown stage
  names (an enum of ``stages.STAGES``), run ids outside ``RUN_ID``; ``create_flow_run`` answers 409 and no flow
  run is created (measured on prefect 3.8.7, tests/test_deploy.py);
- the flow itself, first thing: the profile must exist and load with the overrides (``RunParams.load``), else the
  flow run fails with the one-line ``ConfigError`` and no task run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows import REPO
from stages import STAGES
from stages.core.runner import SAFE_NAME

StageName = Literal[tuple(STAGES)]  # an enum in the JSON schema: the UI offers a pick list, the server checks it
DATA_STAGES = STAGES[:STAGES.index("shard") + 1]  # ingest -> shard: a dataset version
TRAIN_STAGES = STAGES[STAGES.index("train"):]  # train -> evaluate: a checkpoint and its report
DataStage = Literal[tuple(DATA_STAGES)]
TrainStage = Literal[tuple(TRAIN_STAGES)]
RUN_ID = SAFE_NAME  # one folder name in storage (no "/", no ".."): the rule the runner checks, in the form
SAMPLE_CRAWL = ["../../shared/data/crawl/*.warc.gz"]  # the tiny profile's inputs (relative to configs/)


def profile_path(profile: str) -> str:
    """A profile name (``tiny`` -> configs/tiny.yaml) or a path (relative: to the repository)."""
    if "/" not in profile and not profile.endswith((".yaml", ".yml")):
        return str(REPO / "configs" / f"{profile}.yaml")
    p = Path(profile)
    return str(p if p.is_absolute() else REPO / p)


class RunParams(BaseModel):
    """Where and how a run goes. Defaults: the tiny profile on the sample crawl, storage $KILN_STORAGE."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field("tiny", description="profile name in configs/ (tiny, small, gpu) or a YAML path")
    storage: Optional[str] = Field(None, description="local folder or s3://bucket/prefix; empty: $KILN_STORAGE, "
                                                     "else the profile's run.storage")
    run_id: Optional[str] = Field(None, pattern=RUN_ID, description="folder of this run in storage; empty: the "
                                                                    "profile's name. Same id = resume")
    overrides: dict[str, Any] = Field(default_factory=dict, description='profile values by dotted key, e.g. '
                                      '{"train.steps": 20, "ingest.inputs": ["s3://bucket/crawl/*.warc.gz"]}')
    force: bool = Field(False, description="re-run stages even when an identical run of them is complete")

    @field_validator("profile")
    @classmethod
    def _profile_exists(cls, v: str) -> str:
        if not os.path.isfile(profile_path(v)):
            raise ValueError(f"no profile '{v}' ({profile_path(v)} not found)")
        return v

    def config_path(self) -> str:
        return profile_path(self.profile)

    def load(self, extra: dict | None = None):
        """(config, storage URI, run id); raises ConfigError for a bad profile or override."""
        from stages.core.config import default_run_id, load_config, storage_uri

        cfg = load_config(self.config_path(), {**self.overrides, **(extra or {})})
        return cfg, storage_uri(cfg, self.storage or None), self.run_id or default_run_id(cfg)


class NightlyParams(RunParams):
    """The nightly refresh: ingest a snapshot, dedup it against the cross-snapshot index, publish a version."""

    source: list[str] = Field(default_factory=lambda: list(SAMPLE_CRAWL), min_length=1,
                              description="the snapshot's files: paths, globs or URLs (relative: to configs/)")
    version: Optional[str] = Field(None, pattern=RUN_ID, description="dataset version name; empty: the UTC date "
                                                                     "(YYYYMMDD) of the run")
    only_new: bool = Field(True, description="ingest only the source files no earlier version ingested (none new: "
                                             "the run completes and publishes nothing)")
    continue_training: bool = Field(False, description="then train -> evaluate on the new version")


# -- retries: transient storage errors only ------------------------------------------------------------------
def is_transient(exc: BaseException | None, _depth: int = 0) -> bool:
    """Worth a retry of the stage task: the storage layer's rule (``stages.core.storage.transient``: connection
    errors and timeouts, S3 throttling and 5xx, also wrapped), plus ``StorageUnavailable`` — storage gave up
    after its own retry window, and Prefect's later attempts (10, 20, 40 s) may find the endpoint back. Not: bad
    data or config (StageError/ConfigError come back as a Failed state, not an exception), missing or forbidden
    files, a full or read-only disk, programming errors."""
    from stages.core.storage import StorageUnavailable, transient

    if exc is None or _depth > 5:
        return False
    if isinstance(exc, StorageUnavailable) or transient(exc):  # transient() stops at a StorageUnavailable
        return True
    nxt = exc.__cause__ or exc.__context__
    return nxt is not exc and is_transient(nxt, _depth + 1)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: the engine wraps the raised exception (or a returned Failed state) in
    ``state.data``; a returned Failed state is the stage's own verdict (StageError) and is never retried."""
    return isinstance(state.data, BaseException) and is_transient(state.data)


RETRIES = int(os.environ.get("KILN_STAGE_RETRIES", "3"))
RETRY_DELAYS = [10, 20, 40, 80, 160][:max(RETRIES, 1)]  # exponential backoff (prefect's exponential_backoff(10))
