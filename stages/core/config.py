"""Typed configuration: one YAML per profile, validated by pydantic (unknown keys are errors).

Each stage module defines its own ``Config`` model; ``KilnConfig`` composes them with the run-wide
settings. Relative paths inside a profile are resolved against the folder of the YAML file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator



def _strictly_increasing(v: list[float]) -> list[float]:
    if v != sorted(set(v)):
        raise ValueError("must be strictly increasing")
    return v


Edges = Annotated[list[float], AfterValidator(_strictly_increasing)]  # cut points, e.g. of a quality score

class ConfigError(Exception):
    """A bad profile: the message is one line that names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class RayOptions(Strict):
    """datatrove's RayPipelineExecutor (stages/core/pipeline.py)."""

    address: str | None = "auto"  # ray.init: "auto" (RAY_ADDRESS or the `ray start` of this machine), host:port,
    #                               ray://host:10001; null starts a private single-machine Ray in this process
    cpus_per_task: int = Field(1, ge=1)  # Ray CPUs reserved per datatrove task
    mem_per_cpu_gb: float = Field(2.0, gt=0)  # Ray memory reserved per CPU (scheduling only, not a hard limit)
    tasks_per_job: int = Field(1, ge=1)  # datatrove tasks per Ray task
    time_s: int | None = Field(None, ge=1)  # a task running longer is killed and retried (datatrove: 3 tries)
    log_to_driver: bool = False  # stream workers' logs here (task logs are in <stage>/logs/<pipeline>/logs)


class SlurmOptions(Strict):
    """datatrove's SlurmPipelineExecutor: one sbatch job array per pipeline; the stage waits for it."""

    partition: str | None = None  # required with kind: slurm
    time: str = "04:00:00"  # --time of each array element
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)  # --mem-per-cpu=<n>G
    qos: str | None = None
    job_name: str = Field("kiln", min_length=1)  # prefix: jobs are <job_name>-<run id>-<pipeline> (e.g. dedup_cluster)
    sbatch_args: dict[str, str | int] = {}  # extra #SBATCH --key=value lines, e.g. {account: proj, constraint: cpu}
    logs_dir: str | None = None  # Slurm's own %A_%a.out files (a local/shared path); null: <stage>/logs/<pipeline>/
    #                              slurm_logs for local storage, ./slurm_logs/<job> for s3://
    venv: str | None = None  # activate script sourced by the job; null: the submitting interpreter's venv
    env_command: str | None = None  # instead of venv: a shell line that prepares the environment
    max_array_size: int = Field(1001, ge=1)  # the cluster's MaxArraySize; more tasks: several arrays
    tasks_per_job: int = Field(1, ge=1)  # datatrove tasks per array element
    mail_user: str | None = None
    poll_s: float = Field(30.0, gt=0)  # how often the waiting stage looks at the completion markers
    wait_timeout_s: float | None = Field(None, gt=0)  # give up waiting (the job keeps running); null: no limit


class ExecutorConfig(Strict):
    """Where data stages' datatrove pipelines run: local (this machine), ray or slurm. Not part of a stage's
    fingerprint: every executor writes the same outputs (tests/test_executors.py)."""

    kind: Literal["local", "ray", "slurm"] = "local"
    ray: RayOptions = RayOptions()
    slurm: SlurmOptions = SlurmOptions()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v  # run.executor: ray == run.executor: {kind: ray}

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "slurm" and not self.slurm.partition:
            raise ValueError("kind slurm needs slurm.partition")
        return self


class RunConfig(Strict):
    seed: int = 1234
    storage: str = "./artifacts"  # overridden by --storage or KILN_STORAGE
    executor: ExecutorConfig = ExecutorConfig()  # datatrove executor for data stages
    tasks: int = Field(2, ge=1)  # datatrove tasks (output shards) per data stage
    workers: int = Field(2, ge=1)  # processes running those tasks at once


def _compose():
    from stages import STAGES, stage_module

    fields = {"run": (RunConfig, RunConfig())}
    for name in STAGES:
        cls = stage_module(name).Config
        fields[name] = (cls, cls())
    return create_model("KilnConfig", __base__=Strict, **fields)


_KILN_MODEL = None


def kiln_model():
    global _KILN_MODEL
    if _KILN_MODEL is None:
        _KILN_MODEL = _compose()
    return _KILN_MODEL


def _format_error(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}'"
    got = first.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict) and got is not None else ""
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{path}: {key}: {first['msg']}{got_s}{more}"


def load_config(path: str | os.PathLike, overrides: dict | None = None):
    """Load and validate a profile. Raises ConfigError with a one-line message."""
    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = kiln_model().model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None
    object.__setattr__(cfg, "_base_dir", str(Path(path).resolve().parent))
    object.__setattr__(cfg, "_source", path)
    return cfg


def base_dir(cfg) -> str:
    return getattr(cfg, "_base_dir", os.getcwd())


def resolve_path(cfg, p: str) -> str:
    """Resolve a path from the profile: URLs as they are, relative paths against the YAML's folder."""
    if "://" in p or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base_dir(cfg), p))


def fingerprint(obj) -> str:
    """Stable hash of a config section (or any JSON-able object)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def storage_uri(cfg, override: str | None = None) -> str:
    """Where artifacts go: --storage, else $KILN_STORAGE, else the profile's run.storage."""
    given = override or os.environ.get("KILN_STORAGE")
    if given:
        return given if "://" in given else os.path.abspath(given)
    return resolve_path(cfg, cfg.run.storage)


def default_run_id(cfg) -> str:
    """Runs are named after their profile unless given an id (re-runs then skip finished stages)."""
    return Path(getattr(cfg, "_source", "kiln")).stem
