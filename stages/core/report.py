"""One run report: ``<run_id>/report/{report.json, report.md, plots/*.png}``, read from the manifests and the
artifacts they list, and the comparison of two runs.

Every number is copied from a stage's manifest or from a file that manifest lists (reweight/shard
``mixture.json``, tokenizer metrics, train ``metrics.jsonl``, evaluate ``report.json``, dedup
``duplicates.jsonl.gz``, filter ``removed_samples.jsonl.gz``): nothing is recounted, so the report cannot
disagree with the manifests. The one derived figure is the token estimate before sharding (bytes / the
trained tokenizer's bytes per token), marked ``tokens_estimated`` and ``~`` as in the run summary.

Lineage: per stage its fingerprint, ``manifest_sha256`` (``runner.manifest_hash``: sha256 of the canonical JSON,
the value every downstream manifest records under ``inputs``) and ``file_sha256`` (sha256 of the manifest.json
bytes in storage), and per recorded input whether it still equals the upstream manifest (``consistent``).
``behind_checkpoint`` marks train and every stage train depends on (transitively).

Language mix: normalize's per-language counts beside reweight's ``mixture.json`` ``languages`` (before / after
reweighting), a table only: on the sample crawl every document that reaches reweight is English, so a plot would
be one bar.

Plots are matplotlib on the Agg backend (no display), PNG at 110 dpi, written through ``Storage`` (local or S3).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from datetime import datetime, timezone

from stages import NEEDS, STAGES
from stages.core.runner import MANIFEST, manifest_hash, read_manifest
from stages.core.storage import Storage

REPORT_DIR = "report"
EVAL_KEYS = ("loss", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "accuracy")
TRAIN_KEYS = ("steps", "tokens_trained", "params", "first_loss", "final_loss", "final_loss_avg5", "tokens_per_s",
              "tokens_per_s_overall", "mfu", "train_wall_s", "world_size", "dtype")
TOKENIZER_KEYS = ("vocab_size", "bytes_per_token", "heldout_docs", "heldout_bytes", "heldout_tokens",
                  "byte_fallback_share", "vocab_byte_coverage", "roundtrip_ok", "hf_agreement", "sample_docs",
                  "sample_bytes", "train_seconds")
SAMPLE_FILES = ("removed_samples.jsonl.gz", "duplicates.jsonl.gz")  # removed-document artifacts stages write


def _root(storage, run_id: str) -> Storage:
    return (storage if isinstance(storage, Storage) else Storage(storage)).sub(run_id)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(st: Storage, rel: str):
    try:
        return st.read_json(rel) if st.exists(rel) else None
    except (ValueError, OSError):
        return None


def _read_jsonl(st: Storage, rel: str) -> list[dict]:
    if not st.exists(rel):
        return []
    data = st.read_bytes(rel)
    if rel.endswith(".gz"):
        data = gzip.decompress(data)
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _ancestors(stage: str) -> set[str]:
    out, todo = set(), list(NEEDS.get(stage, []))
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(NEEDS.get(s, []))
    return out


def _outputs(m: dict) -> list[str]:
    return [o.get("path") for o in m.get("outputs", []) if isinstance(o, dict)]


# -- sections ------------------------------------------------------------------------------------------------
def funnel(ms: dict, root: Storage) -> list[dict]:
    """The data funnel from the manifests (stage -> manifest): one row per stage; the run summary prints these."""
    bpt = (ms.get("tokenizer") or {}).get("metrics", {}).get("bytes_per_token")
    rows = []
    for stage, m in ms.items():
        c = m.get("counts", {}) or {}
        tokens, est = c.get("tokens_out"), False
        if tokens is None and _num(c.get("bytes_out")) and _num(bpt) and bpt > 0:
            tokens, est = round(c["bytes_out"] / bpt), True
        samples = [root.sub(stage).url(p) for p in _outputs(m) if p.rsplit("/", 1)[-1] in SAMPLE_FILES]
        rows.append({"stage": stage, "records_in": c.get("documents_in") if stage == "ingest" else None,
                     "documents_in": c.get("documents_in"), "documents_out": c.get("documents_out"),
                     "bytes_out": c.get("bytes_out"), "words_out": c.get("words_out"), "tokens": tokens,
                     "tokens_estimated": est, "removed": dict(c.get("removed") or {}),
                     "added": dict(c.get("added") or {}), "removed_samples": samples,
                     "wall_time_s": m.get("wall_time_s")})
    return rows


def _removed(ms: dict, root: Storage) -> dict:
    """Per stage: removed by reason, the filters' finer reasons / bytes / words, and the sample files with how
    many samples each reason has in them."""
    out = {}
    for stage, m in ms.items():
        c = m.get("counts", {}) or {}
        removed = {k: v for k, v in (c.get("removed") or {}).items()}
        if not removed and not c.get("files_skipped"):
            continue
        entry = {"by_reason": removed}
        for k in ("removed_reasons", "removed_bytes", "removed_words", "removed_tokens_est", "files_skipped"):
            if c.get(k):
                entry[k] = c[k]
        st = root.sub(stage)
        for p in _outputs(m):
            if p.rsplit("/", 1)[-1] in SAMPLE_FILES:
                rows = _read_jsonl(st, p)
                per = {}
                for r in rows:
                    key = r.get("filter") or r.get("reason") or "?"
                    per[key] = per.get(key, 0) + 1
                entry.setdefault("samples", []).append({"url": st.url(p), "rows": len(rows), "by_reason": per})
        out[stage] = entry
    return out


def _dedup(m: dict | None, root: Storage, top: int = 10) -> dict | None:
    if not m:
        return None
    c = m.get("counts", {}) or {}
    out = {"removed": c.get("removed"), "near": c.get("near"), "index": c.get("index"),
           "documents_in": c.get("documents_in"), "documents_out": c.get("documents_out")}
    if "duplicates.jsonl.gz" in _outputs(m):
        rows = _read_jsonl(root.sub("dedup"), "duplicates.jsonl.gz")
        clusters: dict = {}
        for r in rows:
            if r.get("reason") == "near" and r.get("cluster") is not None:
                cl = clusters.setdefault(r["cluster"], {"cluster": r["cluster"], "kept_id": r.get("kept_id"),
                                                        "removed": 0, "min_jaccard": None, "urls": []})
                cl["removed"] += 1
                if _num(r.get("jaccard")):
                    j = cl["min_jaccard"]
                    cl["min_jaccard"] = r["jaccard"] if j is None else min(j, r["jaccard"])
                cl["urls"].append(r.get("url"))
        out["largest_clusters"] = sorted(clusters.values(), key=lambda x: (-x["removed"], str(x["cluster"])))[:top]
        out["duplicates_url"] = root.sub("dedup").url("duplicates.jsonl.gz")
        out["duplicates_by_reason"] = {}
        for r in rows:
            out["duplicates_by_reason"][r.get("reason")] = out["duplicates_by_reason"].get(r.get("reason"), 0) + 1
    return out


def _mixture(ms: dict, root: Storage) -> dict | None:
    rw, sh = ms.get("reweight"), ms.get("shard")
    if not rw and not sh:
        return None
    out = {}
    if rw:
        mix = _read_json(root.sub("reweight"), "mixture.json") if "mixture.json" in _outputs(rw) else None
        if isinstance(mix, dict) and isinstance(mix.get("domains"), dict):
            out["key"] = mix.get("key")
            out["domains"] = mix["domains"]
            out["max_share_error"] = mix.get("max_share_error")
            out["note"] = mix.get("note")
            out["mixture_url"] = root.sub("reweight").url("mixture.json")
            if isinstance(mix.get("languages"), dict):  # runs before the language mix have none
                out["languages"] = mix["languages"]
        else:  # an older reweight: the manifest's mixture only
            out["key"] = (rw.get("config") or {}).get("key")
            out["domains"] = rw.get("metrics", {}).get("mixture") or {}
            if isinstance(rw.get("metrics", {}).get("languages"), dict):
                out["languages"] = rw["metrics"]["languages"]
    if sh:
        mix = _read_json(root.sub("shard"), "mixture.json") if "mixture.json" in _outputs(sh) else None
        if isinstance(mix, dict) and isinstance(mix.get("domains"), dict):
            out["tokens"] = {d: {k: v.get(k) for k in ("tokens", "share", "share_target", "epochs")}
                             for d, v in mix["domains"].items()}
            out["max_share_error_tokens"] = mix.get("max_share_error_tokens")
        elif isinstance(sh.get("metrics", {}).get("mixture"), dict):
            out["tokens"] = {d: {"share": v} for d, v in sh["metrics"]["mixture"].items()}
    return out


def language_mix(normalize: dict | None, mixture: dict | None) -> list[dict]:
    """Rows per language: documents normalize labelled (lid.176), and reweight's documents and shares of
    estimated tokens before (its input: after dedup and filter) and after reweighting, 0 for a language gone
    by then; ``None`` where a stage did not count (a run before reweight recorded languages shows normalize's
    counts only). Most documents first."""
    norm, rw = normalize or {}, (mixture or {}).get("languages") or {}
    none = {"docs_before": 0, "docs_after": 0, "share_before": 0.0, "share_after": 0.0} if rw else {}
    key = lambda x: (-(norm.get(x) or 0), -((rw.get(x) or {}).get("docs_before") or 0), x)  # noqa: E731
    return [{"language": x, "normalize_docs": norm.get(x),
             **{k: (rw.get(x) or none).get(k) for k in ("docs_before", "docs_after", "share_before", "share_after")}}
            for x in sorted(set(norm) | set(rw), key=key)]


def _tokenizer(ms: dict) -> dict | None:
    m = ms.get("tokenizer")
    if not m:
        return None
    met = m.get("metrics", {}) or {}
    out = {k: met[k] for k in TOKENIZER_KEYS if k in met}
    out["model_type"] = (m.get("config") or {}).get("model_type")
    if isinstance(met.get("bytes_per_token_by_domain"), dict):
        out["bytes_per_token_by_domain"] = met["bytes_per_token_by_domain"]
    sh = (ms.get("shard") or {}).get("metrics", {})
    if "bytes_per_token" in sh:
        out["corpus_bytes_per_token"] = sh["bytes_per_token"]  # realized by the shard stage over every document
    return out


def _training(ms: dict, root: Storage) -> dict | None:
    m = ms.get("train")
    if not m:
        return None
    met = {**(m.get("counts") or {}), **(m.get("metrics") or {})}
    out = {"summary": {k: met[k] for k in TRAIN_KEYS if k in met}, "checkpoint": root.sub("train").url("final")}
    weights = [o for o in m.get("outputs", []) if o.get("path") in ("final/model.safetensors", "final/model.pt")]
    if weights:
        out["checkpoint_files"] = [{"path": o["path"], "sha256": o.get("sha256"), "bytes": o.get("bytes")}
                                   for o in weights]
    rows = _read_jsonl(root.sub("train"), "metrics.jsonl") if "metrics.jsonl" in _outputs(m) else []
    keys = ("step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens", "mfu")
    out["curve"] = [{k: r[k] for k in keys if _num(r.get(k))} for r in rows if _num(r.get("step"))]
    out["metrics_url"] = root.sub("train").url("metrics.jsonl") if rows else None
    return out


def _evaluation(ms: dict, root: Storage) -> dict | None:
    m = ms.get("evaluate")
    if not m:
        return None
    rep = _read_json(root.sub("evaluate"), "report.json") if "report.json" in _outputs(m) else None
    if not isinstance(rep, dict):
        return {"sets": {}, "metrics": m.get("metrics", {}), "report_url": None}
    sets, raw = {}, rep.get("sets") or {}
    for name in sorted(raw, key=lambda n: (n not in ("validation", "validation_docs"), n)):  # held-out first
        s = raw[name]
        if isinstance(s, dict):
            sets[name] = {k: s.get(k) for k in ("documents", "tokens", "words", "bytes", *EVAL_KEYS) if k in s}
    tasks = {n: {k: t.get(k) for k in ("examples", "accuracy", "perplexity") if k in t}
             for n, t in (rep.get("last_word") or {}).items() if isinstance(t, dict)}
    curve = []
    for c in rep.get("curve") or []:
        if isinstance(c, dict):
            cs, lw = c.get("sets") or {}, c.get("last_word") or {}
            curve.append({"step": c.get("step"), "checkpoint": c.get("checkpoint"),
                          **{f"{n}.{k}": v.get(k) for n, v in cs.items() if isinstance(v, dict)
                             for k in ("loss", "bits_per_byte") if v.get(k) is not None},
                          **{f"{n}.{k}": v.get(k) for n, v in lw.items() if isinstance(v, dict)
                             for k in ("accuracy", "perplexity") if v.get(k) is not None}})
    gens = [{k: g.get(k) for k in ("prompt", "mode", "top_k", "seed", "text")} for g in rep.get("generations") or []
            if isinstance(g, dict)]
    return {"checkpoint": rep.get("checkpoint"), "step": rep.get("step"), "params": rep.get("params"), "sets": sets,
            "last_word": tasks, "curve": curve, "generations": gens,
            "report_url": root.sub("evaluate").url("report.json"),
            "generations_url": root.sub("evaluate").url("generations.md") if "generations.md" in _outputs(m) else None}


def _lineage(ms: dict, root: Storage) -> list[dict]:
    hashes = {s: manifest_hash(m) for s, m in ms.items()}
    behind = _ancestors("train") | {"train"}
    rows = []
    for stage, m in ms.items():
        inputs = {}
        for dep, rec in (m.get("inputs") or {}).items():
            rec = rec if isinstance(rec, dict) else {}
            inputs[dep] = {"manifest_sha256": rec.get("manifest_sha256"), "fingerprint": rec.get("fingerprint"),
                           "consistent": rec.get("manifest_sha256") == hashes.get(dep)}
        rows.append({"stage": stage, "fingerprint": m.get("fingerprint"), "manifest_sha256": hashes[stage],
                     "file_sha256": hashlib.sha256(root.read_bytes(f"{stage}/{MANIFEST}")).hexdigest(),
                     "manifest_url": root.sub(stage).url(MANIFEST), "code_version": m.get("code_version"),
                     "finished_at": m.get("finished_at"), "behind_checkpoint": stage in behind, "inputs": inputs})
    return rows


def build(storage: str | Storage, run_id: str) -> dict:
    """The report of one run as a dict (nothing written). Stages without a manifest are left out."""
    root = _root(storage, run_id)
    ms = {s: m for s in STAGES if (m := read_manifest(root, s)) is not None}
    norm = (ms.get("normalize") or {}).get("counts", {})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    mixture = _mixture(ms, root)
    return {"run_id": run_id, "location": root.url(), "generated_at": now,
            "stages": list(ms), "complete": len(ms) == len(STAGES),
            "funnel": funnel(ms, root), "removed": _removed(ms, root), "dedup": _dedup(ms.get("dedup"), root),
            "languages": norm.get("languages"), "language_mix": language_mix(norm.get("languages"), mixture),
            "mixture": mixture, "tokenizer": _tokenizer(ms),
            "training": _training(ms, root), "evaluation": _evaluation(ms, root), "lineage": _lineage(ms, root),
            "crawl_inputs": list((ms.get("ingest") or {}).get("metrics", {}).get("inputs") or []),
            "crawl_files": list((ms.get("ingest") or {}).get("metrics", {}).get("input_files") or []),
            "config": {s: m.get("config") for s, m in ms.items()}}


# -- plots ---------------------------------------------------------------------------------------------------
def _fig(*a, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*a, **kw)


def _png(plt, fig, texts: dict | None = None, name: str = "") -> bytes:
    """The figure as PNG bytes; ``texts[name]``: what is written on it, per axes (title, x/y labels, legend
    entries, tick labels) plus the figure's title, so a test can check every plot is labelled."""
    buf = io.BytesIO()
    fig.tight_layout()
    if texts is not None:
        axes = []
        for a in fig.get_axes():
            leg = a.get_legend()
            axes.append({"title": a.get_title(), "xlabel": a.get_xlabel(), "ylabel": a.get_ylabel(),
                         "legend": [t.get_text() for t in leg.get_texts()] if leg else [],
                         "xticks": [t.get_text() for t in a.get_xticklabels()]})
        texts[name] = {"suptitle": fig.get_suptitle(), "axes": axes}
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plots(rep: dict, texts: dict | None = None) -> dict[str, bytes]:
    """PNG bytes by file name: training (loss + lr), throughput (tokens/s), funnel (documents, MB and tokens per
    stage), domain_mix (shares before/after reweighting, realized token shares), evaluation (bits per byte per
    set and validation loss per checkpoint). A plot without data is left out."""
    from matplotlib.ticker import MaxNLocator

    out, run = {}, rep["run_id"]
    curve = (rep.get("training") or {}).get("curve") or []
    pts = [r for r in curve if "loss" in r]
    if pts:
        plt, (fig, ax) = _fig(figsize=(7, 4))
        ax.plot([r["step"] for r in pts], [r["loss"] for r in pts], color="tab:blue", label="train loss")
        ev = [c for c in ((rep.get("evaluation") or {}).get("curve") or []) if c.get("validation.loss") is not None
              and c.get("step") is not None]
        if ev:
            ax.plot([c["step"] for c in ev], [c["validation.loss"] for c in ev], "o--", color="tab:green",
                    label="validation loss (evaluate)")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (nats / token)")
        lr = [r for r in curve if "lr" in r]
        h, lab = ax.get_legend_handles_labels()
        if lr:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in lr], [r["lr"] for r in lr], color="tab:orange", alpha=0.8,
                     label="learning rate")
            ax2.set_ylabel("learning rate")
            h2, l2 = ax2.get_legend_handles_labels()
            h, lab = h + h2, lab + l2
        ax.legend(h, lab, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(h), frameon=False)
        ax.set_title(f"Training loss and learning rate — run {run}")
        ax.grid(alpha=0.3)
        out["training.png"] = _png(plt, fig, texts, "training.png")
    tps = [r for r in curve if "tokens_per_s" in r]
    if tps:
        plt, (fig, ax) = _fig(figsize=(7, 3.5))
        ax.plot([r["step"] for r in tps], [r["tokens_per_s"] for r in tps], color="tab:purple", marker=".")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("tokens / s (all ranks)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Training throughput — run {run}")
        ax.grid(alpha=0.3)
        out["throughput.png"] = _png(plt, fig, texts, "throughput.png")
    fun = [r for r in rep.get("funnel") or [] if r.get("documents_out") is not None]
    if fun:
        plt, (fig, (ax, bx)) = _fig(1, 2, figsize=(11, 4.6))
        names = [r["stage"] for r in fun]
        docs = [r["documents_out"] for r in fun]
        if fun[0].get("records_in") is not None:
            names, docs = ["records"] + names, [fun[0]["records_in"]] + docs
        bars = ax.bar(names, docs, color=["tab:gray"] * (len(names) - len(fun)) + ["tab:blue"] * len(fun))
        ax.bar_label(bars, labels=[f"{d:,}" for d in docs], fontsize=7)
        ax.set_xlabel("stage (documents after it; records: WARC records read)")
        ax.set_ylabel("documents")
        ax.set_ylim(top=max(docs) * 1.1)
        ax.set_title("Documents after every stage")
        ax.tick_params(axis="x", rotation=30)
        x = range(len(fun))
        mb = [(r["bytes_out"] or 0) / 1e6 for r in fun]
        bx.bar(list(x), mb, color="tab:blue", alpha=0.45, label="MB of text out")
        bx.set_ylabel("MB of text (UTF-8)")
        bx.set_ylim(bottom=0, top=max(mb + [1e-9]) * 1.15)
        bx.set_xticks(list(x), [r["stage"] for r in fun], rotation=30)
        bx.set_xlabel("stage")
        tk = [(i, r["tokens"] / 1e6, r["tokens_estimated"]) for i, r in enumerate(fun) if _num(r.get("tokens"))]
        handles = bx.get_legend_handles_labels()
        if tk:
            tx = bx.twinx()
            tx.plot([i for i, _, _ in tk], [t for _, t, _ in tk], "s--", color="tab:red",
                    label="M tokens (~ estimated before shard)")
            real = [(i, t) for i, t, est in tk if not est]
            if real:
                tx.plot(*zip(*real), "s", color="tab:red", markersize=9, label="M tokens (shard, counted)")
            tx.set_ylabel("million tokens")
            tx.set_ylim(bottom=0, top=max(t for _, t, _ in tk) * 1.15)
            h2 = tx.get_legend_handles_labels()
            handles = (handles[0] + h2[0], handles[1] + h2[1])
        bx.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8, frameon=False)
        bx.set_title("Bytes and tokens after every stage")
        bx.grid(alpha=0.3)
        fig.suptitle(f"Data funnel — run {run}")
        out["funnel.png"] = _png(plt, fig, texts, "funnel.png")
    ev = rep.get("evaluation") or {}
    pts = ev.get("curve") or ([{"step": ev.get("step"), **{f"{n}.bits_per_byte": s.get("bits_per_byte")
                                                           for n, s in (ev.get("sets") or {}).items()},
                                "validation.loss": (ev.get("sets") or {}).get("validation", {}).get("loss")}]
                              if ev.get("sets") else [])
    pts = [c for c in pts if _num(c.get("step"))]
    sets = sorted({k.rsplit(".", 1)[0] for c in pts for k, v in c.items()
                   if k.endswith(".bits_per_byte") and _num(v)})
    if pts and sets:
        plt, (fig, (ax, bx)) = _fig(1, 2, figsize=(11, 4.6))
        for n in sets:
            xy = [(c["step"], c[f"{n}.bits_per_byte"]) for c in pts if _num(c.get(f"{n}.bits_per_byte"))]
            ax.plot(*zip(*xy), "o-", label=n)
        ax.set_xlabel("checkpoint (optimizer step)")
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title("bits per byte per eval set (tokenizer-independent)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, len(sets)), frameon=False)
        ax.grid(alpha=0.3)
        xy = [(c["step"], c["validation.loss"]) for c in pts if _num(c.get("validation.loss"))]
        if xy:
            bx.plot(*zip(*xy), "o-", color="black", label="validation loss (held-out shards)")
        lw = ev.get("last_word") or {}
        for n, t in lw.items():
            if _num(t.get("accuracy")) and _num(ev.get("step")):
                bx.plot([], [], " ", label=f"last word, {n} (step {ev['step']}): accuracy {t['accuracy']:.3f}, "
                                          f"perplexity {_n(t.get('perplexity'))}")
        bx.set_xlabel("checkpoint (optimizer step)")
        bx.set_ylabel("loss (nats / token)")
        bx.set_title("validation loss")
        bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        bx.grid(alpha=0.3)
        for a in (ax, bx):
            a.set_xticks(sorted({c["step"] for c in pts}))
        fig.suptitle(f"Evaluation per checkpoint — run {run}")
        out["evaluation.png"] = _png(plt, fig, texts, "evaluation.png")
    mix = rep.get("mixture") or {}
    doms = mix.get("domains") or {}
    if doms and all(isinstance(v, dict) and "share_before" in v for v in doms.values()):
        import numpy as np

        names = sorted(doms)
        series = [("before reweighting", [doms[d].get("share_before") or 0 for d in names]),
                  ("after reweighting", [doms[d].get("share_after") or 0 for d in names])]
        tok = mix.get("tokens") or {}
        if tok:
            series.append(("realized (shard tokens)", [(tok.get(d) or {}).get("share") or 0 for d in names]))
        plt, (fig, ax) = _fig(figsize=(7, 4))
        x, w = np.arange(len(names)), 0.8 / len(series)
        for i, (lab, vals) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=lab)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_xlabel(f"{mix.get('key') or 'domain'}")
        ax.set_ylabel("share of tokens (~ estimated before shard)")
        ax.set_title(f"Domain mix before / after reweighting — run {run}")
        ax.set_ylim(0, max(max(v) for _, v in series) * 1.3)  # headroom: the legend sits above the bars
        ax.legend(loc="upper center", ncol=len(series), fontsize=8)
        out["domain_mix.png"] = _png(plt, fig, texts, "domain_mix.png")
    return out


