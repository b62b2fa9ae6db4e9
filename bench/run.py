"""`make bench`: run every bench/bench_*.py, write bench/results.json, refresh the README's table.

Each benchmark module has ``run() -> dict`` mapping a figure's key to
``{"value": number, "unit": str, "what": str}``. Results carry the machine and versions they ran on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from stages.core.runner import code_version

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "kiln": code_version(),
            "versions": {p: version(p) for p in ("torch", "datatrove", "sentencepiece", "prefect", "pyarrow",
                                                  "trafilatura", "resiliparse", "warcio", "datasketch")},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(results: dict) -> str:
    m = results["_machine"]
    lines = [f"Measured by `make bench` on {m['cpu']} ({m['cores']} cores), {m['date']}, kiln {m['kiln']}.", "",
             "| figure | value | unit |", "|---|---:|---|"]
    for key, fig in results.items():
        if key.startswith("_"):
            continue
        v = fig["value"]
        vs = f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 100 else f"{v:.3g}" if isinstance(v, float) else str(v)
        lines.append(f"| {fig.get('what', key)} (`{key}`) | {vs} | {fig.get('unit', '')} |")
    return "\n".join(lines)


def main(only: list[str]) -> None:
    results: dict = {}
    for path in sorted(HERE.glob("bench_*.py")):
        if only and path.stem not in only:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(f"== {path.stem}", flush=True)
        figures = mod.run()
        for k, fig in figures.items():
            print(f"{k}: {fig['value']} {fig.get('unit', '')}", flush=True)
        results.update(figures)
    out = HERE / "results.json"
    previous = json.loads(out.read_text()) if out.exists() and only else {}
    merged = {**{k: v for k, v in previous.items() if not k.startswith("_")}, **results, "_machine": machine()}
    out.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    readme = REPO / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + table(merged) + "\n" + END + rest.split(END, 1)[1])
    print(table(merged))


if __name__ == "__main__":
    main(sys.argv[1:])
