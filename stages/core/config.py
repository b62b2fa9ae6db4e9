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
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model



def _strictly_increasing(v: list[float]) -> list[float]:
    if v != sorted(set(v)):
        raise ValueError("must be strictly increasing")
    return v


Edges = Annotated[list[float], AfterValidator(_strictly_increasing)]  # cut points, e.g. of a quality score

class ConfigError(Exception):
    """A bad profile: the message is one line that names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class RunConfig(Strict):
    seed: int = 1234
    storage: str = "./artifacts"  # overridden by --storage or KILN_STORAGE
    executor: Literal["local"] = "local"  # datatrove executor for data stages
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