# -- markdown ------------------------------------------------------------------------------------------------
def _n(v, approx: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    s = f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else str(v))
    return ("~" + s) if approx else s


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def funnel_table(rep: dict) -> list[dict]:
    """The funnel as flat rows (the Prefect table artifact and the CLI)."""
    return [{"stage": r["stage"], "records_in": r["records_in"], "documents_in": r["documents_in"],
             "documents_out": r["documents_out"], "bytes_out": r["bytes_out"], "words_out": r["words_out"],
             "tokens": r["tokens"], "tokens_estimated": r["tokens_estimated"],
             "removed": ", ".join(f"{k}={v}" for k, v in r["removed"].items() if v),
             "added": ", ".join(f"{k}={v}" for k, v in r["added"].items() if v)} for r in rep["funnel"]]


def eval_table(rep: dict) -> list[dict]:
    ev = rep.get("evaluation") or {}
    rows = [{"set": n, **{k: s.get(k) for k in ("tokens", *EVAL_KEYS[:5])}} for n, s in ev.get("sets", {}).items()]
    rows += [{"set": n, "accuracy": t.get("accuracy"), "perplexity": t.get("perplexity")}
             for n, t in ev.get("last_word", {}).items()]
    return rows


def render_funnel(rep: dict, wall_time: bool = False) -> str:
    """The funnel as a fixed-width text table (``kiln report``; ``kiln run`` / ``make demo`` print it through
    ``summary.render`` with ``wall_time``: seconds per stage, ``skip`` for a stage skipped by its manifest).
    ``rep``: a report, or a run summary (its ``stages`` rows are the same ``funnel`` rows)."""
    rows = rep["funnel"] if "funnel" in rep else rep["stages"]
    head = f"{'stage':<10} {'records/docs in':>15} {'docs out':>9} {'MB out':>8} {'tokens':>12}"
    head += f" {'time s':>7}  removed (+added)" if wall_time else "  removed (+added)"
    lines = [head, "-" * len(head)]
    for r in rows:
        mb = f"{r['bytes_out'] / 1e6:.2f}" if _num(r["bytes_out"]) else "-"
        removed = ", ".join([f"{k}={v}" for k, v in r["removed"].items() if v]
                            + [f"+{k}={v}" for k, v in (r.get("added") or {}).items() if v])
        docs_in = r.get("records_in") if r.get("records_in") is not None else r["documents_in"]
        line = (f"{r['stage']:<10} {_n(docs_in):>15} {_n(r['documents_out']):>9} {mb:>8} "
                f"{_n(r['tokens'], r['tokens_estimated']):>12}")
        if wall_time:
            w = r.get("wall_time_s")
            line += f" {'skip' if r.get('skipped') else f'{w:.1f}' if _num(w) else '-':>7}"
        lines.append(f"{line}  {removed}")
    if any(r["tokens_estimated"] for r in rows):
        lines.append("(~ tokens before sharding: bytes / the trained tokenizer's bytes per token)")
    return "\n".join(lines)


