"""Running datatrove pipelines for data stages, and reading their per-block stats back.

The same list of pipeline blocks runs on the datatrove executor ``run.executor.kind`` names (stages/core/config.py):

- ``local``: ``LocalPipelineExecutor``, ``run.workers`` processes on this machine (the default).
- ``ray``: ``RayPipelineExecutor`` on a running Ray cluster (``run.executor.ray.address``; ``ray.init`` here if
  this process is not connected yet). One Ray task per datatrove task, at most ``run.workers`` in flight.
- ``slurm``: ``SlurmPipelineExecutor``: one ``sbatch`` job array per pipeline (array size = tasks, throttled to
  ``%run.workers``), each element running the dill-pickled executor with datatrove's ``launch_pickled_pipeline``.
  The stage then waits like the local executor does: it polls datatrove's completion markers
  (``<logs>/completions/NNNNN``) every ``slurm.poll_s`` and returns once every task wrote one, so the runner writes
  the manifest only for a finished stage and the next stage reads complete inputs. If the array leaves the queue
  (``squeue``) with tasks missing, or ``slurm.wait_timeout_s`` passes, the stage fails with the missing ranks and
  the Slurm log folder (a crashed task never leaves the queue silently "done"). Waiting blocks the submitting
  process; it uses no compute of the cluster.

Stats come back the same way for all three: summed over tasks per block (``stats_by_block``); the local executor
returns them, Ray and Slurm tasks write ``<logs>/stats/NNNNN.json`` that are summed here.

On more than one machine every task must reach what the stage reads and writes: the storage (``s3://`` or a shared
filesystem) and the stage's scratch folder ``ctx.workdir`` (upstream file lists, dedup's signatures), which the
runner creates with ``tempfile.mkdtemp``: point ``TMPDIR`` at a shared filesystem on the submitting machine. Ray
workers and Slurm nodes need the same Python environment (kiln installed) at the same path.
"""

from __future__ import annotations

import os
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.stats import Stats

from stages.core.runner import StageContext, StageError, StageResult

os.environ.setdefault("TLDEXTRACT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kiln", "tldextract"))


class Tally(PipelineStep):
    """Counts documents, UTF-8 bytes and whitespace-separated words passing through (no change)."""

    name = "tally"
    type = "📊 - STATS"

    def __init__(self, label: str = "tally", words: bool = True):
        super().__init__()
        self.name, self.words = label, words
        self.stats = Stats(str(self))  # datatrove names the stats block in __init__, before our label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("documents")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            if self.words:  # a split of every text: skipped where tokens are the measure (shard)
                self.stat_update("words", value=len(doc.text.split()))
            yield doc


def upstream_reader(ctx: StageContext, stage: str, **kwargs):
    """A datatrove JsonlReader over exactly the ``data/`` files that ``stage``'s manifest lists. Without
    datatrove's ``metadata.file_path`` (its default): that absolute path of the upstream file made every stage's
    output depend on where the storage lives (same data, other bytes) and leaked local paths into shards."""
    from datatrove.pipeline.readers import JsonlReader

    files = ctx.input_files(stage, prefix="data/", suffix=".jsonl.gz")
    paths_file = os.path.join(ctx.workdir, f"{stage}-inputs.txt")
    with open(paths_file, "w") as f:
        f.writelines(p[len("data/"):] + "\n" for p in files)
    return JsonlReader(ctx.input(stage).datafolder("data"), paths_file=paths_file, **{"add_file_path": False, **kwargs})


def check_upstream_read(ctx: StageContext, stage: str, read: int) -> None:
    """A StageError when fewer documents were read from ``stage``'s data files than the ``documents_out`` its
    manifest counts: datatrove's JsonlReader skips a line that is not JSON (and the rest of a file that is not
    UTF-8) with only a log line, so damaged upstream files would otherwise lose documents silently. Called by every
    stage that reads a whole upstream stage's documents (normalize, dedup, filter, reweight, tokenizer, shard)."""
    expected = (ctx.inputs[stage].get("counts") or {}).get("documents_out")
    if isinstance(expected, int) and read < expected:
        raise StageError(f"{ctx.stage}: read {read} documents of the {expected} that the {stage} manifest counts in "
                         f"{ctx.input(stage).url('data')}: its data files were damaged or changed after the "
                         f"manifest was written (datatrove's log names the file: 'Error when reading'); re-run "
                         f"`kiln stage {stage} --force`")


