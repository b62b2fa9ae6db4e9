"""train: a GPT decoder trained with data parallelism on the shard stage's token shards.

``run`` checks the inputs, writes a spec, and launches ``torchrun`` as a subprocess (one process per
rank, gloo on CPU; DDP or FSDP2); ``stages.train.worker`` does the training. Layout, torchtitan-style:
``model.py`` (pure model), ``parallel.py`` (process group, DDP/FSDP2, compile), ``data.py`` (batches from
shards), ``checkpoint.py`` (weights + config, training state in storage), ``worker.py`` (the training loop).
Several nodes: node 0 runs this stage, the others ``join_node`` (see there).

Outputs: ``checkpoints/step_NNNNNN/{model.pt,model_config.json}`` every ``checkpoint_every`` steps and
at the end (with ``state/`` + ``COMPLETE.json``: the training state to resume from), ``final/{model.pt,
model_config.json,model.safetensors}``, ``metrics.jsonl`` (step, loss, lr, grad norm, tokens/s, MFU, memory),
``tensorboard/`` (the same scalars as event files) and ``logs/torchrun.log``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Literal

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError, StageResult, clear_stage_folder, stage_progress

log = logging.getLogger("kiln.train")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ModelConfig(Strict):
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=8)
    ffn_mult: float = Field(8 / 3, gt=0)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on queries and keys per head
    tie_embeddings: bool = True  # output head = token embedding


RESUMABLE = True  # the runner keeps an interrupted attempt's checkpoints: run() resumes from the newest complete one


class Config(Strict):
    model: ModelConfig = ModelConfig()
    nproc: int = Field(2, ge=1)  # processes (ranks) torchrun starts
    backend: Literal["gloo", "nccl"] = "gloo"  # nccl needs device: cuda
    device: Literal["cpu", "cuda"] = "cpu"
    # ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard per block + root on a 1-D mesh (weights, gradients and
    # AdamW state sharded over ranks; the same losses as ddp, tests/test_train.py)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # part of the resume fingerprint: another strategy starts over
    compile: bool = False  # torch.compile the whole model (needs a C++ compiler on CPU); see parallel.compile_model
    # multi-node: every node gets the same config but its own node_rank; node 0 runs the stage, the others call
    # join_node(); torchrun's c10d rendezvous at rdzv_endpoint (node 0's host:port) joins them. node_rank,
    # rdzv_endpoint and rdzv_id say where a job runs, not what it computes: left out of the stage fingerprint.
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0, exclude=True)
    rdzv_endpoint: str = Field("127.0.0.1:29400", exclude=True)
    rdzv_id: str = Field("kiln-train", exclude=True)
    # progress line period when stdout is not a terminal (0 = none); display only: not in the stage fingerprint
    progress_every_s: float = Field(10.0, ge=0, exclude=True)
    threads: int = Field(0, ge=0)  # torch threads per rank; 0 = cores / nproc
    dtype: Literal["fp32", "bf16"] = "bf16"  # bf16 = autocast for matmuls, fp32 weights and optimizer
    steps: int = Field(200, ge=1)
    global_batch: int = Field(16, ge=1)  # sequences per optimizer step, over all ranks
    micro_batch: int = Field(8, ge=1)  # sequences per forward pass per rank (accumulation fills the rest)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "wsd"] = "cosine"  # after warmup: cosine decay, or warmup-stable-decay
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: the last share of steps that decays linearly
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    # FLOP/s that MFU is measured against (all ranks together); null: on CPU measured at the start (matmuls in
    # `dtype` on the run's threads, stages/train/flops.py); on GPU give it (e.g. 8 x 989e12 for 8 H100s, bf16)
    peak_flops: float | None = Field(None, gt=0)
    warmup_steps: int = Field(20, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping
    checkpoint_every: int = Field(100, ge=0)  # steps; 0 = only at the end
    log_every: int = Field(5, ge=1)  # steps per metrics.jsonl row (loss averaged over them)
    timeout_s: int = Field(0, ge=0)  # 0 = no limit
    verify_shards: bool = True  # sha256 of every training shard against the shard manifest before starting
    keep_checkpoints: int = Field(2, ge=0)  # training states (model + optimizer) kept for resume; 0 = all


def _check_inputs(cfg: Config, ctx: StageContext) -> tuple[dict, list[str]]:
    """Tokenizer facts and the training shard list, checked before any process starts."""
    from stages.train.data import ShardError, open_shards

    tok = ctx.inputs["tokenizer"].get("metrics", {})
    if not isinstance(tok.get("vocab_size"), int) or tok["vocab_size"] <= 0:
        raise StageError(f"tokenizer manifest in {ctx.input('tokenizer').url()} has no metrics.vocab_size")
    shards = ctx.input_files("shard", prefix="tokens/train/", suffix=".bin")
    if not shards:
        raise StageError(f"shard manifest in {ctx.input('shard').url()} lists no tokens/train/*.bin")
    if cfg.backend == "nccl" and cfg.device != "cuda":
        raise StageError("train.backend nccl needs train.device cuda (use gloo on CPU)")
    if cfg.global_batch % (cfg.micro_batch * cfg.nproc * cfg.nnodes):
        raise StageError(f"train.global_batch {cfg.global_batch} is not a multiple of train.micro_batch "
                         f"{cfg.micro_batch} x train.nproc {cfg.nproc}" + (f" x train.nnodes {cfg.nnodes}"
                                                                          if cfg.nnodes > 1 else ""))
    if cfg.node_rank >= cfg.nnodes:
        raise StageError(f"train.node_rank {cfg.node_rank} is not below train.nnodes {cfg.nnodes}")
    try:
        sums = {o["path"]: o["sha256"] for o in ctx.inputs["shard"].get("outputs", [])}
        opened = open_shards(ctx.input("shard"), shards, tok["vocab_size"], sums if cfg.verify_shards else None)
        n_windows = sum(sh.n_tokens // (cfg.model.seq_len + 1) for sh in opened)
    except ShardError as e:
        raise StageError(f"train: {e}") from None
    if n_windows < cfg.global_batch:
        raise StageError(f"train: {sum(sh.n_tokens for sh in opened)} training tokens make {n_windows} windows of "
                         f"{cfg.model.seq_len + 1}, fewer than train.global_batch {cfg.global_batch}")
    return tok, shards


def _spec(cfg: Config, ctx: StageContext, tok: dict, shards: list[str]) -> dict:
    threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // cfg.nproc)
    train = cfg.model_dump(mode="json", exclude={"model", "nproc", "timeout_s", "verify_shards", "nnodes"})
    if train["peak_flops"] is None and cfg.device == "cpu" and cfg.node_rank == 0:  # node 0's peak x nodes
        from stages.train.flops import measure_matmul_peak

        train["peak_flops"] = measure_matmul_peak(cfg.dtype, threads * cfg.nproc) * cfg.nnodes
        train["peak_measured"] = True
    return {
        "model": {**cfg.model.model_dump(), "vocab_size": tok["vocab_size"]},
        "train": {**train, "threads": threads, "progress_every_s": cfg.progress_every_s},
        "seed": ctx.cfg.run.seed,
        "shards_uri": ctx.input("shard").url(),
        "train_shards": shards,
        "out_uri": ctx.out.url(),
        "tokenizer": {k: tok.get(k) for k in ("vocab_size", "bos_id", "eos_id", "pad_id")},
        "summary_path": os.path.join(ctx.workdir, "summary.json"),
        "error_dir": os.path.join(ctx.workdir, "errors"),
        "staging_dir": os.path.join(ctx.workdir, "checkpoints"),
        "tensorboard_dir": os.path.join(ctx.workdir, "tensorboard"),
        "node": {"rank": cfg.node_rank, "nnodes": cfg.nnodes},
    }


def torchrun_args(nproc: int, nodes: dict | None = None) -> list[str]:
    """One node: ``--standalone``. Several (``nodes``: nnodes, node_rank, rdzv_endpoint, rdzv_id): a c10d
    rendezvous at node 0's endpoint; node 0's torchrun hosts the store there. Ranks are numbered by the
    rendezvous (``--node-rank`` is passed for the record; torchrun uses it only with the static backend)."""
    if not nodes or nodes["nnodes"] == 1:
        return ["--standalone", f"--nproc_per_node={nproc}"]
    return [f"--nnodes={nodes['nnodes']}", f"--node-rank={nodes['node_rank']}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={nodes['rdzv_endpoint']}", f"--rdzv-id={nodes['rdzv_id']}",
            f"--nproc_per_node={nproc}"]


def launch(spec: dict, nproc: int, workdir: str, timeout_s: int = 0,
           nodes: dict | None = None) -> tuple[int, list[str], list[str]]:
    """Run torchrun in its own process group; returns (exit code, all output lines, last stderr lines).

    Output is forwarded to the log as it comes. If this process is interrupted (Ctrl-C, a Prefect
    cancel) or the timeout passes, the whole group (torchrun and its workers) is terminated."""
    spec_path = os.path.join(workdir, "train_spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, nodes),
           "-m", "stages.train.worker", spec_path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=str(spec["train"]["threads"]), PYTHONUNBUFFERED="1")
    lines: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def pump(stream, is_err: bool):
        for raw in stream:
            line = raw.rstrip("\n")
            lines.append(line)
            step = re.match(r"\[train\] step (\d+)/(\d+) ", line)  # "[train] step 12/30 loss ...": progress artifact
            if step:
                stage_progress(int(step[1]), int(step[2]), "steps")
            if is_err:
                tail.append(line)
            log.info("%s", line)

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with_parent)
    pumps = [threading.Thread(target=pump, args=(proc.stdout, False), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, True), daemon=True)]
    for th in pumps:
        th.start()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while True:  # short waits: a blocking waitpid() would not notice a Ctrl-C delivered to another thread
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    raise
    except BaseException:  # interrupted or timed out: no orphaned ranks
        _kill_group(proc)
        raise
    for th in pumps:
        th.join(timeout=10)
    return rc, lines, list(tail)


def _die_with_parent() -> None:
    """Linux: torchrun gets SIGTERM (and stops its ranks) if this process dies without cleaning up (SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_pids(root: int) -> list[int]:
    """Descendants of ``root`` (torchrun's rank processes), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's group (torchrun then stops its ranks), SIGKILL whatever is left after a grace period.
    Ranks run in process groups of their own, so they are found as torchrun's descendants first."""
    ranks = _worker_pids(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    for pid in ranks:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"stages.train.worker" in f.read():  # still ours, not a reused pid
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _fingerprints(cfg: Config, ctx: StageContext, spec: dict) -> dict:
    """dataset: the training shards and tokenizer by content (sha256 from their manifests); config: what
    else decides the trajectory (model, optimisation, seed; not threads, timeouts or the peak)."""
    import hashlib

    sums = {o["path"]: o["sha256"] for o in ctx.inputs["shard"].get("outputs", []) if o["path"].startswith("tokens/train/")}
    sums |= {o["path"]: o["sha256"] for o in ctx.inputs["tokenizer"].get("outputs", []) if o["path"] == "tokenizer.model"}
    conf = {"model": spec["model"], "seed": spec["seed"],
            "train": {k: v for k, v in spec["train"].items() if k not in (
                "threads", "peak_flops", "peak_measured", "keep_checkpoints", "log_every", "progress_every_s",
                "compile")}}
    h = lambda o: hashlib.sha256(json.dumps(o, sort_keys=True).encode()).hexdigest()[:16]  # noqa: E731
    return {"dataset": h(sums), "config": h(conf)}


def _resume_step(ctx: StageContext, fp: dict) -> int | None:
    """The newest complete training state to resume from, or None (start over). A finished earlier run (its
    manifest exists: its fingerprint differed, or --force) or states of another config are cleared; states made
    on another dataset are refused."""
    from stages.train.checkpoint import complete_states

    if ctx.out.exists("manifest.json"):
        clear_stage_folder(ctx.out)  # its manifest first: never a manifest listing deleted files
        return None
    states = complete_states(ctx.out)
    if not states:
        return None
    step, marker = states[0]
    if marker.get("dataset") != fp["dataset"]:
        raise StageError(f"train: {ctx.out.url()} holds an interrupted run's checkpoint (step {step}) made on "
                         f"dataset {marker.get('dataset')}, but the shards and tokenizer now are "
                         f"{fp['dataset']}: refusing to resume; re-run with --force to start over")
    if marker.get("config") != fp["config"]:
        log.info("train: the interrupted run's checkpoints (step %d) used another train config: starting over", step)
        clear_stage_folder(ctx.out)
        return None
    log.info("train: resuming from the complete checkpoint at step %d", step)
    return step


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Train (see the module docstring); on several nodes this is node 0's call (see ``join_node``)."""
    if cfg.node_rank > 0:
        raise StageError(f"train: node_rank {cfg.node_rank} joins node 0's run with stages.train.join_node(); only "
                         "node 0 runs the stage (it holds the run and writes the manifest)")
    tok, shards = _check_inputs(cfg, ctx)
    spec = _spec(cfg, ctx, tok, shards)
    spec["fingerprints"] = _fingerprints(cfg, ctx, spec)
    spec["resume_step"] = _resume_step(ctx, spec["fingerprints"])
    mixture = _mixture(ctx)
    rc, lines, err_tail = _launch(cfg, spec, ctx.workdir)
    ctx.out.write_bytes("logs/torchrun.log", ("\n".join(lines) + "\n").encode())
    summary = _summary(cfg, spec, rc, err_tail)
    outputs = [p for p in ctx.out.list() if not p.endswith("manifest.json")]
    counts = {"tokens_trained": summary.pop("tokens_trained"), "steps": summary.pop("steps")}
    return StageResult(outputs=outputs, counts=counts,
                       metrics={**summary, "train_shards": len(shards), "data_mixture": mixture})


def join_node(cfg, storage: str, run_id: str) -> dict:
    """Node ``cfg.train.node_rank`` > 0 of a multi-node run: start this node's ranks and join node 0's rendezvous.
    Returns the run's summary (the manifest's metrics and counts, as global rank 0 made them).

    Semantics: every node gets the same profile; node 0 runs the stage (``kiln stage train``: it holds the run
    lock, decides resume or start over, and writes ``logs/torchrun.log`` and the manifest); each other node calls
    this (no run lock, no manifest, nothing written by this process). Storage must be shared (S3 or a shared file
    system): every rank reads the shards and uploads its own training-state shard. All ranks take node 0's
    decisions (resume step, fingerprints, peak FLOP/s) at start; global rank 0 (wherever the c10d rendezvous put it)
    writes the model, metrics, event files and DCP metadata. Inputs are read from their manifests, as a stage; a
    run already complete with this config (node 0 skips it) returns its manifest's summary without training."""
    import shutil
    import tempfile

    from stages.core.runner import load_inputs, read_manifest, stage_fingerprint
    from stages.core.storage import Storage

    t = cfg.train
    if t.node_rank == 0:
        raise StageError("train: node 0 runs the stage itself (kiln stage train); join_node is for node_rank > 0")
    root = (storage if isinstance(storage, Storage) else Storage(storage)).sub(run_id)
    inputs = load_inputs(root, "train")
    done = read_manifest(root, "train")
    if done and done.get("fingerprint") == stage_fingerprint(cfg, "train", inputs):  # node 0 will skip: so do we
        log.info("train: already complete in %s, node %d has nothing to join", root.url("train"), t.node_rank)
        return {**done["metrics"], **done["counts"]}
    workdir = tempfile.mkdtemp(prefix=f"kiln-train-node{t.node_rank}-")
    try:
        ctx = StageContext("train", run_id, cfg, root, root.sub("train"), inputs, workdir)
        tok, shards = _check_inputs(t, ctx)
        spec = _spec(t, ctx, tok, shards)
        spec["fingerprints"], spec["resume_step"] = _fingerprints(t, ctx, spec), None  # node 0's are used
        rc, _, err_tail = _launch(t, spec, workdir)
        return _summary(t, spec, rc, err_tail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _launch(cfg: Config, spec: dict, workdir: str) -> tuple[int, list[str], list[str]]:
    nodes = {"nnodes": cfg.nnodes, "node_rank": cfg.node_rank, "rdzv_endpoint": cfg.rdzv_endpoint,
             "rdzv_id": cfg.rdzv_id}
    try:
        return launch(spec, cfg.nproc, workdir, cfg.timeout_s, nodes)
    except subprocess.TimeoutExpired:
        raise StageError(f"train: torchrun exceeded train.timeout_s={cfg.timeout_s}s and was stopped") from None


def _summary(cfg: Config, spec: dict, rc: int, err_tail: list[str]) -> dict:
    """The summary global rank 0 made (every node's first rank writes a copy), or a one-line StageError."""
    if rc != 0:
        errs = []
        if os.path.isdir(spec["error_dir"]):
            errs = sorted(open(os.path.join(spec["error_dir"], f)).read().strip()
                          for f in os.listdir(spec["error_dir"]))
        cause = errs[0] if errs else " | ".join(l.strip() for l in err_tail[-5:] if l.strip())
        where = f" on node {cfg.node_rank}" if cfg.nnodes > 1 else ""
        raise StageError(f"train: torchrun exited with code {rc}{where}: {cause}")
    with open(spec["summary_path"]) as f:
        return json.load(f)


def _mixture(ctx: StageContext) -> dict | None:
    """The data mixture behind this run (shard's mixture.json: real tokens per domain, reweight's targets and
    the sha256 of its mixture.json), logged and kept in the manifest as part of the lineage."""
    if "mixture.json" not in ctx.input_files("shard"):
        return None
    mix = ctx.input("shard").read_json("mixture.json")
    out = {"key": mix["key"], "tokens": mix["tokens"], "reweight_mixture_sha256": mix["reweight_mixture_sha256"],
           "shares": {d: v["share"] for d, v in mix["domains"].items()},
           "epochs": {d: v["epochs"] for d, v in mix["domains"].items()}, "order": mix.get("order")}
    log.info("data mixture by %s (%s tokens): %s", mix["key"], f"{mix['tokens']:,}",
             ", ".join(f"{d} {v['share']:.1%}" + (f" ({v['epochs']:.2f} epochs)" if v["epochs"] is not None else "")
                       for d, v in mix["domains"].items()))
    return out
