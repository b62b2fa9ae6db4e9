"""Kiln's deployments, and a process that serves them against a Prefect server (``PREFECT_API_URL``).

    python -m flows.deploy [--cron "0 2 * * *"] [--timezone UTC] [--no-nightly]     (= `kiln serve`)

- ``kiln-run/pipeline``: manual, the UI's Run button; ``kiln-data/data`` and ``kiln-train/train``: manual;
- ``kiln-nightly-refresh/nightly-refresh``: cron 02:00 UTC by default ($KILN_NIGHTLY_CRON, $KILN_NIGHTLY_TZ).
Every deployment enforces its parameter schema, so the server refuses a bad parameter (409) before a flow run
exists. ``serve`` runs each flow run in a child process of this one (prefect's Runner); prefect.yaml describes
the same deployments for ``prefect deploy`` onto a work pool (docker/compose.yaml's worker).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CRON = "0 2 * * *"
TAGS = ["kiln"]


def deployments(cron: str | None = None, timezone: str | None = None, nightly: bool = True) -> list:
    """RunnerDeployments for ``prefect.serve`` (names: pipeline, data, train, nightly-refresh)."""
    from flows.nightly import kiln_data, kiln_run, kiln_train, nightly_refresh

    cron = cron or os.environ.get("KILN_NIGHTLY_CRON") or DEFAULT_CRON
    timezone = timezone or os.environ.get("KILN_NIGHTLY_TZ") or "UTC"
    common = {"tags": TAGS, "enforce_parameter_schema": True}
    out = [kiln_run.to_deployment("pipeline", description="Crawl to evaluated checkpoint (UI: Run)", **common),
           kiln_data.to_deployment("data", description="Crawl to token shards (a dataset version)", **common),
           kiln_train.to_deployment("train", description="Shards to checkpoint and evaluation", **common)]
    if nightly:
        from prefect.client.schemas.schedules import CronSchedule

        out.append(nightly_refresh.to_deployment(
            "nightly-refresh", description=f"Newest snapshot -> dedup vs index -> new dataset version ({cron} "
                                           f"{timezone})", schedule=CronSchedule(cron=cron, timezone=timezone),
            **common))
    return out


def serve(cron: str | None = None, timezone: str | None = None, nightly: bool = True, limit: int | None = None):
    """Register the deployments and run their flow runs until interrupted (blocks)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cron, timezone, nightly), limit=limit)


def deploy(pool: str = "kiln", names: list[str] | None = None) -> int:
    """`kiln deploy`: the process work pool ``pool`` (created when missing) and prefect.yaml's deployments
    (``prefect deploy --all``, or only ``names``), with the pull step pointing at this checkout unless KILN_HOME
    says otherwise. Returns prefect's exit code."""
    import subprocess

    from flows import REPO

    env = {**os.environ, "KILN_HOME": os.environ.get("KILN_HOME") or str(REPO)}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cli = [sys.executable, "-m", "prefect"]
    if subprocess.run(cli + ["work-pool", "inspect", pool], env=env, cwd=REPO, capture_output=True).returncode:
        made = subprocess.run(cli + ["work-pool", "create", pool, "--type", "process"], env=env, cwd=REPO)
        if made.returncode:
            return made.returncode
    which = [a for n in names for a in ("--name", n)] if names else ["--all"]
    if pool != "kiln":
        which += ["--pool", pool]
    return subprocess.run(cli + ["--no-prompt", "deploy", *which], env=env, cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln serve", description="serve Kiln's deployments (needs PREFECT_API_URL)")
    p.add_argument("--cron", default=None, help=f"nightly-refresh schedule (default $KILN_NIGHTLY_CRON or {DEFAULT_CRON!r})")
    p.add_argument("--timezone", default=None, help="schedule timezone, e.g. Europe/Paris (default $KILN_NIGHTLY_TZ or UTC)")
    p.add_argument("--no-nightly", action="store_true", help="do not register the nightly-refresh deployment")
    p.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    a = p.parse_args(argv)
    serve(a.cron, a.timezone, not a.no_nightly, a.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
