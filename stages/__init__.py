"""Kiln stages. Each module has a typed ``Config``, the stages it ``NEEDS``, and one entry point
``run(cfg, ctx) -> StageResult`` that reads its inputs' artifacts and writes its own. No Prefect here."""

import importlib

# The DAG, in execution order: stage -> stages whose artifacts it reads.
NEEDS: dict[str, list[str]] = {
    "ingest": [],
    "normalize": ["ingest"],
    "dedup": ["normalize"],
    "filter": ["dedup"],
    "reweight": ["filter"],
    "tokenizer": ["reweight"],
    "shard": ["reweight", "tokenizer"],
    "train": ["shard", "tokenizer"],
    "evaluate": ["train", "shard", "tokenizer"],
}
STAGES: list[str] = list(NEEDS)


def stage_module(name: str):
    if name not in NEEDS:
        raise KeyError(f"unknown stage '{name}' (one of: {', '.join(STAGES)})")
    return importlib.import_module(f"stages.{name}")
