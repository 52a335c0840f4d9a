"""Deployments of the flows, for the Prefect UI (`prefect server start`, then http://127.0.0.1:4200).

    python -m flows.deploy                 serve curate, train, train-keyword, evaluate and retrain from this
                                           process; retrain runs on flows.retrain_cron, read in
                                           flows.retrain_timezone (Asia/Seoul)
    python -m flows.deploy --pool gpu      register them on the work pool `gpu` instead (code from this
                                           directory, no image); then `prefect worker start --pool gpu` on
                                           each GPU machine, and set flows.work_pool: gpu to fan training out
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.pipeline import curate_flow, evaluate_flow, retrain_flow, train_flow, train_keyword_flow
from tipsen.config import Params, load_params
from tipsen.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FLOWS = (curate_flow, train_flow, train_keyword_flow, evaluate_flow, retrain_flow)
LOCAL = "local"  # name of the served deployments; pool deployments are named after their pool


def _options(f, params: Params, profile: str | None) -> dict:
    """Per-flow deployment options: retrain gets the cron schedule, in its time zone, and never overlaps itself."""
    from prefect.schedules import Cron

    opts = {"parameters": {"profile": profile}} if profile else {}
    if f is retrain_flow:
        opts.update(schedule=Cron(params.flows.retrain_cron, timezone=params.flows.retrain_timezone),
                    concurrency_limit=1)
    return opts


def deployments(params: Params, *, profile: str | None = None) -> list:
    """One deployment per flow, for `prefect.serve`."""
    return [f.to_deployment(name=LOCAL, **_options(f, params, profile)) for f in FLOWS]


def deploy_to_pool(pool: str, params: Params, *, source: Path = ROOT, profile: str | None = None) -> list:
    """Register every flow on `pool`, loading the code from `source`; returns the deployment ids.

    A process worker runs each flow run in `source` (its working directory), so relative paths resolve to
    the project there: on several machines, mount the project (data/, models/) and the Prefect result
    storage (PREFECT_LOCAL_STORAGE_PATH) on shared storage.
    """
    return [
        f.from_source(str(source), entrypoint=f"flows/pipeline.py:{f.fn.__name__}").deploy(
            name=pool, work_pool_name=pool, build=False, push=False, print_next_steps=False,
            **_options(f, params, profile))
        for f in FLOWS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="profile the deployments run (default: params.yaml's)")
    parser.add_argument("--pool", default=None, help="register on this work pool instead of serving")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, profile=args.profile)
    except ConfigError as exc:
        print(f"flows.deploy: error: {exc}", file=sys.stderr)
        return 2
    if args.pool:
        ids = deploy_to_pool(args.pool, params, profile=args.profile)
        print(f"registered {len(ids)} deployments on work pool {args.pool!r}; start workers with "
              f"`prefect worker start --pool {args.pool}`")
        return 0
    from prefect import serve

    # The schedule stays active while this process is down (runs then show as Late), not silently paused.
    serve(*deployments(params, profile=args.profile), pause_on_shutdown=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
