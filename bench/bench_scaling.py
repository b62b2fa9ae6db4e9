"""Data-path scaling: wall time and per-worker peak memory of the data stages (ingest -> normalize -> dedup ->
filter -> reweight -> shard) on 1x, 2x and 4x the sample crawl, tiny profile (2 tasks, 2 workers, local executor).

Inputs. 1x is ../shared/data/crawl as it is (6 WARC files, 2,391 pages). The other real crawls in
../shared/data/warc hold ~1.7 MB together, far too little for 2x, so copy k (k = 1..3) is the sample crawl
rewritten record by record: records shuffled (seed k), a fresh WARC-Record-ID (uuid5 of k and the old id), the
URL moved to ``/k<k>/`` on the same host (the domain mixture of reweight stays the same), and in the HTML's text
nodes every 7th word of 4+ letters (offset k) replaced by a real English word from WikiText-2's vocabulary.
Why perturb: plain repeats would be removed by exact/URL dedup and the stages after dedup would see 1x only; the
replacement leaves ~46% of word 5-grams intact, a Jaccard of ~0.3 to the original, far under the 0.8 threshold,
while pages stay English prose/code with the same tags, sizes and boilerplate (language, Gopher and C4 rules
decide nearly as on the original; the docs column shows each stage's output). 2x = crawl + copy 1, 4x = crawl +
copies 1-3. Copies are built once into bench/_work/scaling/inputs (~40 s) and reused.

Measured per scale, from a fresh storage folder: the sum of the six data stages' wall times (the manifests'
wall_time_s; the tokenizer stage runs between reweight and shard but trains on a capped sample, so it is
reported beside, not in the sum), s per MB of .warc.gz input, the ratio to the linear prediction
(scale x the 1x time), a least-squares fit wall = fixed + per_MB x MB; the same for CPU seconds (utime + stime
of this process and every descendant, sampled from /proc: on a machine shared with other jobs wall time follows
their load, CPU time much less); the peak RSS of any worker process (VmHWM of every descendant process,
sampled every 0.2 s while the stages run: datatrove's forkserver and its pool workers; the kernel keeps the
high-water mark, so short peaks between samples are not lost; forks of the stage-running process itself,
datatrove's Manager, are left out: their RSS is that process's pages, a first run counted them and saw the
"workers" grow with the parent); and the peak RSS of the process running the stages. Each scale runs in a
process of its own (a Python process keeps the memory it took, so one process would carry 1x's peak into 4x).
In-process shortcuts for small inputs are off (dedup / shard ``inprocess_below_mb: 0``) so every scale takes the
same path; the cross-snapshot dedup index is off (each scale is its own corpus). Per stage, the marginal CPU
seconds per MB between 1x and 4x (fixed start-up costs cancel) give the cost model's CPU-hours per TB of .warc.gz.

Goal: wall (and CPU) <= 1.1x the linear prediction at 2x and 4x, and flat peak worker RSS (streaming stages;
only the dedup cluster step holds a per-document table, 152 B/doc).
"""

from __future__ import annotations

import io
import os
import random
import re
import resource
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
CRAWL = sorted((SHARED / "crawl").glob("*.warc.gz"))
WORK = REPO / "bench" / "_work" / "scaling"
SCALES = (1, 2, 4)
DATA = ("ingest", "normalize", "dedup", "filter", "reweight", "shard")
EVERY = 7  # every 7th eligible word of a copy is replaced
COPY_VERSION = "v1"  # bump when the perturbation changes (cached copies are rebuilt)

_TAG = re.compile(rb"(<[^>]*>)")
_WORD = re.compile(rb"(?<![&#\w])[A-Za-z]{4,}(?![\w;])")


def _vocab() -> list[bytes]:
    text = (SHARED / "eval" / "wikitext-2" / "valid.txt").read_bytes()
    return sorted({w.lower() for w in re.findall(rb"\b[A-Za-z]{4,12}\b", text)})


def perturb_html(html: bytes, k: int, vocab: list[bytes]) -> bytes:
    """Every EVERY-th word of 4+ letters in text nodes (offset k) becomes a vocabulary word; tags untouched."""
    n = [0]

    def sub(m):
        n[0] += 1
        if (n[0] + k) % EVERY:
            return m.group(0)
        return vocab[(n[0] * 7919 + k * 104729) % len(vocab)]

    parts = _TAG.split(html)
    for i in range(0, len(parts), 2):  # even parts are text between tags
        if parts[i]:
            parts[i] = _WORD.sub(sub, parts[i])
    return b"".join(parts)


