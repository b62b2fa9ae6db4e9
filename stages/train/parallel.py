"""Distribution, applied from outside the model: process group setup, DDP wrapping, collectives.

The worker calls ``init()`` once (torchrun provides RANK/WORLD_SIZE/MASTER_ADDR), ``parallelize()``
on the bare model, and ``unwrap()`` to reach the bare model again for checkpoints. Other strategies
(FSDP2 ``fully_shard`` on a device mesh) slot in here without touching model.py.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(backend: str = "gloo") -> Dist:
    """Join the process group torchrun set up; a plain ``python -m`` run is a world of one."""
    if "RANK" not in os.environ:
        return Dist()
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device(kind: str, d: Dist) -> torch.device:
    """CPU, or this rank's GPU (``cuda:LOCAL_RANK``)."""
    if kind == "cuda":
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Activation checkpointing per transformer block (torchtitan's way: each ``model.blocks[i]`` wrapped, no
    reentrant autograd): the block's activations are recomputed in backward instead of stored. In place; state
    dict keys are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def parallelize(model: nn.Module, d: Dist, strategy: str = "ddp", dev: torch.device | None = None) -> nn.Module:
    """Wrap the model for data parallelism. One rank: the model as is."""
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        on_gpu = dev is not None and dev.type == "cuda"
        return DDP(model, device_ids=[dev.index] if on_gpu else None)
    raise ValueError(f"unknown parallel strategy '{strategy}'")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


def mean(value: float, d: Dist) -> float:
    """Average a Python number over ranks (for logging)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
