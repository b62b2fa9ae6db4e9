"""Progress of a long stage reaches the flow's hook: the train stage reports optimizer steps from torchrun's log
lines (stages/train/__init__.py), the runner 100% once the manifest is written (flows/pipeline.py turns these
reports into Prefect progress artifacts; tests/test_ui.py checks the artifacts on a real server)."""

from __future__ import annotations

import gzip
import json

from conftest import load_tiny, real_docs, seed_stage
from lm_upstream import build_upstream
from stages.core import runner
from stages.core.runner import progress_hook, run_stage

SMALL = {"train.model.d_model": 64, "train.model.n_layers": 2, "train.model.n_heads": 2, "train.model.seq_len": 64,
         "train.global_batch": 8, "train.micro_batch": 4, "train.steps": 12, "train.warmup_steps": 2,
         "train.checkpoint_every": 12, "train.dtype": "fp32", "train.log_every": 1, "train.nproc": 1}


def test_train_reports_its_steps_then_the_runner_reports_100(tmp_path, monkeypatch):
    storage = str(tmp_path / "store")
    build_upstream(storage, "p", tmp_path / "build", max_bytes=200_000, vocab_size=512)
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)  # every report, not one a second
    seen: list[tuple[str, float, str]] = []
    with progress_hook(lambda stage, run_id, frac, what: seen.append((stage, frac, what))):
        run_stage("train", load_tiny(None, SMALL), storage, "p")
    train = [(f, w) for s, f, w in seen if s == "train"]
    steps = [f for f, w in train if "steps" in w]
    assert len(steps) >= 6, train  # one per logged step (a report may be dropped while one is being sent)
    assert steps == sorted(steps) and 0 < steps[0] and max(steps) <= 0.99  # 100% is the runner's alone
    assert any("12/12" in w for f, w in train), train  # the last step's line came through
    assert train[0][0] == 0.0 and train[-1][0] == 1.0 and "complete" in train[-1][1], train


def test_a_datatrove_stage_reports_tasks_done_and_writes_no_file_path(tmp_path, monkeypatch):
    """normalize on 3 tasks through datatrove's local executor: the runner's watcher counts the executor's
    completion markers; the documents carry no ``metadata.file_path`` (it named the upstream file's absolute
    path, so the same data written elsewhere gave other bytes)."""
    storage = str(tmp_path / "store")
    seed_stage(storage, "p", "ingest", real_docs(40))
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)
    seen: list[tuple[str, float, str]] = []
    with progress_hook(lambda stage, run_id, frac, what: seen.append((stage, frac, what))):
        m = run_stage("normalize", load_tiny(None, {"run.tasks": 3, "run.workers": 2}), storage, "p")
    tasks = [(f, w) for s, f, w in seen if s == "normalize" and " tasks: " in w]
    # polled once a second while tasks run, and 3/3 once the executor returns (99%: 100% is the runner's)
    assert tasks and all(w.startswith("normalize tasks: ") and w.endswith("/3") for _, w in tasks), seen
    assert [f for f, _ in tasks] == sorted(f for f, _ in tasks) and tasks[-1] == (0.99, "normalize tasks: 3/3")
    assert seen[-1][1] == 1.0
    docs = [json.loads(line) for o in m["outputs"] if o["path"].endswith(".jsonl.gz")
            for line in gzip.open(tmp_path / "store" / "p" / "normalize" / o["path"], "rt")]
    assert len(docs) == m["counts"]["documents_out"] > 0
    assert not any("file_path" in d.get("metadata", {}) for d in docs)
