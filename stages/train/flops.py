"""The hardware peak that MFU is measured against.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token = 6·N + 12·L·d·T (``GPT.flops_per_token``:
forward + backward of every matmul weight, plus attention scores and values; PaLM appendix B). The peak comes
from ``train.peak_flops`` (e.g. 989e12 for an H100's dense bf16), else, on CPU, from a measurement: square
matmuls in the training dtype on as many threads as the run's ranks use together, best of a few repeats (on
the 2-core AMD EPYC of this machine: ~415 GFLOP/s bf16, ~190 fp32).
"""

from __future__ import annotations

import time


def measure_matmul_peak(dtype: str = "bf16", threads: int = 1, n: int = 1024, seconds: float = 0.6) -> float:
    """FLOP/s of ``n x n`` matmuls (2·n³ each) in ``dtype`` ("bf16" | "fp32") on ``threads`` threads: the best
    rate over repeats lasting ``seconds`` in total (after a warm-up)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b  # warm-up
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(prev)
