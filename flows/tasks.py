"""Prefect tasks: each one a thin call into tipsen/, the same functions the DVC stages run.

Retries, caching and result persistence are declared in the decorators. Results are JSON (paths and metrics),
never pickles. A task that writes files is never cached: a cache hit must not stand in for a missing file.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture, wait
from prefect.tasks import exponential_backoff

from tipsen import curate as curation
from tipsen import evaluate as evaluation
from tipsen import retrain
from tipsen import train as training
from tipsen.bank import build_bank
from tipsen.config import FlowsParams, Params, load_params
from tipsen.errors import ConfigError
from tipsen.registry import Registry

JSON = dict(persist_result=True, result_serializer="json")


def config(params_file: str, profile: str | None) -> Params:
    """Load and validate params once per flow run, and log the resolved config into the run's log."""
    params = load_params(params_file, profile=profile)
    get_run_logger().info("resolved config: %s", params.model_dump(mode="json"))
    return params


def keywords(params: Params, requested: list[str] | None) -> list[str]:
    """The requested slugs (default: the profile's keywords), checked against the registry before any path use."""
    registry = Registry.load()
    return [registry.get(s, field="keywords").slug for s in dict.fromkeys(requested or params.keywords)]


def transient(task, task_run, state) -> bool:
    """Retry condition: anything but a user's mistake (ConfigError) or a diverged run (same seed, same NaN)."""
    try:
        state.result()
    except (ConfigError, training.TrainingError):
        return False
    except Exception:
        return True
    return True


@task(name="curate", cache_policy=NO_CACHE, **JSON)
def curate_data(params: Params, raw: str, out: str, metrics: str | None) -> dict:
    """Curate the raw export into `out` (tipsen.curate.curate)."""
    report = curation.curate(params, Path(raw), Path(out), metrics=Path(metrics) if metrics else None, progress=False)
    t = report.totals
    get_run_logger().info("curated %d of %d items (%d train, %d held out) into %s", t.kept, t.in_, t.train,
                          t.heldout, out)
    return {"out": out, "in": t.in_, "kept": t.kept, "train": t.train, "heldout": t.heldout,
            "kept_per_keyword": {s: g.kept for s, g in report.keywords.items()},
            "short_keywords": report.short_keywords}


@task(name="train-keyword", task_run_name="train-{slug}", retries=2, retry_delay_seconds=exponential_backoff(30),
      retry_condition_fn=transient, cache_policy=NO_CACHE, **JSON)
def train_keyword(params: Params, slug: str, data: str, out: str, metrics: str | None = None) -> dict:
    """Train one keyword's LoRA into `out` unless the adapter there is current; logs step and loss as it goes."""
    logger, slug = get_run_logger(), Registry.load().get(slug, field="slug").slug
    run = {"slug": slug, "adapter": out, "pid": os.getpid(), "ppid": os.getppid(),
           "attempts": TaskRunContext.get().task_run.run_count}
    why = retrain.adapter_status(params, slug, Path(data), Path(out))
    if why is None:
        logger.info("%s: the adapter is current (same data and params); skipped", slug)
        return {**run, "status": "unchanged"}
    logger.info("%s: training %d steps (%s)", slug, params.train.steps, why)
    summary = training.train(  # looked up at call time, so a test can inject a failure into it
        params, slug, Path(data), Path(out), progress=False, metrics_dir=Path(metrics) if metrics else None,
        log_fn=lambda step, loss: logger.info("%s step %d/%d loss %.4f", slug, step, params.train.steps, loss))
    return {**run, "status": "trained", "reason": why, **summary.as_dict()}


def configured(t, flows: FlowsParams):
    """`t` with its timeout from params.flows, and for training the retry count and exponential backoff too (the
    decorators hold the defaults). A timed-out training attempt is retried like any other transient failure."""
    timeouts = {curate_data.name: flows.curate_timeout_s, train_keyword.name: flows.train_timeout_s,
                evaluate_bank.name: flows.evaluate_timeout_s}
    options = {"timeout_seconds": timeouts[t.name]}
    if t.name == train_keyword.name:
        options.update(retries=flows.retries, retry_delay_seconds=exponential_backoff(flows.retry_delay_s))
    return t.with_options(**options)


@task(name="train-on-pool", task_run_name="pool-{slug}", cache_policy=NO_CACHE, **JSON)
def train_on_pool(deployment: str, slug: str, parameters: dict) -> dict:
    """Run one keyword's training flow on the work pool (whichever worker is free) and return its JSON result."""
    run = run_deployment(deployment, parameters=parameters, flow_run_name=f"train-{slug}", poll_interval=2)
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} ended {run.state.name}: {run.state.message}")
    return run.state.result()  # read from the result storage the worker wrote to (shared, for several machines)


