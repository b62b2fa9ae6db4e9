"""Chaos: SIGKILL at a random moment inside each data stage, then a re-run; nothing partial may be visible and the
re-run must equal an uninterrupted run.

Setup: the tiny profile on a slice of real inputs (``SLICE``: 2 WARC files and 1 JSONL file), stage by stage with
``kiln stage`` in ``_work/chaos/trial``; before each stage the storage is copied to ``_work/chaos/pre/<stage>``
(upstream stages computed once; the dedup index lives in the storage, ``dedup.index``, so every trial starts from
its own copy). Each stage's manifest outputs and document ids are the reference; a second uninterrupted run of
every stage must write the same bytes (``varies_by_design``: the outputs that differ between two identical runs;
none since the filter's quality report and the tokenizer's stats.json hold no wall-clock timings: those are
manifest metrics). The comparison is strict: every output byte-identical, no key of any JSON output set aside.

References and re-runs use ``run.workers: 1`` (datatrove runs the 2 tasks one after the other in the stage's
process: 30 s for the 7 stages against 54 s with a worker pool on this shared machine); the killed attempts
alternate, every other round of 7 trials, with ``run.workers: 2`` (a pool of worker processes that the kill must
take down too; workers are not part of the fingerprint and do not change the outputs).

A trial (seeded: stage = trial mod 7, delay drawn from ``random.Random(seed)``): copy ``pre/<stage>`` to
``trial``, start ``kiln stage <stage>`` in its own session (process group), wait for its run lock to appear (the
stage proper starts; Python start-up is not what we test), sleep ``U(0, 1) x`` the stage's reference time
(lock to exit; x 1.5 with the worker pool), SIGKILL the whole group. Then check what the next stage would see:
  * the stage's ``manifest.json`` is absent, or valid JSON whose every output exists with its sha256;
  * without it, the next stage refuses to start (``MissingInput``): nothing it would read without a manifest;
  * the dedup index (read without a manifest) lists only segments whose three files exist;
  * no process of the killed group is left.
Re-run the stage in this process (``run_stage``, lock wait 0: the killed holder's stale lock must be taken over)
and compare: manifest outputs byte-identical to the reference (path, bytes, sha256; nothing excepted), document ids (``data/``
JSONL, or the shard's Parquet ``id`` column) equal as a multiset: none lost, none doubled.

    .venv/bin/python bench/bench_chaos.py [--trials 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work" / "chaos"
SHARED = ROOT.parent / "shared" / "data"
# a slice of real inputs, three files of two kinds (WARC pages to extract, JSONL documents): 37 documents
SLICE = [SHARED / "crawl" / "docs.python.org-0002.warc.gz", SHARED / "warc" / "sample-0000.warc.gz",
         SHARED / "jsonl" / "cc_en_head-0091.jsonl.gz"]
DATA_STAGES = ["ingest", "normalize", "dedup", "filter", "reweight", "tokenizer", "shard"]
RUN_ID = "chaos"


def overrides(inputs: list[str] | None = None) -> dict:
    return {"ingest.inputs": inputs or [str(f) for f in SLICE], "dedup.index": "dedup.index", "run.workers": 1}


def kiln_cmd(stage: str, store: Path, over: dict) -> list[str]:
    sets = [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return [sys.executable, "-m", "flows.cli", "stage", stage, "--storage", str(store), "--run-id", RUN_ID, *sets]


def env() -> dict:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "KILN_LOCK_WAIT_S": "0",
            "PYTHONPATH": str(ROOT)}


# -- what a stage left ------------------------------------------------------------------------------------------
def manifest(store: Path, stage: str) -> dict | None:
    p = store / RUN_ID / stage / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else None


def outputs(m: dict) -> dict[str, tuple[int, str]]:
    return {o["path"]: (o["bytes"], o["sha256"]) for o in m["outputs"]}


def doc_ids(store: Path, stage: str, m: dict) -> Counter | None:
    """Document ids of a stage's outputs (a multiset): data/ JSONL, or the shard's Parquet rows; None: no documents."""
    folder, ids = store / RUN_ID / stage, Counter()
    if stage == "tokenizer":
        return None
    if stage == "shard":
        import pyarrow.parquet as pq

        for rel in outputs(m):
            if rel.endswith(".parquet"):
                ids.update(pq.read_table(folder / rel, columns=["id"]).column("id").to_pylist())
        return ids
    for rel in outputs(m):
        if rel.startswith("data/") and rel.endswith(".jsonl.gz"):
            with gzip.open(folder / rel, "rb") as f:
                ids.update(json.loads(line)["id"] for line in f if line.strip())
    return ids


def visible_problems(store: Path, stage: str) -> list[str]:
    """What the next stage could see of a killed attempt; [] when nothing partial is visible."""
    from stages import STAGES
    from stages.core.runner import MissingInput, load_inputs
    from stages.core.storage import Storage

    probs, root = [], Storage(str(store)).sub(RUN_ID)
    try:
        m = manifest(store, stage)
    except ValueError as e:
        return [f"{stage}/manifest.json is not valid JSON: {e}"]
    if m is not None:
        for o in m["outputs"]:
            p = store / RUN_ID / stage / o["path"]
            if not p.is_file():
                probs.append(f"manifest lists missing {o['path']}")
            elif root.sub(stage).sha256(o["path"]) != o["sha256"] or p.stat().st_size != o["bytes"]:
                probs.append(f"manifest lists {o['path']} with another sha256")
    else:
        nxt = STAGES[STAGES.index(stage) + 1]
        try:
            load_inputs(root, nxt)
            probs.append(f"{nxt} starts without {stage}'s manifest")
        except MissingInput:
            pass
    idx = store / "dedup.index" / "index.json"
    if idx.exists():
        try:
            for seg in json.loads(idx.read_text())["segments"]:
                for f in ("arrays.npz", "shingles.u64", "docs.parquet"):
                    if not (store / "dedup.index" / seg["path"] / f).is_file():
                        probs.append(f"dedup index lists {seg['path']} without {f}")
        except (ValueError, KeyError) as e:
            probs.append(f"dedup index.json unreadable: {e}")
    return probs


def group_left(pgid: int) -> int:
    """Live (non-zombie) processes still in the process group."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            n += int(fields[2]) == pgid and fields[0] != "Z"
    return n


