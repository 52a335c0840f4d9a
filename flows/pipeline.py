"""The flows: curate, train (a run per keyword, on threads or on a work pool), evaluate, and the scheduled
retrain with its promotion gate. Flows only orchestrate; the work is in flows/tasks.py, which calls tipsen/.

Paths default to the DVC layout (dvc.yaml) and are relative to the project root, where flows are served from
and where a work pool's workers run (their working directory is the deployment's source).
"""
from __future__ import annotations

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows import hooks, tasks
from tipsen import paths

RAW, CURATED, LORAS, METRICS, REPORTS = map(str, (paths.RAW, paths.CURATED, paths.LORAS, paths.METRICS, paths.REPORTS))
CANDIDATES = str(paths.CANDIDATES)  # retrain's candidates: loras/<slug>, bank.json, metrics/train/<slug>/ (the training log)
PARAMS = str(paths.PARAMS)
# JSON results; a failed or crashed run is recorded and announced (flows/hooks.py)
FLOW = dict(persist_result=True, result_serializer="json", on_failure=[hooks.record_failure],
            on_crashed=[hooks.record_failure])


@flow(name="curate", **FLOW)
def curate_flow(raw: str = RAW, out: str = CURATED, params_file: str = PARAMS, profile: str | None = None,
                metrics: str | None = METRICS) -> dict:
    """Curate a raw KS-KEIT export into the training set (the DVC stage `curate`)."""
    params = tasks.config(params_file, profile)
    return tasks.configured(tasks.curate_data, params.flows)(params, raw, out, metrics)


@flow(name="train-keyword", **FLOW)
def train_keyword_flow(slug: str, data: str = CURATED, loras: str = LORAS, params_file: str = PARAMS,
                       profile: str | None = None, metrics: str | None = METRICS) -> dict:
    """One keyword's training as a flow run of its own: what a work pool's worker runs for train_flow."""
    params = tasks.config(params_file, profile)
    return tasks.configured(tasks.train_keyword, params.flows)(params, slug, data, f"{loras}/{slug}", metrics)


@flow(name="train", **FLOW)
def train_flow(keywords: list[str] | None = None, data: str = CURATED, loras: str = LORAS, bank: str | None = None,
               params_file: str = PARAMS, profile: str | None = None, metrics: str | None = METRICS,
               dvc_root: str | None = ".") -> dict:
    """Train each keyword's LoRA (flows.train_concurrency at once; one flow run per keyword on flows.work_pool when
    set), then index the adapters into `bank` (default: beside `loras`). A failing keyword never stops the others.
    In a DVC project (`dvc_root`), the new adapters and bank are recorded in dvc.lock and what is stale after the
    bank reruns, as retrain does, so `dvc status` stays clean; None: no DVC bookkeeping (retrain's candidates)."""
    params = tasks.config(params_file, profile)
    slugs, pool = tasks.keywords(params, keywords), params.flows.work_pool
    train, n = tasks.configured(tasks.train_keyword, params.flows), min(params.flows.train_concurrency, len(slugs))
    # Pool runs only wait, so threads. Concurrent local training needs processes: loading a diffusers pipeline is
    # not thread-safe (its meta-device init is process-global); one keyword at a time runs in this process.
    with (ThreadPoolTaskRunner(max_workers=n) if pool or n == 1 else ProcessPoolTaskRunner(max_workers=n)) as runner:
        if pool:
            futures = {s: runner.submit(tasks.train_on_pool, {
                "deployment": f"{train_keyword_flow.name}/{pool}", "slug": s,
                "parameters": dict(slug=s, data=data, loras=loras, params_file=params_file, profile=profile,
                                   metrics=metrics)}) for s in slugs}
        else:
            futures = {s: runner.submit(train, dict(params=params, slug=s, data=data, out=f"{loras}/{s}",
                                                    metrics=metrics)) for s in slugs}
        report = tasks.train_report(futures)
    bank = bank or str(paths.bank_beside(loras))
    report["bank"] = tasks.index_bank(params, loras, bank)
    tasks.training_artifact(report)
    if dvc_root and report["trained"]:
        report["lineage"] = tasks.record_lineage(dvc_root, [f"{loras}/{s}" for s in report["trained"]] + [bank], bank)
    return report


@flow(name="evaluate", **FLOW)
def evaluate_flow(curated: str = CURATED, bank: str | None = None, keywords: list[str] | None = None,
                  params_file: str = PARAMS, profile: str | None = None, metrics: str = METRICS,
                  reports: str = REPORTS) -> dict:
    """The paper's evaluation table for the bank (the DVC stage `evaluate`)."""
    params = tasks.config(params_file, profile)
    evaluate = tasks.configured(tasks.evaluate_bank, params.flows)
    return evaluate(params, curated, bank or str(paths.BANK), metrics, reports, keywords)


@flow(name="retrain", **FLOW)
def retrain_flow(raw: str = RAW, curated: str = CURATED, loras: str = LORAS, bank: str | None = None,
                 candidates: str = CANDIDATES, state: str = str(paths.STATE), params_file: str = PARAMS,
                 profile: str | None = None, metrics: str | None = METRICS, dvc_root: str | None = ".") -> dict:
    """Retrain the keywords that new raw items changed, promote a candidate only if its held-out alignment is not
    worse than the live adapter's by more than flows.promotion_margin (one bank swap), and record it in dvc.lock."""
    params = tasks.config(params_file, profile)
    bank = bank or str(paths.BANK)
    raw_changes = tasks.detect_raw_changes(params, raw, state)
    if not raw_changes["changed"]:
        return {"changed_raw": [], "note": "no new or changed raw items since the last run"}
    curate = tasks.configured(tasks.curate_data, params.flows)
    report = {"changed_raw": raw_changes["changed"], "curate": curate(params, raw, curated, metrics)}
    data = tasks.outdated_adapters(params, curated, loras, state)
    report.update(changed_curated=data["changed"], outdated=data["outdated"])
    failed, promoted = [], []
    if data["outdated"]:
        report["train"] = trained = train_flow(
            keywords=list(data["outdated"]), data=curated, loras=f"{candidates}/loras", bank=f"{candidates}/bank.json",
            params_file=params_file, profile=profile, metrics=f"{candidates}/metrics", dvc_root=None)
        failed = list(trained["failed"])
        ready = [*trained["trained"], *trained["skipped_unchanged"]]
        scores = tasks.gate_scores(params, ready, candidate_bank=f"{candidates}/bank.json", bank=bank,
                                   curated=curated)
        report["promotion"] = tasks.promote_adapters(params, scores, candidates=f"{candidates}/loras", loras=loras,
                                                     bank=bank, candidate_metrics=f"{candidates}/metrics",
                                                     metrics=metrics)
        promoted = report["promotion"]["promoted"]
        if promoted and params.flows.reload_urls:  # the services serving this bank swap the new adapters in
            report["reload"] = tasks.reload_services(params.flows, bank)
    if dvc_root:
        outputs = [raw, curated, *[f"{loras}/{s}" for s in data["changed"] if s not in failed]]
        report["lineage"] = tasks.record_lineage(dvc_root, outputs + ([bank] if promoted else []), bank)
    report["state"] = tasks.save_state(state, raw_changes["digests"], data["digests"], failed)
    return report
