"""Running datatrove pipelines for data stages, and reading their per-block stats back.

The same list of pipeline blocks runs on datatrove's local executor here; other executors (Slurm,
Ray) take the same blocks.
"""

from __future__ import annotations

import os
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.stats import Stats

from stages.core.runner import StageContext, StageResult

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
    """A datatrove JsonlReader over exactly the ``data/`` files that ``stage``'s manifest lists."""
    from datatrove.pipeline.readers import JsonlReader

    files = ctx.input_files(stage, prefix="data/", suffix=".jsonl.gz")
    paths_file = os.path.join(ctx.workdir, f"{stage}-inputs.txt")
    with open(paths_file, "w") as f:
        f.writelines(p[len("data/"):] + "\n" for p in files)
    return JsonlReader(ctx.input(stage).datafolder("data"), paths_file=paths_file, **kwargs)


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
    """Run ``steps`` with the configured executor; returns {block name: {stat: value}} summed over tasks.

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

    from datatrove.executor import LocalPipelineExecutor

    run = ctx.cfg.run
    tasks = tasks or run.tasks
    workers = min(workers or run.workers, tasks)
    executor = LocalPipelineExecutor(
        pipeline=steps,
        tasks=tasks,
        workers=workers,
        logging_dir=ctx.out.datafolder(f"logs/{name}"),
        skip_completed=False,
    )
    stats = executor.run()
    return stats_by_block(stats)


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