def output_steps(ctx: StageContext) -> list:
    """The last blocks of every document stage: a ``Tally("tally_out")`` and datatrove JSONL in ``data/``
    (one file per task). ``data_result`` turns them into the stage's outputs and counts."""
    from datatrove.pipeline.writers import JsonlWriter

    return [Tally("tally_out"), JsonlWriter(ctx.out.datafolder("data"), output_filename="${rank}.jsonl.gz")]


def data_result(ctx: StageContext, blocks: dict, documents_in: int, removed: dict[str, int],
                extra_outputs: tuple[str, ...] = (), metrics: dict | None = None, **counts) -> StageResult:
    """The StageResult of a pipeline that ended with ``output_steps``: documents/bytes/words out from the
    tally, ``removed`` by reason, the written ``data/`` files (plus ``extra_outputs``) as outputs."""
    tally = tally_counts(block_stats(blocks, "tally_out"))
    return StageResult(
        outputs=[*extra_outputs, *ctx.out.list("data", suffix=".jsonl.gz")],
        counts={"documents_in": documents_in, "documents_out": tally["documents"], "bytes_out": tally["bytes"],
                "words_out": tally["words"], "removed": removed, **counts},
        metrics={"blocks": blocks} if metrics is None else metrics)


def run_pipeline(ctx: StageContext, steps: list, name: str = "main", tasks: int | None = None,
                 workers: int | None = None, in_process: bool = False) -> dict[str, dict[str, Any]]:
    """Run ``steps`` with the configured executor (``run.executor``) and wait for them; returns
    {block name: {stat: value}} summed over tasks.

    Block names that repeat get a ``#N`` suffix, in pipeline order. ``in_process``: one task in this process,
    the blocks' generators chained as datatrove's executor chains them per task, without its Manager process and
    per-task log files (~35 ms a run: 3% of the shard stage on the 12.5 MB bench corpus); for small inputs.
    """
    if in_process:
        from collections import deque

        from datatrove.utils.stats import PipelineStats

        data = None
        for step in steps:
            data = step(data, 0, 1)
        deque(data, maxlen=0)
        return stats_by_block(PipelineStats(steps))

    run = ctx.cfg.run
    tasks = tasks or run.tasks
    workers = min(workers or run.workers, tasks)
    executor = build_executor(ctx, steps, name, tasks, workers)
    logs = executor.logging_dir  # progress: datatrove's completion markers, the same for every executor
    watching = ctx.watch(lambda: len(logs.list_files("completions")), tasks, f"{name} tasks",
                         every_s=1.0 if logs.is_local() else 5.0)
    try:
        if run.executor.kind == "local":
            stats = stats_by_block(executor.run())
        else:
            if run.executor.kind == "ray":
                _ray_connect(run.executor.ray)
                executor.run()
            else:
                executor.launch_job()
                if executor.job_id != -1:  # -1: datatrove found every task complete and submitted nothing
                    wait_slurm(executor, run.executor.slurm.poll_s, run.executor.slurm.wait_timeout_s)
            _check_complete(executor)
            stats = stats_by_block(read_task_stats(executor.logging_dir, tasks))
    finally:
        watching.set()
    ctx.progress(tasks, tasks, f"{name} tasks")  # all done (the watcher's last tick may have come before)
    return stats


