"""`kiln`: run one stage locally, or the whole DAG as a Prefect flow.

    kiln stage NAME --config configs/tiny.yaml [--run-id ID] [--storage URI] [--set key=value ...]
    kiln stage evaluate --checkpoint step_000100|PATH|s3://...                (evaluate any checkpoint)
    kiln stage train --set train.node_rank=1 ...      (node > 0 of a multi-node run joins node 0's rendezvous)
    kiln run --config configs/tiny.yaml [--run-id ID] [--storage URI] [--stages a,b] [--set key=value ...]
    kiln summary --config configs/tiny.yaml [--run-id ID] [--storage URI]
    kiln report --config configs/tiny.yaml [--run-id ID] [--storage URI]     (writes <run>/report/)
    kiln report --compare RUN_A RUN_B [--storage URI] [--all]                (what changed between two runs)
    kiln plan [--compute FLOPS | --params N] --config configs/tiny.yaml [--run-id ID] [--storage URI]
    kiln serve [--cron CRON] [--timezone TZ] [--no-nightly]    (serve the deployments against $PREFECT_API_URL)
    kiln deploy [--pool kiln] [--name NAME]                    (register prefect.yaml's deployments on a work pool)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from flows import DEFAULT_CONFIG
from stages import STAGES

EXIT_USAGE, EXIT_FAILED = 2, 1


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"kiln: --set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: from a web crawl to an evaluated LM checkpoint.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--config", default=DEFAULT_CONFIG, help="profile YAML (default: configs/tiny.yaml)")
        sp.add_argument("--run-id", default=None, help="run id (default: the profile's name)")
        sp.add_argument("--storage", default=None, help="local folder or s3://bucket/prefix (default: $KILN_STORAGE,"
                                                         " else the profile's run.storage)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, e.g. --set train.max_steps=20")

    s = sub.add_parser("stage", help="run one stage locally (no Prefect)")
    s.add_argument("name", choices=STAGES)
    common(s)
    s.add_argument("--force", action="store_true", help="re-run even if an identical run is complete")
    s.add_argument("--checkpoint", default=None,
                   help="evaluate only: train folder (final, step_000100) or a checkpoint folder path / s3:// URI")
    r = sub.add_parser("run", help="run the whole DAG as a Prefect flow")
    common(r)
    r.add_argument("--stages", default=None, help="comma-separated subset of stages")
    r.add_argument("--force", action="store_true")
    sm = sub.add_parser("summary", help="print what every stage of a run did")
    common(sm)
    rp = sub.add_parser("report", help="write the run report (report.md, report.json, plots) or compare two runs")
    common(rp)
    rp.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                    help="print what changed in data and metrics between two runs in the same storage")
    rp.add_argument("--all", action="store_true", help="with --compare: every row, not only those that differ")
    pl = sub.add_parser("plan", help="Chinchilla: compute-optimal params and tokens vs the run's dataset")
    common(pl)
    g = pl.add_mutually_exclusive_group()
    g.add_argument("--compute", type=float, default=None, help="training budget in FLOPs, e.g. 1e18")
    g.add_argument("--params", type=float, default=None, help="model parameters, e.g. 124e6")
    sv = sub.add_parser("serve", help="serve the deployments against a Prefect server ($PREFECT_API_URL)")
    sv.add_argument("--cron", default=None, help="nightly-refresh cron (default $KILN_NIGHTLY_CRON or '0 2 * * *')")
    sv.add_argument("--timezone", default=None, help="its timezone, e.g. Europe/Paris (default $KILN_NIGHTLY_TZ or UTC)")
    sv.add_argument("--no-nightly", action="store_true", help="do not register nightly-refresh")
    sv.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    dp = sub.add_parser("deploy", help="register prefect.yaml's deployments on a process work pool")
    dp.add_argument("--pool", default="kiln", help="work pool (created when missing; default: kiln)")
    dp.add_argument("--name", action="append", default=None, help="only this deployment (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("kiln").setLevel(logging.INFO)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.cmd == "serve":  # no profile needed: each flow run loads its own
        from flows.deploy import serve

        serve(args.cron, args.timezone, not args.no_nightly, args.limit)
        return 0
    if args.cmd == "deploy":
        from flows.deploy import deploy

        return deploy(args.pool, args.name)

    from stages.core import summary
    from stages.core.config import ConfigError, default_run_id, load_config, storage_uri
    from stages.core.runner import StageError, name_problem, run_stage
    from stages.core.storage import StorageUnavailable

    try:
        overrides = _overrides(args.set)
        cfg = load_config(args.config, overrides)
        uri, rid = storage_uri(cfg, args.storage), args.run_id or default_run_id(cfg)
        names = [("--run-id" if args.run_id else "run id (the profile's name)", rid)]
        names += [("--compare", r) for r in getattr(args, "compare", None) or []]
        for key, value in names:  # one folder in storage: `--run-id ../x` wrote outside it
            if (why := name_problem(value, key)):
                raise ConfigError(why)
        if args.cmd == "stage" and args.checkpoint:
            if args.name != "evaluate":
                raise ConfigError("--checkpoint is for `kiln stage evaluate`")
            overrides["evaluate.checkpoint"] = args.checkpoint
            cfg = load_config(args.config, overrides)
        if args.cmd == "stage" and args.name == "train" and cfg.train.nnodes > 1 and cfg.train.node_rank > 0:
            from stages.train import join_node  # nodes > 0 join node 0's torchrun rendezvous; node 0 runs the stage

            s = join_node(cfg, uri, rid)
            print(f"train: node {cfg.train.node_rank} done; run summary {s}")
        elif args.cmd == "stage":
            m = run_stage(args.name, cfg, uri, rid, force=args.force)
            state = "already complete, skipped" if m.get("skipped") else f"done in {m['wall_time_s']:.1f}s"
            print(f"{args.name}: {state}; counts {m['counts']}; manifest {m['location']}/manifest.json")
        elif args.cmd == "run":
            from flows.pipeline import pipeline

            stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
            state = pipeline(config=args.config, storage=uri, run_id=rid, stages=stages, overrides=overrides,
                             force=args.force, return_state=True)
            if not state.is_completed():
                print(summary.render(summary.collect(uri, rid)), file=sys.stderr)
                print(f"kiln: flow run failed: {state.message}", file=sys.stderr)
                return EXIT_FAILED
            print(summary.render(state.result()))
        elif args.cmd == "report":
            from stages.core import report
            from stages.core.storage import Storage

            for r in args.compare or [rid]:
                if not any(Storage(uri).sub(r).exists(f"{s}/manifest.json") for s in STAGES):
                    raise StageError(f"report: run '{r}' has no stage manifest in {Storage(uri).url()}")
            if args.compare:
                print(report.render_compare(report.compare(uri, *args.compare), all_rows=args.all))
            else:
                rep = report.write(uri, rid)
                print(f"report: {rep['files']['report.md']}")
                print(report.render_funnel(rep))
        elif args.cmd == "plan":
            from stages.core.runner import read_manifest
            from stages.core.storage import Storage
            from stages.train.plan import plan, render

            if (args.compute is not None and args.compute <= 0) or (args.params is not None and args.params <= 0):
                raise ConfigError("kiln plan: --compute and --params must be > 0")
            root = Storage(uri).sub(rid)
            p = plan(cfg, args.compute, args.params, read_manifest(root, "shard"), read_manifest(root, "tokenizer"))
            print(render(p, f"{root.url()}/shard"))
        else:
            print(summary.render(summary.collect(uri, rid)))
    except ConfigError as e:
        print(f"kiln: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return EXIT_FAILED
    except StorageUnavailable as e:  # storage down for good: its one-line cause, not a 200-line traceback
        print(f"kiln: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