def build_copy(src: Path, k: int, dst: Path, vocab: list[bytes]) -> None:
    from warcio.archiveiterator import ArchiveIterator
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    head, recs = [], []
    with open(src, "rb") as f:
        for r in ArchiveIterator(f):
            if r.rec_type != "response":
                head.append((r.rec_type, r.rec_headers, r.content_stream().read()))
                continue
            uri = r.rec_headers.get_header("WARC-Target-URI")
            scheme, rest = uri.split("://", 1)
            host, _, path = rest.partition("/")
            new_uri = f"{scheme}://{host}/k{k}/{path}"
            old_id = r.rec_headers.get_header("WARC-Record-ID")
            body = perturb_html(r.content_stream().read(), k, vocab)
            http = [(h, v) for h, v in r.http_headers.headers if h.lower() != "content-length"]
            recs.append((new_uri, r.rec_headers.get_header("WARC-Date"),
                         f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{k}:{old_id}')}>",
                         StatusAndHeaders(r.http_headers.statusline, http, protocol=r.http_headers.protocol), body))
    random.Random(k).shuffle(recs)
    tmp = dst.with_suffix(".part")
    with open(tmp, "wb") as out:
        w = WARCWriter(out, gzip=True)
        for typ, hdrs, payload in head:
            w.write_record(w.create_warc_record(hdrs.get_header("WARC-Target-URI") or "", typ,
                                                payload=io.BytesIO(payload), warc_headers=hdrs))
        for uri, date, rid, http, body in recs:
            http.replace_header("Content-Length", str(len(body)))
            rec = w.create_warc_record(uri, "response", payload=io.BytesIO(body), http_headers=http,
                                       warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": rid})
            w.write_record(rec)
    tmp.rename(dst)


def inputs(scale: int) -> list[str]:
    files = [str(p) for p in CRAWL]
    if scale > 1:
        vocab = None
        for k in range(1, scale):
            folder = WORK / "inputs" / f"{COPY_VERSION}-k{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for src in CRAWL:
                dst = folder / src.name
                if not dst.exists():
                    vocab = vocab or _vocab()
                    build_copy(src, k, dst, vocab)
                files.append(str(dst))
    return files


class ProcWatch:
    """Sampled every 0.2 s in a thread over the descendant processes of this one: the max VmHWM (peak RSS, kB)
    and the CPU seconds (utime + stime, last value seen per process; a process's last <= 0.2 s before it exits
    can be missed)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_kb, self._stop = every, 0, threading.Event()
        self._cpu: dict[tuple[int, str], float] = {}
        self._old: set = set()  # processes alive at the last mark(): not counted in the stage's peaks
        self.stage_hwm_kb = self.stage_anon_kb = 0
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._me = open(f"/proc/{os.getpid()}/cmdline", "rb").read()

    def _stats(self) -> dict[int, list[str]]:
        out = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    out[int(p)] = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
        return out

    def _loop(self):
        while not self._stop.is_set():
            stats = self._stats()
            kids: dict[int, list[int]] = {}
            for pid, f in stats.items():
                kids.setdefault(int(f[1]), []).append(pid)
            todo = list(kids.get(os.getpid(), []))
            while todo:
                pid = todo.pop()
                todo += kids.get(pid, [])
                f = stats[pid]
                key = (pid, f[19])  # starttime: a reused pid is another process
                self._cpu[key] = (int(f[11]) + int(f[12])) / self._tick  # utime + stime
                try:
                    if open(f"/proc/{pid}/cmdline", "rb").read() == self._me:
                        continue  # a fork of this process (datatrove's Manager): its RSS is this process's pages
                    st = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if line.startswith("Vm")
                              or line.startswith("Rss"))
                except OSError:
                    continue
                hwm, anon = int(st.get("VmHWM", "0 kB").split()[0]), int(st.get("RssAnon", "0 kB").split()[0])
                self.peak_kb = max(self.peak_kb, hwm)
                if key not in self._old:
                    self.stage_hwm_kb, self.stage_anon_kb = max(self.stage_hwm_kb, hwm), max(self.stage_anon_kb, anon)
            self._stop.wait(self.every)

    def mark(self) -> tuple[float, float]:
        """(peak RSS MB, peak sampled anonymous RSS MB) of the processes started since the last mark; resets."""
        out = (self.stage_hwm_kb / 1024, self.stage_anon_kb / 1024)
        self._old = set(self._cpu)
        self.stage_hwm_kb = self.stage_anon_kb = 0
        return out

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_scale(scale: int) -> dict:
    from stages.core.config import load_config
    from stages.core.runner import run_stage

    files = inputs(scale)
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    store = WORK / f"store-{scale}x"
    shutil.rmtree(store, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "ingest.inputs": files, "dedup.index": None, "dedup.inprocess_below_mb": 0, "shard.inprocess_below_mb": 0})
    ms, cpu, mem = {}, {}, {}
    with ProcWatch() as rss:
        for stage in ("ingest", "normalize", "dedup", "filter", "reweight", "tokenizer", "shard"):
            c0 = rss.cpu_s + time.process_time()
            ms[stage] = run_stage(stage, cfg, str(store), "scale")
            time.sleep(2 * rss.every)  # one more sample of the stage's processes
            cpu[stage] = rss.cpu_s + time.process_time() - c0
            mem[stage] = rss.mark()
    shutil.rmtree(store, ignore_errors=True)
    wall = sum(ms[s]["wall_time_s"] for s in DATA)
    return {"scale": scale, "mb": mb, "files": len(files), "wall": wall, "peak_mb": rss.peak_kb / 1024,
            "driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cpu": sum(cpu[s] for s in DATA), "stage_cpu": {s: cpu[s] for s in DATA}, "stage_mem": mem,
            "tokenizer_s": ms["tokenizer"]["wall_time_s"], "stage_s": {s: ms[s]["wall_time_s"] for s in DATA},
            "docs": {s: ms[s]["counts"].get("documents_out") for s in DATA},
            "tokens": ms["shard"]["counts"].get("tokens_out")}


def run() -> dict:
    import json
    import subprocess
    import tempfile

    rows = []
    for scale in SCALES:
        inputs(scale)  # build missing copies here, outside the measured process
        # one process per scale: the stage-running process's own peak RSS is measured per scale (memory a Python
        # process took is not given back, so a shared process would carry the largest scale's peak forward)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--scale", str(scale), "--out", f.name], check=True)
            rows.append(json.load(open(f.name)))
        r = rows[-1]
        print(f"  {scale}x: {r['mb']:.1f} MB in, {r['docs']['ingest']} docs, {r['wall']:.1f} s, "
              f"{r['cpu']:.1f} CPU-s, peak worker RSS {r['peak_mb']:.0f} MB, stage process {r['driver_mb']:.0f} MB, "
              f"{r['tokens']} tokens", flush=True)
    base = rows[0]
    n = len(rows)

    def fit(key):  # least squares: key = fixed + per_mb x MB
        mx, my = sum(r["mb"] for r in rows) / n, sum(r[key] for r in rows) / n
        slope = sum((r["mb"] - mx) * (r[key] - my) for r in rows) / sum((r["mb"] - mx) ** 2 for r in rows)
        return my - slope * mx, slope

    (fixed, slope), (cfixed, cslope) = fit("wall"), fit("cpu")
    print(f"\n{'scale':>5} {'input MB':>9} {'docs in':>8} {'docs out':>9} {'wall s':>7} {'s/MB':>6} "
          f"{'vs linear':>9} {'CPU s':>7} {'CPU vs lin':>10} {'peak RSS MB':>11} {'driver MB':>9}")
    for r in rows:
        r["ratio"] = r["wall"] / (base["wall"] * r["scale"])
        r["cpu_ratio"] = r["cpu"] / (base["cpu"] * r["scale"])
        print(f"{r['scale']:>4}x {r['mb']:>9.1f} {r['docs']['ingest']:>8} {r['docs']['shard']:>9} {r['wall']:>7.1f} "
              f"{r['wall'] / r['mb']:>6.2f} {r['ratio']:>9.2f} {r['cpu']:>7.1f} {r['cpu_ratio']:>10.2f} "
              f"{r['peak_mb']:>11.0f} {r['driver_mb']:>9.0f}")
    print(f"fit: wall = {fixed:.1f} s + {slope:.2f} s/MB x MB; CPU = {cfixed:.1f} s + {cslope:.2f} s/MB x MB")
    for r in rows:
        print(f"  {r['scale']}x per stage, wall s / CPU s: " + ", ".join(
            f"{s} {r['stage_s'][s]:.1f}/{r['stage_cpu'][s]:.1f}" for s in DATA))
    for r in rows:
        print(f"  {r['scale']}x per stage, peak RSS / peak anonymous RSS of its new processes (MB): " + ", ".join(
            f"{s} {r['stage_mem'][s][0]:.0f}/{r['stage_mem'][s][1]:.0f}" for s in (*DATA[:5], "tokenizer", "shard")))
    print("tokenizer stage (not in the sum, capped sample): " + ", ".join(f"{r['scale']}x {r['tokenizer_s']:.1f} s"
                                                                          for r in rows))
    print("documents out per stage: " + "; ".join(f"{r['scale']}x {r['docs']}" for r in rows))
    peak_growth = max(r["peak_mb"] for r in rows) / base["peak_mb"]
    driver_growth = max(r["driver_mb"] for r in rows) / base["driver_mb"]
    top = rows[-1]
    figs = {
        "scaling.linear_ok": {"value": int(all(r["ratio"] <= 1.1 for r in rows)), "unit": "bool",
                              "what": "data-stage wall time <= 1.1x the linear prediction at every scale"},
        "scaling.cpu_linear_ok": {"value": int(all(r["cpu_ratio"] <= 1.1 for r in rows)), "unit": "bool",
                                  "what": "data-stage CPU seconds <= 1.1x the linear prediction at every scale"},
        "scaling.cpu_s_per_mb": {"value": round(cslope, 3), "unit": "CPU-s/MB",
                                 "what": "data stages: marginal CPU seconds per MB of .warc.gz (fit)"},
        "scaling.fixed_s": {"value": round(fixed, 1), "unit": "s",
                            "what": "data stages: fixed cost of the fit wall = fixed + per_MB x MB (pool starts)"},
        "scaling.s_per_mb": {"value": round(slope, 3), "unit": "s/MB",
                             "what": "data stages: marginal seconds per MB of .warc.gz (fit over 1x/2x/4x), 2 workers"},
        "scaling.peak_rss_growth": {"value": round(peak_growth, 2), "unit": "x",
                                    "what": "peak worker RSS, largest scale / 1x (flat = 1)"},
        "scaling.stage_process_rss_growth": {"value": round(driver_growth, 2), "unit": "x",
                                             "what": "peak RSS of the stage-running process, largest scale / 1x"},
    }
    for r in rows:
        s = r["scale"]
        figs[f"scaling.{s}x.wall_s"] = {
            "value": round(r["wall"], 1), "unit": "s",
            "what": f"data stages ingest..shard, {s}x sample crawl ({r['mb']:.0f} MB .warc.gz)"}
        figs[f"scaling.{s}x.vs_linear"] = {"value": round(r["ratio"], 3), "unit": "x",
                                           "what": f"{s}x wall / ({s} x the 1x wall)"}
        figs[f"scaling.{s}x.cpu_s"] = {"value": round(r["cpu"], 1), "unit": "CPU-s",
                                       "what": f"data stages' CPU seconds (all processes), {s}x"}
        figs[f"scaling.{s}x.cpu_vs_linear"] = {"value": round(r["cpu_ratio"], 3), "unit": "x",
                                               "what": f"{s}x CPU seconds / ({s} x the 1x CPU seconds)"}
        figs[f"scaling.{s}x.peak_worker_rss_mb"] = {"value": round(r["peak_mb"]), "unit": "MB",
                                                    "what": f"peak RSS of any worker process, {s}x"}
        figs[f"scaling.{s}x.stage_process_rss_mb"] = {"value": round(r["driver_mb"]), "unit": "MB",
                                                      "what": f"peak RSS of the process running the stages, {s}x"}
        figs[f"scaling.{s}x.docs_in"] = {"value": r["docs"]["ingest"], "unit": "docs",
                                         "what": f"documents out of ingest, {s}x"}
    figs["scaling.top.mb_per_cpu_hour"] = {
        "value": round(top["mb"] / (top["cpu"] / 3600)), "unit": "MB/CPU-h",
        "what": f"{top['scale']}x: .warc.gz MB per CPU-hour through the data stages (measured CPU seconds)"}
    # per stage: marginal seconds per MB between 1x and the largest scale (pool start-ups cancel out), and the
    # CPU-hours per TB of .warc.gz they imply with both cores busy (the cost model's numbers)
    dmb = top["mb"] - base["mb"]
    print("marginal per stage, 1x -> largest (measured CPU s/MB; wall s/MB x 2 cores): " + ", ".join(
        f"{s} {(top['stage_cpu'][s] - base['stage_cpu'][s]) / dmb:.3f} "
        f"({(top['stage_s'][s] - base['stage_s'][s]) / dmb * 2:.3f})" for s in DATA))
    for s in DATA:
        marg = (top["stage_cpu"][s] - base["stage_cpu"][s]) / dmb
        figs[f"scaling.{s}.cpu_h_per_tb"] = {"value": round(marg * 1e6 / 3600), "unit": "CPU-h/TB",
                                             "what": f"{s}: marginal CPU s per MB of .warc.gz (1x -> {top['scale']}x),"
                                                     " per TB"}
        figs[f"scaling.{top['scale']}x.{s}_s"] = {"value": top["stage_s"][s], "unit": "s",
                                                  "what": f"{s} stage, {top['scale']}x sample crawl"}
    return figs


if __name__ == "__main__":
    if "--scale" in sys.argv:
        import json

        row = run_scale(int(sys.argv[sys.argv.index("--scale") + 1]))
        with open(sys.argv[sys.argv.index("--out") + 1], "w") as f:
            json.dump(row, f)
        sys.exit(0)
    t0 = time.time()
    for k, v in run().items():
        print(f"{k}: {v['value']} {v['unit']}  ({v['what']})")
    print(f"bench_scaling: {time.time() - t0:.0f} s")