SAMPLE_ROWS = 200  # rows per removed-samples table artifact: dedup's file has a row per removed document


def sample_rows(url: str, text_chars: int = 300, limit: int = SAMPLE_ROWS) -> list[dict]:
    """The first ``limit`` rows of a removed-samples file (filter ``removed_samples.jsonl.gz``, dedup
    ``duplicates.jsonl.gz``) as flat table rows (the Prefect table artifact of the removed samples): scalar fields
    as written, strings cut to ``text_chars``."""
    parent, name = url.rsplit("/", 1)
    return [{k: (v[:text_chars] if isinstance(v, str) else v) for k, v in r.items()
             if v is None or isinstance(v, (str, int, float, bool))}
            for r in _read_jsonl(Storage(parent), name)[:limit]]


def render_markdown(rep: dict, plot_links: dict[str, str] | None = None,
                    sample_links: dict[str, tuple[str, str]] | None = None) -> str:
    """report.md. ``plot_links``: file name -> link target (relative in storage, URLs for Prefect).
    ``sample_links``: removed-samples file URL -> (artifact key, link) of its Prefect table artifact."""
    L = [f"# Kiln run report: `{rep['run_id']}`", "",
         f"Location: `{rep['location']}` · generated {rep['generated_at']}"
         + ("" if rep["complete"] else " · **incomplete run** (stages present: " + ", ".join(rep["stages"]) + ")"), ""]
    links = plot_links or {}
    L += ["## Data funnel", ""]
    L += _table(["stage", "records / docs in", "docs out", "bytes out", "words out", "tokens", "removed", "added"],
                [[r["stage"], _n(r["records_in"] if r["records_in"] is not None else r["documents_in"]),
                  _n(r["documents_out"]), _n(r["bytes_out"]), _n(r["words_out"]),
                  _n(r["tokens"], r["tokens_estimated"]),
                  ", ".join(f"{k}={v}" for k, v in r["removed"].items() if v) or "",
                  ", ".join(f"{k}={v}" for k, v in r["added"].items() if v) or ""] for r in rep["funnel"]])
    if any(r["tokens_estimated"] for r in rep["funnel"]):
        L += ["~ tokens before sharding: bytes / the trained tokenizer's bytes per token.", ""]
    if "funnel.png" in links:
        L += [f"![documents per stage]({links['funnel.png']})", ""]
    L += ["## Removed, by reason", ""]
    for stage, e in rep["removed"].items():
        reasons = {k: v for k, v in e["by_reason"].items() if v}
        L.append(f"**{stage}**: " + (", ".join(f"{k} {v:,}" for k, v in reasons.items()) or "nothing removed"))
        if e.get("files_skipped") and any(e["files_skipped"].values()):
            L.append(f"files skipped: {e['files_skipped']}")
        if e.get("removed_reasons"):
            rows = [[f, _n(e["by_reason"].get(f)), _n((e.get("removed_bytes") or {}).get(f)),
                     ", ".join(f"{k} {v}" for k, v in sub.items())] for f, sub in e["removed_reasons"].items()]
            L += [""] + _table(["filter", "documents", "bytes", "reasons"], rows)
        for s in e.get("samples", []):
            art = (sample_links or {}).get(s["url"])
            L.append(f"samples: [{s['url']}]({s['url']}) ({s['rows']} documents: "
                     + ", ".join(f"{k} {v}" for k, v in s["by_reason"].items()) + ")"
                     + (f"; Prefect artifact [{art[0]}]({art[1]})" if art else ""))
        L.append("")
    d = rep.get("dedup")
    if d:
        near = d.get("near") or {}
        L += ["## Dedup clusters", "", f"removed {d.get('removed')}; near: {near.get('clusters', '-')} clusters, "
              f"{near.get('candidate_pairs', '-')} LSH candidate pairs, {near.get('verified_pairs', '-')} verified "
              f"(Jaccard ≥ threshold), {near.get('rejected_candidates', '-')} rejected", ""]
        if d.get("largest_clusters"):
            L += _table(["cluster", "removed", "min Jaccard", "kept id", "removed urls"],
                        [[c["cluster"], c["removed"], _n(c["min_jaccard"]), c["kept_id"],
                          "<br>".join(str(u) for u in c["urls"][:3]) + (" …" if len(c["urls"]) > 3 else "")]
                         for c in d["largest_clusters"]])
    lm = rep.get("language_mix") or []
    if any(r["docs_before"] is not None for r in lm):
        L += ["## Language mix before / after reweighting", "",
              "Documents per lid.176 label at normalize and at reweight's input (after dedup and filter) and "
              "output (copies included); shares of estimated tokens.", ""]
        L += _table(["language", "docs (normalize)", "docs before", "docs after", "share before", "share after"],
                    [[r["language"], *(_n(r[k]) for k in ("normalize_docs", "docs_before", "docs_after",
                                                          "share_before", "share_after"))] for r in lm])
    elif lm:  # a run whose reweight did not count languages (or stopped before it): normalize's counts
        L += ["## Language mix (normalize)", ""]
        L += _table(["language", "documents"], [[r["language"], _n(r["normalize_docs"])] for r in lm])
    mix = rep.get("mixture")
    if mix and mix.get("domains"):
        L += [f"## Domain mix ({mix.get('key') or 'domain'}) before / after reweighting", ""]
        tok = mix.get("tokens") or {}
        rows = []
        for dname, v in sorted(mix["domains"].items()):
            v = v if isinstance(v, dict) else {}
            rows.append([dname, _n(v.get("weight")), _n(v.get("docs")), _n(v.get("docs_after")),
                         _n(v.get("share_before")),
                         _n(v.get("share_target")), _n(v.get("share_after")), _n((tok.get(dname) or {}).get("share")),
                         _n((tok.get(dname) or {}).get("tokens")), _n(v.get("epochs"))])
        L += _table(["domain", "weight", "docs before", "docs after", "share before", "target", "share after",
                     "token share (shard)", "tokens (shard)", "epochs"], rows)
        if "domain_mix.png" in links:
            L += [f"![domain mix]({links['domain_mix.png']})", ""]
    t = rep.get("tokenizer")
    if t:
        L += ["## Tokenizer", ""]
        L += _table(["stat", "value"], [[k, _n(v)] for k, v in t.items() if not isinstance(v, dict)])
        if t.get("bytes_per_token_by_domain"):
            L += _table(["held-out domain", "docs", "bytes", "tokens", "bytes / token"],
                        [[k, _n(v.get("docs")), _n(v.get("bytes")), _n(v.get("tokens")), _n(v.get("bytes_per_token"))]
                         for k, v in t["bytes_per_token_by_domain"].items()])
    tr = rep.get("training")
    if tr:
        L += ["## Training", "", f"checkpoint: `{tr['checkpoint']}`", ""]
        for f in tr.get("checkpoint_files", []):
            L.append(f"- `{f['path']}` sha256 `{f['sha256']}`")
        L += [""] + _table(["metric", "value"], [[k, _n(v)] for k, v in tr["summary"].items()])
        for name, alt in (("training.png", "training loss and learning rate"), ("throughput.png", "tokens per second")):
            if name in links:
                L += [f"![{alt}]({links[name]})", ""]
    ev = rep.get("evaluation")
    if ev:
        L += ["## Evaluation", ""]
        if ev.get("report_url"):
            L += [f"checkpoint `{ev.get('checkpoint')}` (step {ev.get('step')}); [report.json]({ev['report_url']})", ""]
        if ev.get("sets"):
            cols = ("tokens", *EVAL_KEYS[:5])
            L += _table(["set", *cols], [[r["set"], *(_n(r.get(k)) for k in cols)]
                                         for r in eval_table(rep) if "tokens" in r])
        if ev.get("last_word"):
            L += _table(["last-word task", "examples", "accuracy", "perplexity"],
                        [[n, _n(t.get("examples")), _n(t.get("accuracy")), _n(t.get("perplexity"))]
                         for n, t in ev["last_word"].items()])
        if ev.get("metrics") and not ev.get("sets"):
            L += _table(["metric", "value"],
                        [[k, _n(v)] for k, v in ev["metrics"].items() if not isinstance(v, (list, dict))])
        if "evaluation.png" in links:
            L += [f"![bits per byte and validation loss per checkpoint]({links['evaluation.png']})", ""]
        if ev.get("curve"):
            keys = sorted({k for c in ev["curve"] for k in c if k not in ("step", "checkpoint")})
            L += ["Per checkpoint (columns: optimizer step):", ""]
            L += _table(["set.metric", *(f"{_n(c.get('step'))} ({c.get('checkpoint')})" for c in ev["curve"])],
                        [[k, *(_n(c.get(k)) for c in ev["curve"])] for k in keys])
        if ev.get("generations"):
            L += ["Sample generations:", ""]
            for g in ev["generations"]:
                how = "greedy" if g.get("mode") == "greedy" else f"top-{g.get('top_k')}, seed {g.get('seed')}"
                L.append(f"- ({how}) **{g.get('prompt')}**{str(g.get('text') or '').replace(chr(10), ' ')}")
            L.append("")
    L += ["## Lineage", "", "manifest sha256 = `runner.manifest_hash` (what downstream manifests record); "
          "file sha256 = the manifest.json bytes. ✓: the hash an input recorded equals that input's manifest now.",
          ""]
    rows = []
    for r in rep["lineage"]:
        ins = ", ".join(f"{k} {(v['manifest_sha256'] or '-')[:12]}{' ✓' if v['consistent'] else ' ✗'}"
                        for k, v in r["inputs"].items())
        rows.append([r["stage"], "yes" if r["behind_checkpoint"] else "", f"`{r['fingerprint']}`",
                     f"`{r['manifest_sha256']}`", f"`{r['file_sha256']}`", ins])
    L += _table(["stage", "behind checkpoint", "fingerprint", "manifest sha256", "file sha256", "inputs"], rows)
    if rep.get("crawl_inputs"):
        L += [f"Crawl files ingest read ({len(rep['crawl_inputs'])}, as its manifest lists them):", ""]
        if rep.get("crawl_files"):  # by content (stages/ingest/identity.py): part of ingest's fingerprint
            L += _table(["file", "bytes", "identified by"],
                        [[f"`{f['path']}`", f"{f['bytes']:,}" if isinstance(f.get("bytes"), int) else "",
                          ", ".join(f"{k} `{v}`" for k, v in f.items() if k not in ("path", "bytes"))]
                         for f in rep["crawl_files"]])
        else:  # manifests written before metrics.input_files
            L += [f"- `{p}`" for p in rep["crawl_inputs"]] + [""]
    return "\n".join(L)