def train_report(futures: dict[str, PrefectFuture]) -> dict:
    """Wait for every keyword, then sort them into trained, skipped as unchanged, and failed (with the reason)."""
    wait(list(futures.values()))
    report = {"trained": [], "skipped_unchanged": [], "failed": {}, "runs": {}}
    for slug, future in futures.items():
        if future.state.is_completed():
            report["runs"][slug] = run = future.result()
            report["trained" if run["status"] == "trained" else "skipped_unchanged"].append(slug)
        else:
            exc = future.state.result(raise_on_failure=False)
            report["failed"][slug] = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) \
                else str(future.state.message)
    if report["failed"]:
        get_run_logger().warning("failed keywords: %s", report["failed"])
    return report


def training_artifact(report: dict) -> str:
    """The training summary in the Prefect UI: a Markdown table, one row per keyword. Returns the artifact's id."""
    rows = ["| keyword | status | steps | final loss | time (s) | note |", "| --- | --- | --- | --- | --- | --- |"]
    for slug, run in report["runs"].items():
        if run["status"] == "trained":
            rows.append(f"| {slug} | trained | {run['steps']} | {run['final_loss']:.4f} | {run['wall_time_s']:.1f} "
                        f"| {run['reason']} |")
        else:
            rows.append(f"| {slug} | {run['status']} | | | | same data and params |")
    for slug, why in report["failed"].items():
        rows.append(f"| {slug} | failed | | | | {(why.splitlines() or [''])[0][:200]} |")
    return str(create_markdown_artifact(key="training-summary", markdown="\n".join(rows),
                                        description="train: one row per keyword"))


def evaluation_artifacts(reports: str) -> list[str]:
    """The evaluation in the Prefect UI: Table II as Markdown (reports/eval_table.md) and the per-keyword scores as
    a table artifact (reports/per_keyword.csv). Returns the artifacts' ids."""
    table = (Path(reports) / "eval_table.md").read_text(encoding="utf-8")
    with open(Path(reports) / "per_keyword.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [str(create_markdown_artifact(key="evaluation-table", markdown=table, description="evaluate: Table II")),
            str(create_table_artifact(key="per-keyword-scores", table=rows,
                                      description="evaluate: every keyword's score per method"))]


@task(name="bank", cache_policy=NO_CACHE, **JSON)
def index_bank(params: Params, loras: str, bank: str) -> dict:
    """Index the profile's adapters under `loras` into `bank`, atomically (tipsen.bank.build_bank). When no keyword
    produced an adapter, a bank that has adapters is kept as it is, and the report says why."""
    if not Path(loras).is_dir() and not Path(bank).exists():
        return {"bank": bank, "adapters": [], "missing": list(params.keywords), "kept": "no adapter was trained"}
    try:
        index = build_bank(Path(loras), Path(bank), keywords=params.keywords, registry=Registry.load(),
                           base_model=params.models.base)
    except ConfigError as exc:
        get_run_logger().warning("bank not rebuilt: %s", exc)
        return {"bank": bank, "adapters": [], "missing": list(params.keywords), "kept": str(exc)}
    return {"bank": bank, "adapters": [e["slug"] for e in index["adapters"]], "missing": index["missing"]}


@task(name="evaluate", cache_policy=NO_CACHE, **JSON)
def evaluate_bank(params: Params, curated: str, bank: str, metrics: str, reports: str,
                  keywords: list[str] | None) -> dict:
    """The evaluation table and metrics for the bank (tipsen.evaluate.evaluate); returns reports/eval.json."""
    result = evaluation.evaluate(params, curated=Path(curated), bank=Path(bank), metrics_dir=Path(metrics),
                                 reports_dir=Path(reports), keywords=keywords)
    evaluation_artifacts(reports)
    return result


@task(name="score-adapter", task_run_name="score-{slug}", cache_policy=INPUTS + TASK_SOURCE, **JSON)
def score_adapter(params: Params, slug: str, bank: str, curated: str, key: str) -> float:
    """A keyword's held-out CLIP alignment with the bank's adapter; `key` (adapter and data digest) keys the cache."""
    return retrain.score(params, slug, bank=Path(bank), curated=Path(curated))


def gate_scores(params: Params, slugs: list[str], *, candidate_bank: str, bank: str, curated: str) -> dict:
    """[candidate, current, why current is missing] per keyword, on the same held-out images and seeds; current is
    None when the live adapter is absent or fails verification (a broken live adapter never strands a candidate)."""
    scores = {}
    for slug in slugs:
        new, live = (retrain.score_key(Path(b), Path(curated), slug) for b in (candidate_bank, bank))
        scores[slug] = [score_adapter(params, slug, candidate_bank, curated, new),
                        score_adapter(params, slug, bank, curated, live) if live else None,
                        None if live else retrain.unusable(Path(bank), slug)]
    return scores