# -- running ----------------------------------------------------------------------------------------------------
def run_cli(stage: str, store: Path, over: dict, kill_after: float | None = None, log: Path | None = None) -> dict:
    """``kiln stage`` in its own session. kill_after: SIGKILL the group that long after the run lock appears.
    Returns {wall: lock -> exit or kill, killed: the process was still running, rc, orphans}."""
    lock = store / RUN_ID / ".lock.json"
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(kiln_cmd(stage, store, over), cwd=ROOT, env=env(), stdout=out, stderr=out,
                                start_new_session=True)
        while not lock.exists() and proc.poll() is None:
            time.sleep(0.005)
        t0 = time.perf_counter()
        killed, orphans = False, 0
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        rc = proc.wait()
        wall = time.perf_counter() - t0
        if killed:
            for _ in range(100):  # SIGKILL is delivered asynchronously to the group's other members
                if not (orphans := group_left(proc.pid)):
                    break
                time.sleep(0.02)
    return {"wall": wall, "killed": killed, "rc": rc, "orphans": orphans}


def rerun(stage: str, store: Path, over: dict, log: Path | None = None) -> dict:
    """``run_stage`` in this process; ``log``: its stderr (datatrove's task logs, the lock takeover) goes there."""
    from stages.core.config import load_config
    from stages.core.runner import run_stage

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides=over)
    if log is None:
        return run_stage(stage, cfg, str(store), RUN_ID)
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        return run_stage(stage, cfg, str(store), RUN_ID)


def reset(trial: Path, src: Path) -> None:
    shutil.rmtree(trial, ignore_errors=True)
    shutil.copytree(src, trial)


def build(over: dict, say=print) -> dict:
    """Reference runs of every stage (upstream computed once), a snapshot of the storage before each stage, and
    the outputs that differ between two uninterrupted runs."""
    trial, ref = WORK / "trial", {}
    shutil.rmtree(WORK, ignore_errors=True)
    trial.mkdir(parents=True)
    for stage in DATA_STAGES:
        shutil.copytree(trial, WORK / "pre" / stage)
        r = run_cli(stage, trial, over, log=WORK / f"ref-{stage}.log")
        m = manifest(trial, stage)
        if r["rc"] or m is None:
            raise SystemExit(f"bench_chaos: reference run of {stage} failed, see {WORK}/ref-{stage}.log")
        ref[stage] = {"wall": r["wall"], "outputs": outputs(m), "ids": doc_ids(trial, stage, m)}
    shutil.copytree(trial, WORK / "reference")
    for stage in DATA_STAGES:  # a second, uninterrupted run: what differs by design
        reset(trial, WORK / "pre" / stage)
        m = rerun(stage, trial, over, log=WORK / "rerun.log")
        ref[stage]["varies"] = sorted(k for k, v in outputs(m).items() if ref[stage]["outputs"].get(k) != v)
        say(f"  {stage:9s} reference {ref[stage]['wall']:.2f} s (lock to exit), {len(m['outputs'])} outputs, "
            f"{sum((ref[stage]['ids'] or Counter()).values())} documents; differ between identical runs: "
            f"{ref[stage]['varies'] or 'none'}")
    return ref


def compare(stage: str, trial: Path, m: dict, ref: dict) -> dict:
    """Outputs against the reference, strictly: every manifest output's (bytes, sha256), nothing set aside."""
    got, want = outputs(m), ref["outputs"]
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    ids = doc_ids(trial, stage, m)
    lost = sum((ref["ids"] - ids).values()) if ids is not None else 0
    doubled = sum((ids - ref["ids"]).values()) if ids is not None else 0
    return {"byte_identical": not diff, "diff": diff, "lost": lost,
            "doubled": doubled}


