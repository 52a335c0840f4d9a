"""Flow-run hooks: a failed or crashed run is recorded as one JSON line (flows.failed_runs), and announced through
a Prefect Webhook block when flows.notify_block names one. A notification that fails is logged, never raised: it
must not hide the failure it reports."""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect.logging.loggers import flow_run_logger

from tipsen import paths
from tipsen.config import FlowsParams, load_params
from tipsen.errors import ConfigError

SHOWN_PARAMETERS = ("keywords", "profile", "slug")  # a record names what the run was for, not its paths


def record_failure(flow, flow_run, state) -> dict:
    """on_failure and on_crashed: append the run's record and call the webhook block; returns the record."""
    logger = flow_run_logger(flow_run, flow)
    given = flow_run.parameters or {}
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "flow": flow.name, "run": flow_run.name,
              "id": str(flow_run.id), "state": state.name, "message": (state.message or "")[:500],
              "parameters": {k: given[k] for k in SHOWN_PARAMETERS if given.get(k) is not None}}
    try:  # the params may be why the run failed: then the defaults say where to record it
        cfg = load_params(given.get("params_file", str(paths.PARAMS)), profile=given.get("profile")).flows
    except ConfigError:
        cfg = FlowsParams()
    out = Path(cfg.failed_runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:  # one short line per run: an append is whole or absent
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("failed run recorded in %s", out)
    if cfg.notify_block:
        notify(cfg.notify_block, record, logger)
    return record


def notify(block_name: str, record: dict, logger) -> None:
    """Call the Webhook block saved as `block_name` with the record as JSON."""
    from prefect.blocks.webhook import Webhook
    from prefect.utilities.asyncutils import run_coro_as_sync

    try:
        response = run_coro_as_sync(Webhook.load(block_name).call(payload=record))
        response.raise_for_status()
    except Exception as exc:  # noqa: BLE001 - any failure to notify is reported the same way
        logger.warning("could not notify through the webhook block %r: %s: %s", block_name,
                       type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
    else:
        logger.info("notified through the webhook block %r", block_name)
