"""The end-of-run summary: what every stage did to the data, read from the manifests alone."""

from __future__ import annotations

from stages import STAGES
from stages.core.runner import read_manifest
from stages.core.storage import Storage


def collect(storage: str | Storage, run_id: str) -> dict:
    root = (storage if isinstance(storage, Storage) else Storage(storage)).sub(run_id)
    manifests = {s: m for s in STAGES if (m := read_manifest(root, s)) is not None}
    bpt = (manifests.get("tokenizer") or {}).get("metrics", {}).get("bytes_per_token")
    rows = []
    for stage, m in manifests.items():
        c = m.get("counts", {})
        tokens, estimated = c.get("tokens_out"), False
        if tokens is None and c.get("bytes_out") is not None and bpt:
            tokens, estimated = round(c["bytes_out"] / bpt), True
        rows.append({"stage": stage, "documents_in": c.get("documents_in"), "documents_out": c.get("documents_out"),
                     "bytes_out": c.get("bytes_out"), "tokens": tokens, "tokens_estimated": estimated,
                     "removed": c.get("removed") or {}, "wall_time_s": m.get("wall_time_s"),
                     "skipped": bool(m.get("skipped"))})
    out = {"run_id": run_id, "location": root.url(), "stages": rows, "complete": len(manifests) == len(STAGES)}
    if "train" in manifests:
        t = manifests["train"]
        out["checkpoint"] = root.sub("train").url("final")
        out["train"] = {**t.get("counts", {}), **{k: v for k, v in t.get("metrics", {}).items()
                                                   if isinstance(v, (int, float, str))}}
    if "evaluate" in manifests:
        ev = root.sub("evaluate")
        out["evaluation"] = ev.read_json("report.json") if ev.exists("report.json") else manifests["evaluate"]["metrics"]
        out["evaluation_report"] = ev.url("report.json")
    return out


def _n(v, approx=False) -> str:
    if v is None:
        return "-"
    s = f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)
    return ("~" + s) if approx else s


def _eval_lines(ev) -> list[str]:
    sets = ev.get("sets", ev) if isinstance(ev, dict) else {}
    lines = []
    for name, res in sets.items():
        if isinstance(res, dict):
            keys = [k for k in ("loss", "perplexity", "bits_per_byte", "word_perplexity", "accuracy", "tokens")
                    if res.get(k) is not None]
            lines.append(f"  {name:<16}" + "  ".join(f"{k}={_n(res[k])}" for k in keys))
    return lines


def render(summary: dict) -> str:
    head = f"{'stage':<10} {'docs in':>9} {'docs out':>9} {'MB out':>8} {'tokens':>12} {'time s':>7}  removed"
    lines = [f"Kiln run '{summary['run_id']}' at {summary['location']}", head, "-" * len(head)]
    for r in summary["stages"]:
        mb = f"{r['bytes_out'] / 1e6:.2f}" if r["bytes_out"] is not None else "-"
        removed = ", ".join(f"{k}={v}" for k, v in r["removed"].items() if v) or ""
        wall = "skip" if r["skipped"] else _n(r["wall_time_s"])
        lines.append(f"{r['stage']:<10} {_n(r['documents_in']):>9} {_n(r['documents_out']):>9} {mb:>8} "
                     f"{_n(r['tokens'], r['tokens_estimated']):>12} {wall:>7}  {removed}")
    if any(r["tokens_estimated"] for r in summary["stages"]):
        lines.append("(~ tokens before sharding are estimated from the trained tokenizer's bytes per token)")
    if "checkpoint" in summary:
        t = summary["train"]
        extra = ", ".join(f"{k}={_n(t[k])}" for k in ("steps", "tokens_trained", "final_loss", "tokens_per_s") if k in t)
        lines.append(f"checkpoint: {summary['checkpoint']}  ({extra})")
    if "evaluation" in summary:
        lines.append(f"evaluation: {summary['evaluation_report']}")
        lines.extend(_eval_lines(summary["evaluation"]))
        lines.extend(_eval_lines({"sets": summary["evaluation"].get("last_word") or {}}))
    if "report" in summary:
        lines.append(f"report: {summary['report']}  (kiln report --compare RUN_A RUN_B: what changed between runs)")
    if not summary["complete"]:
        lines.append("(not every stage has run yet)")
    return "\n".join(lines)