def build_executor(ctx: StageContext, steps: list, name: str, tasks: int, workers: int, depends=None):
    """The datatrove executor ``run.executor.kind`` names, for ``steps`` with ``tasks`` tasks of which at most
    ``workers`` run at once; logs, per-task stats and completion markers in ``<stage>/logs/<name>``.
    ``depends``: an executor of the same kind that must finish first (Slurm: ``--dependency=afterok:<job>``;
    ``run_pipeline`` waits for each pipeline instead, so it never passes one)."""
    ex = ctx.cfg.run.executor
    common = dict(pipeline=steps, tasks=tasks, workers=workers, logging_dir=ctx.out.datafolder(f"logs/{name}"),
                  skip_completed=False, depends=depends)
    if ex.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(**common)
    if ex.kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        o = ex.ray
        return RayPipelineExecutor(**common, cpus_per_task=o.cpus_per_task, mem_per_cpu_gb=o.mem_per_cpu_gb,
                                   tasks_per_job=o.tasks_per_job, time=o.time_s)
    import sys

    from datatrove.executor import SlurmPipelineExecutor

    o = ex.slurm
    venv = o.venv or os.path.join(sys.prefix, "bin", "activate")  # the submitting interpreter's venv by default
    job = f"{o.job_name}-{ctx.run_id}-{name if name.startswith(ctx.stage) else f'{ctx.stage}-{name}'}"
    return SlurmPipelineExecutor(
        **common, time=o.time, partition=o.partition, cpus_per_task=o.cpus_per_task, mem_per_cpu_gb=o.mem_per_cpu_gb,
        job_name=job, qos=o.qos, env_command=o.env_command, venv_path=None if o.env_command else venv,
        sbatch_args=dict(o.sbatch_args), max_array_size=o.max_array_size, tasks_per_job=o.tasks_per_job,
        slurm_logs_folder=os.path.join(o.logs_dir, job) if o.logs_dir else None, mail_user=o.mail_user)


def _ray_connect(opts) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=opts.address, log_to_driver=opts.log_to_driver, configure_logging=False)


def wait_slurm(executor, poll_s: float, timeout_s: float | None) -> None:
    """Block until every task of ``executor``'s submitted job array wrote its completion marker. Fails when the
    array has left the queue (``squeue``) with tasks missing, or after ``timeout_s``."""
    import subprocess
    import time

    t0 = time.monotonic()
    while True:
        if not executor.get_incomplete_ranks(skip_completed=True):
            return
        q = subprocess.run(["squeue", "-h", "-j", str(executor.job_id), "-o", "%i %T"], capture_output=True,
                           text=True)
        queued = q.returncode == 0 and q.stdout.strip()
        if not queued and not (missing := executor.get_incomplete_ranks(skip_completed=True)):
            return  # finished between the two looks
        if not queued:
            raise RuntimeError(f"Slurm job {executor.job_id} ({executor.job_name}) left the queue with "
                               f"{len(missing)}/{executor.world_size} tasks incomplete (ranks {missing[:10]}"
                               f"{'...' if len(missing) > 10 else ''}); Slurm logs: {executor.slurm_logs_folder}, "
                               f"task logs: {executor.logging_dir.path}/logs")
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"Slurm job {executor.job_id} ({executor.job_name}) not complete after {timeout_s:.0f} s"
                               f" (still queued: {queued.splitlines()[0]} ...); it keeps running: cancel it with "
                               f"scancel {executor.job_id} or rerun the stage once it is done")
        time.sleep(poll_s)


def _check_complete(executor) -> None:
    missing = executor.get_incomplete_ranks(skip_completed=True)
    if missing:  # datatrove's Ray executor only logs a warning when tasks failed
        raise RuntimeError(f"{type(executor).__name__}: {len(missing)}/{executor.world_size} tasks did not complete "
                           f"(ranks {missing[:10]}); task logs: {executor.logging_dir.path}/logs")


def read_task_stats(logging_dir, tasks: int):
    """The per-task stats files Ray and Slurm tasks write (``stats/NNNNN.json``), summed as the local executor
    sums them."""
    import json

    from datatrove.utils.stats import PipelineStats

    total = PipelineStats()
    for rank in range(tasks):
        with logging_dir.open(f"stats/{rank:05d}.json", "r") as f:
            total += PipelineStats.from_json(json.load(f))
    return total


def stats_by_block(pipeline_stats) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for st in pipeline_stats.stats:
        key, n = st.name, 2
        while key in out:
            key, n = f"{st.name}#{n}", n + 1
        vals = {}
        for k, v in st.stats.items():
            vals[k] = v.total if hasattr(v, "total") else v
        out[key] = vals
    return out


def block_stats(stats: dict, name: str) -> dict:
    """One block's stats from ``run_pipeline`` (keys are datatrove's ``"<type>: <name>"`` or plain names)."""
    for key, vals in stats.items():
        if key == name or key.endswith(f": {name}"):
            return vals
    return {}


def tally_counts(block: dict[str, Any]) -> dict[str, int]:
    return {k: int(block.get(k, 0)) for k in ("documents", "bytes", "words")}