@task(name="promote", cache_policy=NO_CACHE, **JSON)
def promote_adapters(params: Params, scores: dict, *, candidates: str, loras: str, bank: str,
                     candidate_metrics: str | None, metrics: str | None) -> dict:
    """Gate each candidate against its current adapter, install the winners, swap the bank once (tipsen.retrain)."""
    decisions = [retrain.decide(s, cand, cur, params.flows.promotion_margin, live_problem=why)
                 for s, (cand, cur, why) in scores.items()]
    result = retrain.promote(decisions, candidates=Path(candidates), loras=Path(loras), bank=Path(bank),
                             keywords=params.keywords, registry=Registry.load(), base_model=params.models.base,
                             candidate_metrics=Path(candidate_metrics) if candidate_metrics else None,
                             metrics=Path(metrics) if metrics else None)
    return {**result, "decisions": [d.as_dict() for d in decisions]}


@task(name="reload-service", task_run_name="reload-{url}", cache_policy=NO_CACHE, **JSON)
def reload_service(url: str) -> dict:
    """Ask one service to reload its bank (tipsen.retrain.reload_service); retried by `reload_services`."""
    return retrain.reload_service(url)


def reload_services(flows: FlowsParams, bank: str) -> dict[str, dict]:
    """After a promotion, reload every service in flows.reload_urls, each with the flow's retries, and record each
    outcome in promotions.jsonl. A service that stays unreachable fails nothing else: its outcome says why."""
    call = reload_service.with_options(retries=flows.retries,
                                       retry_delay_seconds=exponential_backoff(flows.retry_delay_s))
    futures = {url: call.submit(url) for url in flows.reload_urls}
    outcomes = {}
    for url, future in futures.items():
        try:
            answer = future.result()
            outcomes[url] = {"ok": True, "version": answer.get("version"), "changed": answer.get("changed", []),
                             "added": answer.get("added", []), "unavailable": answer.get("unavailable", {})}
        except Exception as exc:  # the last retry's error, recorded; the promotion itself stands
            outcomes[url] = {"ok": False, "error": str(exc)[:500]}
            get_run_logger().warning("reload of %s failed: %s", url, exc)
    retrain.record_reloads(Path(bank), outcomes)
    return outcomes


@task(name="detect-changes", cache_policy=NO_CACHE, **JSON)
def detect_raw_changes(params: Params, raw: str, state: str) -> dict:
    """The keywords whose raw items were added, edited or removed since the last run (vs the state file)."""
    digests = {s: d for s, d in retrain.raw_digests(Path(raw), Registry.load()).items() if s in params.keywords}
    previous = retrain.load_state(Path(state))["raw"]
    return {"changed": [s for s in retrain.changed(digests, previous) if s in params.keywords], "digests": digests}


@task(name="outdated-adapters", cache_policy=NO_CACHE, **JSON)
def outdated_adapters(params: Params, curated: str, loras: str, state: str) -> dict:
    """Of the keywords whose curated data changed since the last run, those whose adapter is out of date, and why."""
    digests = {s: retrain.folder_digest(Path(curated) / s) for s in params.keywords}
    changed = [s for s in retrain.changed(digests, retrain.load_state(Path(state))["curated"]) if s in digests]
    outdated = {}
    for slug in changed:
        try:
            why = retrain.adapter_status(params, slug, Path(curated), Path(loras) / slug)
        except ConfigError as exc:  # e.g. no usable image left: training will fail and report it
            why = str(exc)
        if why:
            outdated[slug] = why
    return {"changed": changed, "outdated": outdated, "digests": digests}


@task(name="dvc-lineage", cache_policy=NO_CACHE, **JSON)
def record_lineage(root: str, outputs: list[str], downstream_of: str) -> dict:
    """Record this run's outputs in dvc.lock, then rerun what is stale after the bank (tipsen.retrain)."""
    if not (Path(root) / "dvc.yaml").is_file() or not (Path(root) / ".dvc").is_dir():
        get_run_logger().info("%s is not a DVC project; no lineage to record", Path(root).resolve())
        return {"skipped": "not a DVC project"}
    return retrain.record_lineage(Path(root), [Path(p) for p in outputs], downstream_of=Path(downstream_of))


@task(name="save-state", cache_policy=NO_CACHE, **JSON)
def save_state(state: str, raw: dict, curated: dict, failed: list[str]) -> dict:
    """Remember this run's digests, except for failed keywords, so that the next run tries them again."""
    old = retrain.load_state(Path(state))
    new = {"raw": {**old["raw"], **{s: d for s, d in raw.items() if s not in failed}},
           "curated": {**old["curated"], **{s: d for s, d in curated.items() if s not in failed}}}
    retrain.save_state(Path(state), new)
    return {"state": state, "kept_for_next_run": sorted(failed)}