def trials(n: int, seed: int = 0, over: dict | None = None, stages: list[str] | None = None, say=print) -> dict:
    """Build the references, then ``n`` kill/re-run trials. Returns the per-trial records and totals."""
    from stages.core.runner import RunLocked

    over, stages = over or overrides(), stages or DATA_STAGES
    t_start = time.perf_counter()
    ref = build(over, say)
    rng, trial, recs = random.Random(seed), WORK / "trial", []
    for i in range(n):
        stage, workers = stages[i % len(stages)], 1 + (i // len(stages)) % 2
        delay = rng.uniform(0, 1) * ref[stage]["wall"] * (1.5 if workers == 2 else 1.0)
        reset(trial, WORK / "pre" / stage)
        k = run_cli(stage, trial, {**over, "run.workers": workers}, kill_after=delay, log=WORK / "killed.log")
        rec = {"trial": i, "stage": stage, "workers": workers, "delay_s": round(delay, 3), "killed": k["killed"],
               "orphans": k["orphans"], "stale_lock": (trial / RUN_ID / ".lock.json").exists(),
               "manifest_after_kill": manifest(trial, stage) is not None,
               "visible": visible_problems(trial, stage)}
        try:
            m = rerun(stage, trial, over, log=WORK / "rerun.log")
            rec.update(compare(stage, trial, m, ref[stage]), refused="")
        except RunLocked as e:
            rec.update(byte_identical=False, diff=[], lost=0, doubled=0, refused=str(e))
        ok = rec["byte_identical"] and not (rec["visible"] or rec["refused"] or rec["orphans"] or rec["lost"]
                                       or rec["doubled"])
        if not ok:
            for name in ("killed", "rerun"):
                shutil.copy(WORK / f"{name}.log", WORK / f"failed-{i}-{name}.log")
        say(f"  trial {i:3d} {stage:9s} w{workers} kill at {delay:6.2f} s{'' if k['killed'] else ' (already done)'}: "
            f"{'ok' if ok else 'FAILED'}{'' if ok else ' ' + json.dumps({x: rec[x] for x in ('visible', 'refused', 'diff', 'lost', 'doubled', 'orphans')})}")
        recs.append(rec)
    tot = {"trials": len(recs), "killed_mid_stage": sum(r["killed"] for r in recs),
           "stale_locks_taken_over": sum(r["stale_lock"] and not r["refused"] for r in recs),
           "manifest_written_before_kill": sum(r["manifest_after_kill"] for r in recs),
           "partial_visible": sum(bool(r["visible"]) for r in recs),
           "refused_by_lock": sum(bool(r["refused"]) for r in recs),
           "orphan_processes": sum(r["orphans"] for r in recs),
           "outputs_byte_identical": sum(r["byte_identical"] for r in recs),
           "documents_lost": sum(r["lost"] for r in recs), "documents_doubled": sum(r["doubled"] for r in recs),
           "per_stage": {s: sum(r["stage"] == s for r in recs) for s in stages},
           "varies_by_design": {s: ref[s]["varies"] for s in stages if ref[s]["varies"]},
           "wall_s": round(time.perf_counter() - t_start, 1)}
    return {"records": recs, "totals": tot}


def run(n: int = 100, seed: int = 0) -> dict:
    res = trials(n, seed)
    t = res["totals"]
    (WORK / "trials.json").write_text(json.dumps(res, indent=1))
    print(f"trials run: {t['trials']} ({t['killed_mid_stage']} killed mid-stage, the rest had finished; "
          f"per stage {t['per_stage']}); stale locks taken over: {t['stale_locks_taken_over']}")
    print(f"outputs byte-identical: {t['outputs_byte_identical']}/{t['trials']}; outputs that differ between two "
          f"uninterrupted runs: {t['varies_by_design'] or 'none'}")
    print(f"documents lost: {t['documents_lost']}; doubled: {t['documents_doubled']}; partial files visible: "
          f"{t['partial_visible']}; re-runs refused by a lock: {t['refused_by_lock']}; orphan processes: "
          f"{t['orphan_processes']}; {t['wall_s']} s")
    what = "over {} seeded SIGKILL trials of the 7 data stages (tiny profile, 2 WARC files + 1 JSONL)".format(t["trials"])
    return {
        "chaos_trials": {"value": t["trials"], "unit": "trials", "what": f"kill -9 + re-run trials {what}"},
        "chaos_outputs_byte_identical": {"value": t["outputs_byte_identical"], "unit": "trials",
                                         "what": f"re-runs whose manifest outputs are byte-identical {what}"},
        "chaos_documents_lost": {"value": t["documents_lost"], "unit": "documents", "what": f"lost {what}"},
        "chaos_documents_doubled": {"value": t["documents_doubled"], "unit": "documents", "what": f"doubled {what}"},
        "chaos_partial_visible": {"value": t["partial_visible"], "unit": "trials",
                                  "what": f"trials where the next stage could see a partial file {what}"},
        "chaos_refused_by_lock": {"value": t["refused_by_lock"], "unit": "trials",
                                  "what": f"re-runs refused by the killed run's lock {what}"},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run(a.trials, a.seed)
