"""kill -9 inside data stages (the quick version of bench/bench_chaos.py: 10 seeded trials over all 7 data stages).

Upstream stages are computed once, in this process, on a slice of real inputs (a WARC file of the sample crawl
and a cc_net JSONL file; the filter's fastText classifier off: it is bench_chaos's to kill), with a snapshot of
the storage before each stage and each stage's outputs and document ids as the reference. A trial starts
``kiln stage <stage>`` in its own process group, SIGKILLs the group a seeded random time after the run lock
appears, checks that nothing partial is visible to the next stage, re-runs the stage (taking over the dead
holder's lock) and compares with the reference strictly: every output byte-identical (stats.json included: no
timing in it).
"""

import random
import shutil
import sys
import time
from collections import Counter

from conftest import CRAWL, ROOT, SHARED

sys.path.insert(0, str(ROOT / "bench"))
import bench_chaos as bc  # noqa: E402

STAGES = bc.DATA_STAGES
OVER = {"ingest.inputs": [str(CRAWL / "docs.python.org-0002.warc.gz"), str(SHARED / "jsonl" / "cc_en_head-0091.jsonl.gz")],
        "dedup.index": "dedup.index", "run.workers": 1, "filter.quality.enabled": False}


def test_kill9_inside_data_stages_leaves_nothing_partial_and_reruns_match(tmp_path):
    trial, ref = tmp_path / "trial", {}
    trial.mkdir()
    for stage in STAGES:  # the reference chain, uninterrupted
        shutil.copytree(trial, tmp_path / "pre" / stage)
        t0 = time.perf_counter()
        m = bc.rerun(stage, trial, OVER)
        ref[stage] = {"wall": time.perf_counter() - t0, "outputs": bc.outputs(m), "ids": bc.doc_ids(trial, stage, m)}
    assert sum(ref["shard"]["ids"].values()) > 10

    rng, killed, stale, seen = random.Random(9), 0, 0, Counter()
    for i in range(10):
        stage = STAGES[i % len(STAGES)]
        delay = rng.uniform(0, 1) * ref[stage]["wall"]  # in-process time: the CLI's is longer (imports after the lock)
        bc.reset(trial, tmp_path / "pre" / stage)
        k = bc.run_cli(stage, trial, OVER, kill_after=delay, log=tmp_path / f"killed-{i}.log")
        killed += k["killed"]
        assert k["orphans"] == 0, f"trial {i} {stage}: processes of the killed group left"
        assert bc.visible_problems(trial, stage) == [], f"trial {i} {stage} killed at {delay:.2f} s"
        stale += (trial / bc.RUN_ID / ".lock.json").exists()  # the dead holder's lock, left behind
        m = bc.rerun(stage, trial, OVER)  # RunLocked here would be a stale lock refusing the re-run
        c = bc.compare(stage, trial, m, ref[stage])
        assert c["byte_identical"], f"trial {i} {stage}: outputs differ from the reference: {c['diff']}"
        assert c["lost"] == 0 and c["doubled"] == 0, f"trial {i} {stage}: {c}"
        seen[stage] += 1
    assert killed >= 5, f"only {killed} of 10 kills landed before the stage finished"
    assert stale >= 5  # ... and every re-run above took it over
    assert len(seen) == len(STAGES)