def write(storage: str | Storage, run_id: str, rep: dict | None = None) -> dict:
    """Build (unless given) and write ``<run_id>/report/``: report.json, report.md, plots/*.png.
    Returns the report with ``files`` (name -> storage URL) added."""
    rep = rep if rep is not None else build(storage, run_id)
    out = _root(storage, run_id).sub(REPORT_DIR)
    pngs = plots(rep)
    for name, data in pngs.items():
        out.write_bytes(f"plots/{name}", data)
    rep["plots"] = {name: out.url(f"plots/{name}") for name in pngs}
    md = render_markdown(rep, {name: f"plots/{name}" for name in pngs})
    out.write_bytes("report.md", md.encode())
    rep["files"] = {"report.md": out.url("report.md"), "report.json": out.url("report.json"), **rep["plots"]}
    out.write_json("report.json", rep)
    return rep


# -- comparing two runs --------------------------------------------------------------------------------------
def _flat(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(d, list) and not any(isinstance(x, (dict, list)) for x in d):
        out[prefix[:-1]] = json.dumps(d)
    elif isinstance(d, list):
        out[prefix[:-1]] = json.dumps(d, sort_keys=True)
    else:
        out[prefix[:-1]] = d
    return out


def _delta(a, b):
    return round(b - a, 6) if _num(a) and _num(b) else None


def _rows(section: str, a: dict, b: dict, only_changed: bool = False) -> list[dict]:
    rows = []
    for k in list(dict.fromkeys([*a, *b])):
        va, vb = a.get(k), b.get(k)
        if only_changed and va == vb:
            continue
        rows.append({"section": section, "item": k, "a": va, "b": vb, "delta": _delta(va, vb)})
    return rows


def compare(storage: str | Storage, run_a: str, run_b: str) -> dict:
    """What changed between two runs in the same storage: config (changed keys only), funnel counts per stage,
    removed by reason, domain and language mix, tokenizer, training summary and evaluation per set. Rows: section,
    item, a, b, delta (b - a for numbers). ``config_changed``: stages whose config section differs (not the
    fingerprints: those differ between run ids anyway, as they hash upstream manifests holding run id and
    timings; nor output sha256s: gzip headers carry write times)."""
    A, B = build(storage, run_a), build(storage, run_b)
    rows = []
    for s in dict.fromkeys([*A["config"], *B["config"]]):
        rows += _rows(f"config {s}", _flat(A["config"].get(s) or {}), _flat(B["config"].get(s) or {}),
                      only_changed=True)

    def counts(rep):
        out = {}
        for r in rep["funnel"]:
            for k in ("documents_out", "bytes_out", "tokens"):  # estimated tokens: no (they move with the tokenizer)
                if r.get(k) is not None and not (k == "tokens" and r["tokens_estimated"]):
                    out[f"{r['stage']} {k}"] = r[k]
        return out

    def removed(rep):
        return {f"{r['stage']} {k}": v for r in rep["funnel"] for k, v in r["removed"].items()}

    def mixture(rep):
        m = rep.get("mixture") or {}
        out = {f"{d} share_after": v.get("share_after") for d, v in (m.get("domains") or {}).items()
               if isinstance(v, dict)}
        out.update({f"{d} token share": v.get("share") for d, v in (m.get("tokens") or {}).items()})
        out.update({f"language {r['language']} share_after": r["share_after"] for r in rep.get("language_mix") or []
                    if r["share_after"] is not None})
        return out

    def tok(rep):
        return {k: v for k, v in (rep.get("tokenizer") or {}).items() if not isinstance(v, dict)}

    def train(rep):
        return dict((rep.get("training") or {}).get("summary") or {})

    def evals(rep):
        return {f"{r['set']} {k}": r[k] for r in eval_table(rep) for k in EVAL_KEYS if r.get(k) is not None}

    for name, fn in (("funnel", counts), ("removed", removed), ("mixture", mixture), ("tokenizer", tok),
                     ("train", train), ("eval", evals)):
        rows += _rows(name, fn(A), fn(B))
    base = storage if isinstance(storage, Storage) else Storage(storage)
    ma = {s: read_manifest(base.sub(run_a), s) or {} for s in STAGES}
    mb = {s: read_manifest(base.sub(run_b), s) or {} for s in STAGES}

    return {"a": run_a, "b": run_b, "location": base.url(), "rows": rows,
            "config_changed": [s for s in STAGES if ma[s].get("config") != mb[s].get("config")]}


def render_compare(diff: dict, all_rows: bool = False) -> str:
    """A diff table: every row whose value differs (all rows with ``all_rows``)."""
    rows = [r for r in diff["rows"] if all_rows or r["a"] != r["b"]]
    w = max([len(f"{r['section']}: {r['item']}") for r in rows] + [20])
    head = f"{'what':<{w}} {diff['a'][:18]:>18} {diff['b'][:18]:>18} {'delta':>12}"
    lines = [f"Kiln runs '{diff['a']}' vs '{diff['b']}' in {diff['location']}",
             "config differs in: " + (", ".join(diff["config_changed"]) or "no stage"), head,
             "-" * len(head)]
    for r in rows:
        d = r["delta"]
        ds = "" if d is None else (f"{d:+,}" if isinstance(d, int) else f"{d:+.4g}")
        lines.append(f"{r['section'] + ': ' + r['item']:<{w}} {_n(r['a'])[:18]:>18} {_n(r['b'])[:18]:>18} {ds:>12}")
    if len(lines) == 4:
        lines.append("(no differences)")
    return "\n".join(lines)
