"""train: real torchrun runs (gloo, 2 ranks and 1 rank) on token shards of real text."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _free_port, alive, load_tiny
from lm_upstream import build_upstream
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage

# a very small model so a run is seconds: 8 sequences of 64 tokens per step, 2 micro-batches per rank
SMALL = {"train.model.d_model": 64, "train.model.n_layers": 2, "train.model.n_heads": 2, "train.model.seq_len": 64,
         "train.global_batch": 8, "train.micro_batch": 2, "train.steps": 30, "train.warmup_steps": 5,
         "train.lr": 1e-2, "train.checkpoint_every": 10, "train.dtype": "fp32", "train.log_every": 1}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    storage = str(root / "store")
    facts = build_upstream(storage, "run1", root / "build", max_bytes=300_000, vocab_size=512)
    return storage, facts


@pytest.fixture(scope="module")
def two_rank(upstream):
    storage, _ = upstream
    cfg = load_tiny(None, {**SMALL, "train.nproc": 2})
    return cfg, run_stage("train", cfg, storage, "run1")


def _losses(storage: str, run_id: str) -> list[float]:
    raw = Storage(storage).sub(run_id, "train").read_bytes("metrics.jsonl").decode()
    return [json.loads(line)["loss"] for line in raw.splitlines()]


def test_two_ranks_train_and_checkpoint(upstream, two_rank):
    storage, facts = upstream
    _, m = two_rank
    assert m["counts"] == {"steps": 30, "tokens_trained": 30 * 8 * 64}
    losses = _losses(storage, "run1")
    assert len(losses) == 30
    assert losses[0] == pytest.approx(np.log(512), abs=0.3)  # starts near uniform over the vocabulary
    assert np.mean(losses[-5:]) < losses[0] - 1.0  # and clearly learns
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["tokens_per_s"] > 0 and m["metrics"]["params"] > 0

    out = Storage(storage).sub("run1", "train")
    paths = {o["path"] for o in m["outputs"]}
    for d in ("checkpoints/step_000010", "checkpoints/step_000020", "checkpoints/step_000030", "final"):
        assert {f"{d}/model.pt", f"{d}/model_config.json"} <= paths
    state = torch.load(io.BytesIO(out.read_bytes("final/model.pt")), weights_only=True)
    meta = out.read_json("final/model_config.json")
    assert meta["model"]["vocab_size"] == 512 and meta["step"] == 30 and meta["tokenizer"]["eos_id"] == 2

    from stages.train.checkpoint import load_model

    model, _ = load_model(out, "final")
    assert torch.equal(model.state_dict()["embed.weight"], state["embed.weight"])
    # the same weights as safetensors, readable without Kiln (a tied head stored once; config in the metadata)
    from safetensors import safe_open
    from safetensors.torch import load

    st = load(out.read_bytes("final/model.safetensors"))
    assert set(st) == set(state) - {"head.weight"} and all(torch.equal(st[k], state[k]) for k in st)
    with safe_open(str(Path(storage) / "run1" / "train" / "final" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["vocab_size"] == 512
    # the final weights are the trained ones: better than the step-10 checkpoint on training text
    early, _ = load_model(out, "checkpoints/step_000010")
    ids = torch.from_numpy(facts["train"]["stream"][:4 * 65]).view(4, 65)
    with torch.no_grad():
        assert model(ids[:, :-1], ids[:, 1:])[1] < early(ids[:, :-1], ids[:, 1:])[1]


def test_one_rank_matches_two_ranks(upstream, two_rank):
    """Same global batch (8 sequences): 1 rank x 4 micro-batches of 2 == 2 ranks x 2 micro-batches of 2,
    so DDP averages gradients (not sums) and each rank trains on its own part of the batch."""
    storage, _ = upstream
    _clone(storage, "run1", "one", ("tokenizer", "shard"))
    m = run_stage("train", load_tiny(None, {**SMALL, "train.nproc": 1}), storage, "one")
    assert m["metrics"]["world_size"] == 1
    one, two = _losses(storage, "one"), _losses(storage, "run1")
    assert len(one) == len(two) == 30
    np.testing.assert_allclose(one, two, atol=1e-3)  # measured: identical to 1e-5 over 30 steps


def _clone(storage: str, src: str, dst: str, stages) -> None:
    store = Storage(storage)
    for stage in stages:
        for rel in store.sub(src, stage).list():
            store.sub(dst, stage).write_bytes(rel, store.sub(src, stage).read_bytes(rel))


def test_corrupt_and_missing_shards_fail_clearly(upstream, tmp_path):
    storage, _ = upstream
    store = Storage(storage)
    cfg = load_tiny(None, {**SMALL, "train.steps": 2})
    src = store.sub("run1", "shard")
    for run_id, damage in (("trunc", "truncate"), ("gone", "delete"), ("flip", "flip")):
        _clone(storage, "run1", run_id, ("tokenizer", "shard"))
        dst = store.sub(run_id, "shard")
        raw = src.read_bytes("tokens/train/00000.bin")
        if damage == "truncate":
            dst.write_bytes("tokens/train/00000.bin", raw[:-100])
        elif damage == "flip":  # same size, one token changed: only the checksum can tell
            dst.write_bytes("tokens/train/00000.bin", raw[:200] + bytes([raw[200] ^ 1]) + raw[201:])
        else:
            dst.rm("tokens/train/00000.bin")
        with pytest.raises(StageError) as e:
            run_stage("train", cfg, storage, run_id)
        msg = str(e.value)
        assert "\n" not in msg and "tokens/train/00000.bin" in msg
        assert {"truncate": "truncated", "delete": "missing", "flip": "sha256 differs"}[damage] in msg


def test_worker_failure_is_one_clear_line(upstream):
    """A shard whose header is fine but whose tokens are out of the vocabulary fails inside the ranks:
    torchrun exits non-zero and the stage reports the rank's own message, not torchrun's trace."""
    storage, _ = upstream
    _clone(storage, "run1", "bad", ("tokenizer", "shard"))
    shard = Storage(storage).sub("bad", "shard")
    raw = bytearray(shard.read_bytes("tokens/train/00000.bin"))
    raw[64 + 2 * 1000: 64 + 2 * 1001] = np.array([60000], dtype="<u2").tobytes()
    shard.write_bytes("tokens/train/00000.bin", bytes(raw))
    with pytest.raises(StageError) as e:
        # the checksum check would stop this before torchrun: off, to reach the ranks' own check
        run_stage("train", load_tiny(None, {**SMALL, "train.steps": 2, "train.verify_shards": False}), storage, "bad")
    msg = str(e.value)
    assert "\n" not in msg and "exited with code" in msg and "token id 60000 outside the vocabulary" in msg


def _ranks_of(spec_marker: str) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"stages.train.worker" in cmd and spec_marker.encode() in cmd and b"torch.distributed.run" not in cmd:
            pids.append(int(entry))
    return pids


def test_interrupt_stops_torchrun_and_ranks(upstream, monkeypatch):
    """Ctrl-C in the parent while the ranks train: torchrun and every rank are gone afterwards."""
    import signal
    import threading
    import time

    import stages.train as train_stage

    storage, _ = upstream
    _clone(storage, "run1", "slow", ("tokenizer", "shard"))
    started, seen = [], []

    class Recording(subprocess.Popen):
        def __init__(self, cmd, *a, **kw):
            super().__init__(cmd, *a, **kw)
            started.append((self.pid, cmd[-1]))

    def interrupt_when_ranks_run():
        deadline = time.time() + 60
        while time.time() < deadline:
            if started and len(_ranks_of(started[0][1])) == 2:
                seen.extend(_ranks_of(started[0][1]))
                time.sleep(1)
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: interrupts the parent's wait()
                return
            time.sleep(0.2)

    monkeypatch.setattr(train_stage.subprocess, "Popen", Recording)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # background shells ignore SIGINT
    request_cleanup = lambda: signal.signal(signal.SIGINT, old_handler)  # noqa: E731
    threading.Thread(target=interrupt_when_ranks_run, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stage("train", load_tiny(None, {**SMALL, "train.steps": 100000}), storage, "slow")
    finally:
        request_cleanup()
    assert len(seen) == 2
    with pytest.raises(ProcessLookupError):
        os.killpg(started[0][0], 0)  # torchrun's group is gone
    assert _ranks_of(started[0][1]) == []  # and so are the ranks (each in a group of its own)


def test_model_and_schedule_options_through_torchrun(upstream):
    """QK-norm, an untied head, the WSD schedule and activation checkpointing in a real 2-rank run, under FSDP2
    (the untied head is a root parameter of its own, the blocks are checkpoint-wrapped FSDP units); the final
    model reloads (weights_only) with its options and the learning rate followed WSD."""
    import json

    from stages.train.checkpoint import load_model

    storage, _ = upstream
    _clone(storage, "run1", "opts", ("tokenizer", "shard"))
    over = {**SMALL, "train.nproc": 2, "train.steps": 12, "train.checkpoint_every": 4, "train.keep_checkpoints": 1,
            "train.model.qk_norm": True,
            "train.model.tie_embeddings": False, "train.schedule": "wsd", "train.decay_fraction": 0.25,
            "train.activation_checkpointing": True, "train.strategy": "fsdp"}
    m = run_stage("train", load_tiny(None, over), storage, "opts")
    model, _ = load_model(Storage(storage).sub("opts", "train"), "final")
    assert model.cfg.qk_norm and not model.cfg.tie_embeddings and model.head.weight is not model.embed.weight
    rows = [json.loads(x) for x in Storage(storage).sub("opts", "train").read_bytes("metrics.jsonl").splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs and all(v == pytest.approx(1e-2) for s, v in lrs.items() if 5 <= s < 9)  # stable phase
    assert m["counts"]["steps"] == 12 and min(lrs.values()) < 1e-2
    # keep_checkpoints 1: only the newest training state (step 8) stays; the model snapshots all stay
    from stages.train.checkpoint import complete_states

    out = Storage(storage).sub("opts", "train")
    assert [s for s, _ in complete_states(out)] == [8] and not out.list("checkpoints/step_000004/state")
    assert out.exists("checkpoints/step_000004/model.pt")
    # MFU against the measured matmul peak (fp32 here), per row and in the manifest
    assert m["metrics"]["peak_measured"] and m["metrics"]["peak_flops"] > 1e9
    assert 0 < m["metrics"]["mfu"] < 1 and all(0 < r["mfu"] < 1 and r["max_rss_mb"] > 50 for r in rows)
    assert m["metrics"]["mfu"] == pytest.approx(
        m["metrics"]["tokens_per_s"] * m["metrics"]["flops_per_token"] / m["metrics"]["peak_flops"], rel=1e-3,
            abs=5e-5)  # the manifest rounds MFU to 4 decimals


def test_sigkill_then_resume_gives_the_same_losses(upstream, two_rank):
    """A 2-rank run killed with SIGKILL (stage, torchrun and ranks) after its step-10 checkpoint is complete:
    the re-run resumes from the newest complete checkpoint and logs exactly the losses of the uninterrupted run
    at every step; checkpoints of another dataset are refused with a clear error."""
    import json
    import random
    import signal
    import subprocess
    import sys
    import time

    from stages.train.checkpoint import MARKER, complete_states

    storage, _ = upstream
    cfg, ref = two_rank
    _clone(storage, "run1", "killed", ("tokenizer", "shard"))
    sets = [f"{k}={json.dumps(v)}" for k, v in {**SMALL, "train.nproc": 2}.items()]
    cmd = [sys.executable, "-m", "flows.cli", "stage", "train", "--storage", storage, "--run-id", "killed"]
    proc = subprocess.Popen(cmd + [a for s in sets for a in ("--set", s)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Storage(storage).sub("killed", "train")
    deadline = time.time() + 120
    while not out.exists(f"checkpoints/step_000010/{MARKER}"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(random.Random(7).uniform(0.0, 0.3))  # somewhere after the checkpoint
    from stages.train import _worker_pids

    family = [proc.pid, *_worker_pids(proc.pid)]  # the stage, torchrun and its ranks: all at once, as a node dies
    assert len(family) >= 4
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()

    while any(alive(pid) for pid in family[1:]):
        time.sleep(0.05)
    assert not out.exists("manifest.json"), "the run finished before the kill: nothing to resume"
    newest = complete_states(out)[0][0]
    assert newest in (10, 20)

    # a copy whose checkpoint claims another dataset is refused
    _clone(storage, "killed", "other", ("tokenizer", "shard", "train"))
    other = Storage(storage).sub("other", "train")
    marker = other.read_json(f"checkpoints/step_{newest:06d}/{MARKER}")
    other.write_json(f"checkpoints/step_{newest:06d}/{MARKER}", {**marker, "dataset": "0" * 16})
    with pytest.raises(StageError, match="refusing to resume"):
        run_stage("train", cfg, storage, "other")

    m = run_stage("train", cfg, storage, "killed")
    assert f"[train] resumed at step {newest}" in out.read_bytes("logs/torchrun.log").decode()  # not restarted
    assert _losses(storage, "killed") == _losses(storage, "run1")  # bit for bit, every step
    # TensorBoard: the resumed attempt rewrote the restored rows into its own event file, the killed one's is gone
    assert len(out.list("tensorboard")) == 1
    _events_match(_scalars(Path(storage) / "killed" / "train" / "tensorboard")["train/loss"],
                  _rows(storage, "killed"), "loss")
    assert m["counts"] == ref["counts"]
    final = torch.load(io.BytesIO(out.read_bytes("final/model.pt")), weights_only=True)
    ref_final = torch.load(io.BytesIO(Storage(storage).sub("run1", "train").read_bytes("final/model.pt")),
                           weights_only=True)
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


def test_checkpoint_round_trip_through_s3(upstream, s3_bucket):
    """Training state saved to and resumed from S3 (moto_server): a 20-step run, then its end removed as if it
    had died after the step-10 checkpoint; the re-run resumes from S3 at step 10 and reproduces steps 11-20."""
    storage, _ = upstream
    local, s3 = Storage(storage), Storage(s3_bucket)
    for stage in ("tokenizer", "shard"):
        for rel in local.sub("run1", stage).list():
            s3.sub("s3run", stage).write_bytes(rel, local.sub("run1", stage).read_bytes(rel))
    cfg = load_tiny(None, {**SMALL, "train.nproc": 2, "train.steps": 20})
    run_stage("train", cfg, s3_bucket, "s3run")
    out = s3.sub("s3run", "train")
    first = out.read_bytes("metrics.jsonl")
    assert out.list("checkpoints/step_000010/state")  # DCP files in the bucket
    assert [p.split("/")[0] for p in out.list("tensorboard")] == ["tensorboard"]  # event files too
    for rel in ("manifest.json", "final", "checkpoints/step_000020", "metrics.jsonl"):
        out.rm(rel)
    run_stage("train", cfg, s3_bucket, "s3run")
    assert "[train] resumed at step 10" in out.read_bytes("logs/torchrun.log").decode()
    def trajectory(raw: bytes) -> list[tuple]:  # what must repeat (timings may not)
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in map(json.loads, raw.splitlines())]

    assert trajectory(out.read_bytes("metrics.jsonl")) == trajectory(first) and len(trajectory(first)) == 20


# --- FSDP2, TensorBoard, progress, compile, multi-node --------------------------------------------------------

def _rows(storage: str, run_id: str) -> list[dict]:
    return [json.loads(x) for x in Storage(storage).sub(run_id, "train").read_bytes("metrics.jsonl").splitlines()]


@pytest.fixture(scope="module")
def fsdp_two(upstream):
    storage, _ = upstream
    _clone(storage, "run1", "fsdp2", ("tokenizer", "shard"))
    return run_stage("train", load_tiny(None, {**SMALL, "train.nproc": 2, "train.strategy": "fsdp"}), storage, "fsdp2")


def test_fsdp_matches_one_rank_and_ddp(upstream, two_rank, fsdp_two):
    """FSDP2 (fully_shard per block + root) on 2 ranks == FSDP2 on 1 rank == DDP on 2 ranks, same global batch, at
    every step: the loss and the global grad norm. Gradients summed over ranks instead of averaged would double
    the 2-rank grad norm (AdamW alone would hide it in the losses); a per-shard norm would shrink it. The final
    model is gathered into the same model.pt / model.safetensors as DDP's (keys, dtypes, tied head)."""
    storage, _ = upstream
    _clone(storage, "run1", "fsdp1", ("tokenizer", "shard"))
    one = run_stage("train", load_tiny(None, {**SMALL, "train.nproc": 1, "train.strategy": "fsdp"}), storage, "fsdp1")
    assert one["metrics"]["world_size"] == 1 and fsdp_two["metrics"]["world_size"] == 2
    assert fsdp_two["metrics"]["strategy"] == "fsdp" and two_rank[1]["metrics"]["strategy"] == "ddp"
    f2, f1, d2 = _rows(storage, "fsdp2"), _rows(storage, "fsdp1"), _rows(storage, "run1")
    assert len(f2) == len(f1) == len(d2) == 30
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in f2], [r[key] for r in f1], atol=1e-3, err_msg=key)
        np.testing.assert_allclose([r[key] for r in f2], [r[key] for r in d2], atol=1e-3, err_msg=key)
    assert [r["lr"] for r in f2] == [r["lr"] for r in d2]

    out, ref = Storage(storage).sub("fsdp2", "train"), Storage(storage).sub("run1", "train")
    load = lambda s, rel: torch.load(io.BytesIO(s.read_bytes(rel)), weights_only=True)  # noqa: E731
    fs, ds = load(out, "final/model.pt"), load(ref, "final/model.pt")
    assert list(fs) == list(ds)  # same keys in the same order: no FSDP or wrapper prefixes
    assert all(type(fs[k]) is torch.Tensor and fs[k].dtype == torch.float32 and fs[k].shape == ds[k].shape
               for k in ds)
    assert max((fs[k] - ds[k]).abs().max().item() for k in ds) < 1e-4  # measured: 0.0
    assert torch.equal(fs["head.weight"], fs["embed.weight"])  # tied head gathered as the embedding
    from safetensors.torch import load as st_load

    assert set(st_load(out.read_bytes("final/model.safetensors"))) == set(ds) - {"head.weight"}
    from stages.train.checkpoint import load_model

    model, meta = load_model(out, "checkpoints/step_000010")  # a mid-run snapshot gathers the shards too
    assert meta["step"] == 10 and model.cfg.tie_embeddings
    # the training state is sharded: one DCP file per rank
    assert sorted(p.rsplit("/", 1)[1] for p in out.list("checkpoints/step_000020/state")) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_fsdp_resume_from_sharded_state(upstream, fsdp_two):
    """The FSDP run's end removed as if it had died after the step-10 checkpoint: the re-run loads the sharded
    DCP state (weights + AdamW moments as DTensor shards) and repeats steps 11-30 exactly."""
    storage, _ = upstream
    _clone(storage, "fsdp2", "fsdp_resume", ("tokenizer", "shard", "train"))
    out = Storage(storage).sub("fsdp_resume", "train")
    for rel in ("manifest.json", "final", "checkpoints/step_000020", "checkpoints/step_000030", "metrics.jsonl"):
        out.rm(rel)  # (the old event file, steps 1-30, stays: events past the resume point must not survive)
    run_stage("train", load_tiny(None, {**SMALL, "train.nproc": 2, "train.strategy": "fsdp"}), storage, "fsdp_resume")
    assert "[train] resumed at step 10" in out.read_bytes("logs/torchrun.log").decode()
    traj = lambda rows: [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows]  # noqa: E731
    assert traj(_rows(storage, "fsdp_resume")) == traj(_rows(storage, "fsdp2"))
    _events_match(_scalars(Path(storage) / "fsdp_resume" / "train" / "tensorboard")["train/grad_norm"],
                  _rows(storage, "fsdp2"), "grad_norm")
    a = torch.load(io.BytesIO(out.read_bytes("final/model.pt")), weights_only=True)
    b = torch.load(io.BytesIO(Storage(storage).sub("fsdp2", "train").read_bytes("final/model.pt")), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _events_match(events: list[tuple[int, float]], rows: list[dict], key: str) -> None:
    assert [s for s, _ in events] == [r["step"] for r in rows], key  # every step once, in order
    np.testing.assert_allclose([v for _, v in events], [r[key] for r in rows], rtol=1e-6, err_msg=key)


def test_tensorboard_events_equal_metrics_rows(upstream, two_rank):
    """The event files in tensorboard/ (read back with TensorBoard's own EventAccumulator) hold every
    metrics.jsonl row: loss, lr, grad norm, tokens/s, GFLOP/s, MFU and max RSS at the same steps."""
    from stages.train.worker import Board

    storage, _ = upstream
    rows = _rows(storage, "run1")
    assert {o["path"].split("/")[0] for o in two_rank[1]["outputs"]} >= {"tensorboard"}  # in the manifest
    got = _scalars(Path(storage) / "run1" / "train" / "tensorboard")
    assert set(got) == set(Board.TAGS.values())
    for key, tag in Board.TAGS.items():
        _events_match(got[tag], rows, key)


def test_progress_lines_without_a_terminal(upstream, two_rank):
    """Through the stage (stdout piped): no carriage-return redraws in the log, the [train] step lines as before,
    and tqdm's meter as a plain progress line (at least at the end); on a terminal tqdm draws its live bar."""
    from stages.train.worker import Progress

    storage, _ = upstream
    log = Storage(storage).sub("run1", "train").read_bytes("logs/torchrun.log").decode()
    assert "\r" not in log and log.count("[train] step ") == 30
    last = [l for l in log.splitlines() if l.startswith("[train] progress")][-1]
    assert "100%" in last and "30/30" in last and "tok/s" in last and "loss" in last

    class Pipe(io.StringIO):
        def __init__(self, tty: bool):
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    row = {"loss": 5.0, "tokens_per_s": 1000.0}
    for tty in (False, True):
        f = Pipe(tty)
        p = Progress(50, 0, every_s=1e-9, file=f)
        for done in range(1, 51):
            p.update(done, row)
            p.log(f"[train] step {done}") if done % 10 == 0 else None
        p.close()
        text = f.getvalue()
        if tty:  # the live bar redraws in place
            assert "\r" in text and "50/50" in text and text.count("[train] step") == 5
        else:  # one readable line per period, never a redraw
            lines = text.splitlines()
            assert "\r" not in text and len(lines) == 55 and lines[-2].startswith("[train] progress 100%")


def test_compiled_fsdp_run_saves_plain_keys(upstream, two_rank):
    """train.compile (torch.compile of the whole model, in place) under FSDP2 on 2 ranks: the same losses as the
    eager DDP run at the first steps, and the saved keys are a plain GPT's (no _orig_mod.): the final model loads
    strictly into a plain GPT."""
    from stages.train.checkpoint import load_model
    from stages.train.model import GPT, GPTConfig

    storage, _ = upstream
    _clone(storage, "run1", "compiled", ("tokenizer", "shard"))
    over = {**SMALL, "train.nproc": 2, "train.strategy": "fsdp", "train.compile": True, "train.steps": 4,
            "train.checkpoint_every": 2}
    m = run_stage("train", load_tiny(None, over), storage, "compiled")
    assert m["metrics"]["compile"] is True
    np.testing.assert_allclose(_losses(storage, "compiled"), _losses(storage, "run1")[:4], atol=1e-3)  # in warmup
    out = Storage(storage).sub("compiled", "train")
    state = torch.load(io.BytesIO(out.read_bytes("final/model.pt")), weights_only=True)
    meta = out.read_json("final/model_config.json")
    plain = GPT(GPTConfig.from_dict(meta["model"]))
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    load_model(out, "final")
    assert out.list("checkpoints/step_000002/state")  # the sharded training state of the compiled model


def test_two_nodes_equal_one_two_rank_node(upstream, two_rank):
    """Two rendezvous 'nodes' of one rank each on this machine (nnodes 2, c10d rendezvous on 127.0.0.1): node 0 is
    `kiln stage train`, node 1 a separate process calling join_node(), into the same storage. They train the 2-rank
    standalone run's losses and grad norms at every step; node 0 wrote the manifest (and its log has the step
    lines), node 1 returned the same summary; the fingerprint ignores where the nodes ran."""
    import sys

    from conftest import TINY

    storage, _ = upstream
    _clone(storage, "run1", "nodes", ("tokenizer", "shard"))
    base = {**SMALL, "train.nproc": 1, "train.nnodes": 2, "train.rdzv_endpoint": f"127.0.0.1:{_free_port()}",
            "train.rdzv_id": "test-nodes", "train.timeout_s": 200}
    sets = [a for k, v in base.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    node0 = [sys.executable, "-m", "flows.cli", "stage", "train", "--storage", storage, "--run-id", "nodes", *sets]
    join = ("import json, sys; from stages.core.config import load_config; from stages.train import join_node; "
            "print('SUMMARY', json.dumps(join_node(load_config(sys.argv[1], json.loads(sys.argv[2])), sys.argv[3], "
            "sys.argv[4])))")
    node1 = [sys.executable, "-c", join, str(TINY), json.dumps({**base, "train.node_rank": 1}), storage, "nodes"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in (node0, node1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    rows, ref = _rows(storage, "nodes"), _rows(storage, "run1")
    assert len(rows) == 30
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], atol=1e-4, err_msg=key)
    out = Storage(storage).sub("nodes", "train")
    m = out.read_json("manifest.json")
    assert m["metrics"]["world_size"] == 2 and m["counts"] == two_rank[1]["counts"]
    summary = json.loads(next(l for l in outs[1].splitlines() if l.startswith("SUMMARY ")).split(" ", 1)[1])
    assert summary["world_size"] == 2 and summary["final_loss"] == m["metrics"]["final_loss"]
    log = out.read_bytes("logs/torchrun.log").decode()
    assert log.count("[train] step ") == 30 and "2 rank(s)" in log  # node 0's log: its first rank prints
    # where the job ran is not part of the result: node 0's config on another endpoint finds the stage complete
    moved = {**base, "train.rdzv_endpoint": "10.0.0.1:29400"}
    assert run_stage("train", load_tiny(None, moved), storage, "nodes").get("skipped")
    from stages.train import join_node

    again = join_node(load_tiny(None, {**moved, "train.node_rank": 1}), storage, "nodes")  # nothing to join
    assert again["final_loss"] == m["metrics"]["final_loss"] and again["steps"] == 30
    with pytest.raises(StageError, match="join_node"):  # node 1 is never a stage run
        run_stage("train", load_tiny(None, {**base, "train.node_rank": 1}), storage, "nodes", force=True)


def test_real_states_load_through_the_restricted_reader(upstream, two_rank, fsdp_two, tmp_path):
    """Every complete training state the tests of this module wrote (at least 2-rank DDP and FSDP2; 1-rank DDP
    and FSDP2 too when the whole module runs) loads in one process through load_state's restricted reader and
    weights_only planner: the weights equal the model.pt snapshot of that step, AdamW's moments and step count
    and the param_groups' lr (a non-tensor item) come back. Each .metadata names only globals of
    METADATA_GLOBALS, and the non-dtype ones are exactly the set recorded in checkpoint.py."""
    import pickle
    import types

    from stages.train.checkpoint import METADATA_GLOBALS, complete_states, load_model, load_state, step_dir

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    storage, seen, loaded = upstream[0], set(), set()
    for run_id in sorted(os.listdir(storage)):
        out = Storage(storage).sub(run_id, "train")
        for step, marker in complete_states(out) if out.exists("checkpoints") else []:
            Recorder(io.BytesIO(out.read_bytes(f"{step_dir(step)}/state/.metadata"))).load()
            ref, meta = load_model(out, step_dir(step))
            model, _ = load_model(out, step_dir(step))
            for p in model.parameters():
                torch.nn.init.zeros_(p)
            opt = torch.optim.AdamW(model.parameters(), lr=123.0)
            load_state(out, step, model, opt, types.SimpleNamespace(rank=0, world=1), str(tmp_path / run_id))
            got, want = model.state_dict(), ref.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (run_id, step)
            moments = list(opt.state.values())
            assert len(moments) == len(list(model.parameters())) and all(float(s["step"]) == step for s in moments)
            assert all(s["exp_avg_sq"].abs().sum() > 0 for s in moments) and 0 < opt.param_groups[0]["lr"] < 1
            loaded.add((run_id, marker["world_size"]))
    assert {("run1", 2), ("fsdp2", 2)} <= loaded
    dtype = lambda g: g[0] == "torch" and isinstance(getattr(torch, g[1]), torch.dtype)  # noqa: E731
    assert {g for g in seen if not dtype(g)} == {g for g in METADATA_GLOBALS if not dtype(g)}
    assert seen <= METADATA_GLOBALS and ("torch", "float32") in seen
