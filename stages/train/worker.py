"""The training process torchrun starts once per rank: ``python -m stages.train.worker SPEC.json``.

SPEC (written by stages.train.run) holds the resolved settings: model and optimisation config, the
shard storage and files, the output storage, the seed, and local paths for the summary and errors.
Rank 0 writes checkpoints, ``metrics.jsonl``, the TensorBoard event files and the summary (broadcast: every
node's first rank keeps a copy for its stage call); a failing rank writes one line to
``<error_dir>/rank<N>.txt`` so the parent can report the cause instead of torchrun's wrapper trace.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
import traceback

import torch

from stages.core.storage import Storage
from stages.train import parallel
from stages.train.checkpoint import complete_states, load_state, save_model, save_state, step_dir
from stages.train.data import micro_batches, training_data
from stages.train.model import GPT, GPTConfig


def lr_at(step: int, t: dict) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then ``schedule``: ``cosine`` decay to ``lr * min_lr_ratio``
    at the last step, or ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of the steps,
    then linear decay to ``lr * min_lr_ratio``."""
    lr, warm, total, floor = t["lr"], t["warmup_steps"], t["steps"], t["min_lr_ratio"]
    if step < warm:
        return lr * (step + 1) / warm
    if t.get("schedule", "cosine") == "wsd":
        decay = max(1, round(t.get("decay_fraction", 0.2) * total))
        start = max(warm, total - decay)
        if step < start:
            return lr
        return lr * (1 - (1 - floor) * min(1.0, (step - start + 1) / max(1, total - start)))
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, t: dict) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (>= 2-D: linear weights, embedding), none on norms/biases. The fused
    kernel (one pass over each parameter on CPU and GPU): on the bench shape (5.3 M parameters, 2 threads) the
    optimizer step went from ~9 to ~3 ms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]), eps=1e-8, fused=True)


def autocast(device: torch.device, dtype: str, compiled: bool = False):
    """bf16: matmuls in bf16 under autocast; weights, gradients and optimizer state stay fp32. A compiled model on
    CPU also gets SDPA's math backend (parallel.attention_backend)."""
    ctx = contextlib.ExitStack()
    ctx.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"))
    ctx.enter_context(parallel.attention_backend(device, compiled))
    return ctx


def _decisions(spec: dict, d: parallel.Dist) -> dict:
    """What node 0's stage call decided (resume step, fingerprints, the peak FLOP/s), on every
    rank. With several nodes torchrun's c10d rendezvous numbers the ranks in its own order, so global rank 0 may
    run on another node than node_rank 0: the decisions come from the first rank of node_rank 0."""
    t = spec["train"]
    mine = {"node_rank": spec.get("node", {}).get("rank", 0), "resume_step": spec.get("resume_step"),
            "fingerprints": spec.get("fingerprints", {}), "peak_flops": t.get("peak_flops"),
            "peak_measured": t.get("peak_measured", False)}
    if d.world == 1:
        return mine
    every = [None] * d.world
    torch.distributed.all_gather_object(every, mine)
    return next(x for x in every if x["node_rank"] == 0)


