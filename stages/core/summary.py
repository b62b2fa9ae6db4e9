"""The end-of-run summary: what every stage did to the data, read from the manifests alone.

Its funnel rows are the run report's (``stages.core.report.funnel``: one function), so the table `kiln run` /
`make demo` prints at the end is the report's data funnel, number for number."""

from __future__ import annotations

from stages import STAGES
from stages.core.report import funnel, render_funnel
from stages.core.runner import read_manifest
from stages.core.storage import Storage


def collect(storage: str | Storage, run_id: str) -> dict:
    root = (storage if isinstance(storage, Storage) else Storage(storage)).sub(run_id)
    manifests = {s: m for s in STAGES if (m := read_manifest(root, s)) is not None}
    rows = [{**r, "skipped": bool(manifests[r["stage"]].get("skipped"))} for r in funnel(manifests, root)]
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


def _eval_lines(ev, width: int = 16) -> list[str]:
    sets = ev.get("sets", ev) if isinstance(ev, dict) else {}
    lines = []
    for name, res in sets.items():
        if isinstance(res, dict):
            keys = [k for k in ("loss", "perplexity", "bits_per_byte", "word_perplexity", "accuracy", "tokens",
                                "examples") if res.get(k) is not None]
            lines.append(f"  {name:<{width}}" + "  ".join(f"{k}={_n(res[k])}" for k in keys))
    return lines


def render(summary: dict) -> str:
    lines = [f"Kiln run '{summary['run_id']}' at {summary['location']}", render_funnel(summary, wall_time=True)]
    if "checkpoint" in summary:
        t = summary["train"]
        t = {**t, **({"tokens_per_s": round(t["tokens_per_s"])} if isinstance(t.get("tokens_per_s"), float) else {})}
        extra = ", ".join(f"{k}={_n(t[k])}" for k in ("steps", "tokens_trained", "final_loss", "tokens_per_s") if k in t)
        lines.append(f"checkpoint: {summary['checkpoint']}  ({extra})")
    if "evaluation" in summary:
        lines.append(f"evaluation: {summary['evaluation_report']}")
        ev = summary["evaluation"]
        last_word = {"sets": ev.get("last_word") or {}} if isinstance(ev, dict) else {}
        names = [*(ev.get("sets", ev) if isinstance(ev, dict) else {}), *last_word.get("sets", {})]
        width = max([16, *(len(n) + 2 for n in names)])
        lines.extend(_eval_lines(ev, width))
        lines.extend(_eval_lines(last_word, width))
    if "report" in summary:
        lines.append(f"report: {summary['report']}  (kiln report --compare RUN_A RUN_B: what changed between runs)")
    if not summary["complete"]:
        lines.append("(not every stage has run yet)")
    return "\n".join(lines)