def train(spec: dict) -> None:
    t = spec["train"]
    d = parallel.init(t["backend"])
    torch.set_num_threads(t["threads"])
    torch.manual_seed(spec["seed"])  # identical init on every rank (DDP also broadcasts rank 0's)
    decided = _decisions(spec, d)
    t = {**t, "peak_flops": decided["peak_flops"], "peak_measured": decided["peak_measured"]}
    # prints and the progress bar: the first rank of node 0 (its stage call keeps the log); files: global rank 0
    show = d.local_rank == 0 and spec.get("node", {}).get("rank", 0) == 0

    gcfg = GPTConfig(**spec["model"])
    ds, sampler = training_data(spec)  # the spec's shards in order; curriculum: phases in order
    accum = t["global_batch"] // (t["micro_batch"] * d.world)

    device = parallel.device(t["device"], d)
    model = GPT(gcfg).to(device)
    n_params, flops_tok = model.num_params(), model.flops_per_token()
    if t.get("activation_checkpointing"):
        parallel.checkpoint_activations(model)
    if t.get("compile"):
        parallel.compile_model(model)
    dmodel = parallel.parallelize(model, d, t.get("strategy", "ddp"), device)
    opt = build_optimizer(model, t)
    out = Storage(spec["out_uri"])
    tokens_per_step = t["global_batch"] * gcfg.seq_len
    info = {"tokenizer": spec.get("tokenizer", {}), "seed": spec["seed"]}
    if show:
        print(f"[train] {n_params / 1e6:.2f}M params, {d.world} rank(s), {t.get('strategy', 'ddp')}, "
              f"{accum} micro-batch(es) of {t['micro_batch']} per rank, {tokens_per_step} tokens/step, "
              f"{len(ds)} windows" + (", compiled" if t.get("compile") else ""), flush=True)

    start, metrics = 0, []
    if decided["resume_step"]:  # exact resume: weights, optimizer moments and step; batches follow the step
        start = decided["resume_step"]
        load_state(out, start, model, opt, d, spec["staging_dir"])
        metrics = [m for m in dict(complete_states(out))[start].get("metrics", []) if m["step"] <= start]
        if show:
            print(f"[train] resumed at step {start}", flush=True)
    meta = {**decided["fingerprints"]}
    board = Board(spec, out, metrics) if d.is_main else None
    bar = Progress(t["steps"], start, t.get("progress_every_s", 10.0)) if show else None
    t_start, t_last, tok_since, loss_since, steps_since = time.time(), time.time(), 0, 0.0, 0
    for step in range(start, t["steps"]):
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        batches = micro_batches(ds, sampler.rank_batch(step, d.rank, d.world), t["micro_batch"])
        for j, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with parallel.no_sync(dmodel, j < accum - 1):
                with autocast(device, t["dtype"], bool(t.get("compile"))):
                    _, loss = dmodel(x, y)
                (loss / accum).backward()
            loss_sum += loss.item()
        gnorm = parallel.clip_grad_norm(model, t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

        loss_since, steps_since = loss_since + loss_sum / accum, steps_since + 1
        tok_since += tokens_per_step
        done = step + 1
        if done % t["log_every"] == 0 or done == t["steps"]:
            loss_mean = parallel.mean(loss_since / steps_since, d)  # over ranks and the steps since last row
            now = time.time()
            tps = tok_since / max(now - t_last, 1e-9)
            row = {"step": done, "loss": round(loss_mean, 5), "lr": lr, "grad_norm": round(gnorm, 4),
                   "tokens": done * tokens_per_step, "tokens_per_s": round(tps, 1),
                   "gflops_per_s": round(tps * flops_tok / 1e9, 2), "elapsed_s": round(now - t_start, 2),
                   "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
            if t.get("peak_flops"):
                row["mfu"] = round(tps * flops_tok / t["peak_flops"], 4)
            metrics.append(row)
            t_last, tok_since, loss_since, steps_since = now, 0, 0.0, 0
            if board:
                board.add(row)
            if show:
                bar.log(f"[train] step {done}/{t['steps']} loss {loss_mean:.4f} lr {lr:.2e} "
                        f"{tps:,.0f} tok/s" + (f" MFU {row['mfu']:.1%}" if "mfu" in row else ""))
        if show:
            bar.update(done, metrics[-1] if metrics else None)
        if t["checkpoint_every"] and done % t["checkpoint_every"] == 0 and done < t["steps"]:
            state = parallel.full_state_dict(model, d)  # collective under FSDP
            if d.is_main:
                save_model(out, step_dir(done), state, gcfg, {**info, "step": done, "tokens": done * tokens_per_step})
                out.write_bytes("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())
            save_state(out, done, model, opt, d, spec["staging_dir"], {**meta, "metrics": metrics},
                       t.get("keep_checkpoints", 0))
            if board:  # after the state is complete: stored event files never run ahead of a resumable state
                board.upload()
    if bar:
        bar.close()

    wall = time.time() - t_start
    state = parallel.full_state_dict(model, d)
    summary = None
    if d.is_main:
        end = {**info, "step": t["steps"], "tokens": t["steps"] * tokens_per_step}
        save_model(out, step_dir(t["steps"]), state, gcfg, end)
        save_model(out, "final", state, gcfg, end, safetensors=True)
        out.write_bytes("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())
        board.close()
        tail = [m["loss"] for m in metrics[-5:]]
        steady = [m["tokens_per_s"] for m in metrics[1:]] or [m["tokens_per_s"] for m in metrics]
        summary = {"steps": t["steps"], "tokens_trained": t["steps"] * tokens_per_step, "params": n_params,
                   "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
                   "final_loss_avg5": round(sum(tail) / len(tail), 5),
                   "tokens_per_s": round(sum(steady) / len(steady), 1),
                   "tokens_per_s_overall": round(t["steps"] * tokens_per_step / wall, 1),
                   "flops_per_token": flops_tok, "world_size": d.world, "dtype": t["dtype"],
                   "strategy": t.get("strategy", "ddp"), "compile": bool(t.get("compile")),
                   "train_wall_s": round(wall, 2), "train_windows": len(ds)}
        if t.get("peak_flops"):
            summary.update(peak_flops=t["peak_flops"], peak_measured=bool(t.get("peak_measured")),
                           mfu=round(summary["tokens_per_s"] * flops_tok / t["peak_flops"], 4))
    summary = parallel.broadcast(summary, d)  # every node's stage call gets it (rank 0 may run on any node)
    if d.local_rank == 0:
        with open(spec["summary_path"], "w") as f:
            json.dump(summary, f)
    parallel.barrier(d)
    del dmodel, model, opt  # drop the wrappers' references to the process group before destroying it
    parallel.shutdown()


class Board:
    """TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``), written by rank 0 to a local folder
    and copied to ``tensorboard/`` in the output storage at every checkpoint and at the end, so they work with
    S3 too. A resumed run starts a new event file with the restored rows (those of the state it resumed from) and
    removes the earlier attempts' files: the stored events are always exactly ``metrics.jsonl``'s rows, even when
    the killed attempt had logged past its last complete state or died before uploading its events."""

    TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_s": "perf/tokens_per_s", "gflops_per_s": "perf/gflops_per_s", "mfu": "perf/mfu",
            "max_rss_mb": "memory/max_rss_mb"}

    def __init__(self, spec: dict, out: Storage, history: list[dict] = ()):
        from torch.utils.tensorboard import SummaryWriter

        self.local, self.out = spec["tensorboard_dir"], out
        self.writer = SummaryWriter(self.local)
        if history:
            out.rm("tensorboard")
            for row in history:
                self.add(row)

    def add(self, row: dict) -> None:
        for key, tag in self.TAGS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], row["step"])

    def upload(self) -> None:
        self.writer.flush()
        for f in sorted(os.listdir(self.local)):
            self.out.put_file(os.path.join(self.local, f), f"tensorboard/{f}")

    def close(self) -> None:
        self.upload()
        self.writer.close()


class Progress:
    """A tqdm progress bar for the first rank of node 0 (steps, loss, tokens/s). On a terminal: tqdm's live bar,
    the ``[train] step`` lines printed above it. Not on a terminal (the stage pipes torchrun's output into its log):
    no carriage-return redraws; the same tqdm meter as a plain line every ``every_s`` seconds (0: none)."""

    def __init__(self, total: int, start: int, every_s: float, file=None):
        from tqdm import tqdm

        self.file = file or sys.stdout
        self.tty = self.file.isatty()
        self.total, self.start, self.every_s, self.t0 = total, start, every_s, time.time()
        self.last_line = self.t0
        self.bar = (tqdm(total=total, initial=start, file=self.file, unit="step", dynamic_ncols=True)
                    if self.tty else None)
        self.format = tqdm.format_meter

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def update(self, done: int, row: dict | None) -> None:
        post = f"loss {row['loss']:.4f}, {row['tokens_per_s']:,.0f} tok/s" if row else ""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(post, refresh=False)
            return
        now = time.time()
        if self.every_s and (now - self.last_line >= self.every_s or done == self.total):
            self.last_line = now
            meter = self.format(done, self.total, now - self.t0, unit="step", initial=self.start, ncols=100,
                                postfix=post, ascii=True)
            print(f"[train] progress {meter}", file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _die_with_torchrun() -> None:
    """Linux: this rank is killed if torchrun dies without stopping it (SIGKILL of the agent): no orphan
    ranks writing checkpoints after their job is gone."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    import faulthandler

    faulthandler.enable()  # a rank killed by a signal (SIGABRT from C++, SIGSEGV) prints its Python stack
    _die_with_torchrun()
    with open(argv[0]) as f:
        spec = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    try:
        train(spec)
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line, full trace on stderr
        traceback.print_exc()
        os.makedirs(spec["error_dir"], exist_ok=True)
        with open(os.path.join(spec["error_dir"], f"rank{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__)
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # no interpreter teardown: a process group still referenced (DDP's reducer, an FSDP mesh) would be destroyed
    # during finalization, and gloo's worker threads then abort the process now and then (SIGABRT, "terminate
    # called without an active exception": seen here in 3 of ~17 2-rank runs under load, none in 15 since);
    # everything is written by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
