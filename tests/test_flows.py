"""Prefect flows against a real temporary Prefect API (SQLite), on the demo profile with 2 keywords and 4 steps.

The flows run the real tipsen stages on tiny models. Three failures are injected because they cannot be produced
naturally here (a transient OSError, a training step that never returns, and scores that order two tiny random
adapters); each says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tipsen import testing
from tipsen.live import read_metric

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = ["gimjang", "sebae"]
MISSING = "hanbok"  # a registry keyword with no curated data: its training must fail alone


# ---------------------------------------------------------------- helpers


def write_params(path: Path, **flows) -> Path:
    """The project's demo profile, shrunk: 2 keywords, 4 training steps, 2-step sampling, a 2-method eval."""
    return testing.write_params(path, {
        "curate": {"per_keyword": 50, "workers": 1},  # keep every usable item, so new items always change data
        "train": {"steps": 4, "log_every": 2, "checkpoint_every": 2, "validation_seeds": []},
        "generate": {"steps": 2},
        "eval": {"images_per_keyword": 2, "real_images": 2, "bootstrap": 20, "grid_keywords": 2, "methods": [
            {"name": "SDXL (tiny)", "base": "tiny:sdxl", "steps": 2},
            {"name": "SDXL+LoRA (tiny)", "base": "tiny:sdxl", "lora": True, "steps": 2}]},
        "flows": {"retry_delay_s": 0, "train_concurrency": 2, "failed_runs": str(path.parent / "failed_runs.jsonl"),
                  **flows},
    }, keywords=KEYWORDS)


def export(src: Path, dst: Path, slugs: list[str]) -> Path:
    """A raw export holding only `slugs`' items (the demo export has all 30 keywords)."""
    from tipsen.registry import Registry

    registry, lines = Registry.load(), []
    for line in (src / "items.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        kw = registry.resolve(item["keyword"])
        if kw and kw.slug in slugs:
            lines.append(line)
            if (src / item["image"]).is_file():
                (dst / item["image"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / item["image"], dst / item["image"])
    (dst / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def add_items(raw: Path, slug: str, n: int = 3, seed: int = 99) -> None:
    """New crawl items for one keyword: fresh images of its motif, appended to items.jsonl."""
    from tipsen.demodata import motif
    from tipsen.registry import Registry

    index = [k.slug for k in Registry.load()].index(slug)
    rng = np.random.default_rng([seed, index])
    with open(raw / "items.jsonl", "a", encoding="utf-8") as f:
        for j in range(n):
            rel = f"images/{slug}/new-{seed}-{j}.png"
            (raw / rel).parent.mkdir(parents=True, exist_ok=True)
            motif(index, rng, int(rng.integers(128, 256)), int(rng.integers(128, 256))).save(raw / rel)
            item = {"id": f"new-{seed}-{slug}-{j}", "keyword": slug, "image": rel, "text": "새 기사 사진",
                    "source": "senior-news/article/new", "collected_at": "2025-01-01"}
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def bank_shas(bank: Path) -> dict[str, str]:
    return {e["slug"]: e["sha256"] for e in json.loads(Path(bank).read_text())["adapters"]}


def logs_of(flow_run_id) -> list[str]:
    """Every log message of a flow run and its task runs, read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def task_runs_of(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API on SQLite, with results and caches in a temporary home."""
    from prefect.settings import (PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_ANALYTICS_ENABLED,
                                  temporary_settings)
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage",
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=300):
            yield home


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_raw, prefect_api):
    """A 2-keyword project: raw export and params; curate_flow and train_flow run on it once."""
    ws = tmp_path_factory.mktemp("flows")
    export(demo_raw, ws / "raw", KEYWORDS)
    write_params(ws / "params.yaml")
    return ws  # every path is passed absolute: nothing lands in the repository


@pytest.fixture(scope="module")
def curated(workspace):
    from flows.pipeline import curate_flow

    return curate_flow(raw=str(workspace / "raw"), out=str(workspace / "curated"),
                       params_file=str(workspace / "params.yaml"), metrics=str(workspace / "metrics"))


@pytest.fixture(scope="module")
def trained(workspace, curated):
    """train_flow over the 2 keywords plus one without data; returns (report, flow run id)."""
    from flows.pipeline import train_flow

    state = train_flow(keywords=[*KEYWORDS, MISSING], data=str(workspace / "curated"), dvc_root=None,
                       loras=str(workspace / "models" / "loras"), params_file=str(workspace / "params.yaml"),
                       metrics=str(workspace / "metrics"), return_state=True)
    return state.result(), state.state_details.flow_run_id


def _copy(ws: Path, dst: Path) -> Path:
    for name in ("raw", "curated", "models", "params.yaml"):
        (shutil.copytree if (ws / name).is_dir() else shutil.copy2)(ws / name, dst / name)
    return dst


# ---------------------------------------------------------------- flows


def test_curate_flow_writes_the_training_set(workspace, curated):
    assert curated["kept_per_keyword"].keys() >= set(KEYWORDS)
    for slug in KEYWORDS:
        assert curated["kept_per_keyword"][slug] >= 10
        rows = (workspace / "curated" / slug / "metadata.jsonl").read_text().splitlines()
        assert len(rows) == curated["kept_per_keyword"][slug]
    assert json.loads((workspace / "metrics" / "curate.json").read_text())["kept"] == curated["kept"]


def test_train_flow_trains_each_keyword_and_reports_the_failing_one(workspace, trained):
    report, flow_run_id = trained
    assert sorted(report["trained"]) == KEYWORDS and report["skipped_unchanged"] == []
    assert list(report["failed"]) == [MISSING]
    assert "ConfigError" in report["failed"][MISSING] and "metadata.jsonl not found" in report["failed"][MISSING]
    for slug in KEYWORDS:
        run = report["runs"][slug]
        assert run["status"] == "trained" and run["steps"] == 4 and run["attempts"] == 1
        assert (workspace / "models" / "loras" / slug / "pytorch_lora_weights.safetensors").is_file()
        assert [step for step, _ in read_metric(workspace / "metrics" / "train" / slug, "loss")] == [1, 2, 3, 4]
    assert sorted(bank_shas(workspace / "models" / "bank.json")) == KEYWORDS
    assert report["bank"]["adapters"] == KEYWORDS
    # A ConfigError is never retried: one attempt, failed.
    runs = task_runs_of(flow_run_id)
    assert runs[f"train-{MISSING}"].state.is_failed() and runs[f"train-{MISSING}"].run_count == 1
    # Progress: step and loss every train.log_every (2) steps, in the task logs.
    logs = logs_of(flow_run_id)
    for slug in KEYWORDS:
        assert any(m.startswith(f"{slug} step 2/4 loss ") for m in logs)
        assert any(m.startswith(f"{slug} step 4/4 loss ") for m in logs)


def test_train_flow_skips_unchanged_adapters(workspace, trained):
    from flows.pipeline import train_flow

    weights = workspace / "models" / "loras" / KEYWORDS[0] / "pytorch_lora_weights.safetensors"
    before = sha(weights)
    report = train_flow(keywords=KEYWORDS[:1], data=str(workspace / "curated"), dvc_root=None,
                        loras=str(workspace / "models" / "loras"), params_file=str(workspace / "params.yaml"),
                        metrics=str(workspace / "metrics"))
    assert report["trained"] == [] and report["skipped_unchanged"] == KEYWORDS[:1] and report["failed"] == {}
    assert sha(weights) == before


def test_transient_error_is_retried_and_config_error_is_not(workspace, curated, tmp_path, monkeypatch):
    import tipsen.train
    from flows.pipeline import train_keyword_flow
    from tipsen.errors import ConfigError

    real, calls = tipsen.train.train, {}

    # Injected: a transient I/O failure (a full disk, a dropped NFS mount) cannot be produced on demand here.
    def flaky(params, slug, *args, **kwargs):
        calls[slug] = calls.get(slug, 0) + 1
        if slug == KEYWORDS[0] and calls[slug] == 1:
            raise OSError("No space left on device")
        if slug == KEYWORDS[1]:
            raise ConfigError("train.rank: 0 is too small")
        return real(params, slug, *args, **kwargs)

    monkeypatch.setattr(tipsen.train, "train", flaky)
    # The per-keyword flow (what a pool worker runs) runs its task in this process, where the injection lives.
    kw = dict(data=str(workspace / "curated"), loras=str(tmp_path / "loras"),
              params_file=str(workspace / "params.yaml"), metrics=None)
    run = train_keyword_flow(KEYWORDS[0], **kw)
    assert run["status"] == "trained" and run["attempts"] == 2 and calls[KEYWORDS[0]] == 2
    assert (tmp_path / "loras" / KEYWORDS[0] / "pytorch_lora_weights.safetensors").is_file()
    state = train_keyword_flow(KEYWORDS[1], **kw, return_state=True)
    assert state.is_failed() and calls[KEYWORDS[1]] == 1 and "train.rank: 0 is too small" in state.message


def test_evaluate_flow_scores_the_bank(workspace, trained):
    from flows.pipeline import evaluate_flow

    result = evaluate_flow(curated=str(workspace / "curated"), bank=str(workspace / "models" / "bank.json"),
                           params_file=str(workspace / "params.yaml"), metrics=str(workspace / "metrics"),
                           reports=str(workspace / "reports"))
    assert sorted(result["keywords"]) == KEYWORDS
    assert all(m["status"] == "ok" for m in result["methods"].values())
    assert json.loads((workspace / "reports" / "eval.json").read_text())["methods"] == result["methods"]
    assert set(json.loads((workspace / "metrics" / "eval" / "metrics.json").read_text())) == set(result["methods"])
    assert (workspace / "reports" / "eval_table.md").is_file()


def artifact(key: str, flow_run_id):
    """The artifact `key` that the flow run (or one of its task runs) published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return found


def test_training_and_evaluation_are_artifacts_in_the_ui(workspace, trained):
    from flows.pipeline import evaluate_flow

    summary = artifact("training-summary", trained[1])
    assert summary.type == "markdown" and summary.data.startswith("| keyword | status | steps | final loss |")
    for slug in KEYWORDS:
        assert f"| {slug} | " in summary.data
    assert f"| {MISSING} | failed | | | | ConfigError: " in summary.data
    state = evaluate_flow(curated=str(workspace / "curated"), bank=str(workspace / "models" / "bank.json"),
                          params_file=str(workspace / "params.yaml"), metrics=str(workspace / "metrics"),
                          reports=str(workspace / "reports"), return_state=True)
    run = state.state_details.flow_run_id
    table = artifact("evaluation-table", run)
    assert table.type == "markdown" and table.data == (workspace / "reports" / "eval_table.md").read_text()
    scores = artifact("per-keyword-scores", run)
    rows = json.loads(scores.data) if isinstance(scores.data, str) else scores.data
    assert scores.type == "table" and {r["keyword"] for r in rows} == set(KEYWORDS)
    assert {r["method"] for r in rows} == {"SDXL (tiny)", "SDXL+LoRA (tiny)"}


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_run_is_recorded_and_announced_through_a_webhook_block(workspace, tmp_path):
    """A real Prefect Webhook block, saved in the test API, calling an HTTP server on 127.0.0.1."""
    import socket

    from prefect.blocks.webhook import Webhook

    from flows.pipeline import train_keyword_flow

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.calls = []
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        Webhook(url=f"http://127.0.0.1:{server.server_address[1]}/hook", allow_private_urls=True).save(
            "tipsen-test-hook", overwrite=True)
        params = write_params(tmp_path / "params.yaml", notify_block="tipsen-test-hook")
        state = train_keyword_flow(MISSING, data=str(workspace / "curated"), loras=str(tmp_path / "loras"),
                                   params_file=str(params), metrics=None, return_state=True)
    finally:
        server.shutdown()
        server.server_close()
    assert state.is_failed()
    (record,) = [json.loads(line) for line in (tmp_path / "failed_runs.jsonl").read_text().splitlines()]
    assert (record["flow"], record["state"], record["parameters"]) == ("train-keyword", "Failed", {"slug": MISSING})
    assert "metadata.jsonl not found" in record["message"] and str(tmp_path) not in json.dumps(record["parameters"])
    assert server.calls == [record]  # announced, with the same record
    with socket.socket() as s:  # a webhook that cannot be reached: logged, and the failure is still recorded
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    Webhook(url=f"http://127.0.0.1:{dead}/hook", allow_private_urls=True).save("tipsen-test-hook", overwrite=True)
    again = train_keyword_flow(MISSING, data=str(workspace / "curated"), loras=str(tmp_path / "loras"),
                               params_file=str(params), metrics=None, return_state=True)
    assert again.is_failed() and len((tmp_path / "failed_runs.jsonl").read_text().splitlines()) == 2
    assert any(m.startswith("could not notify through the webhook block 'tipsen-test-hook': ConnectError")
               for m in logs_of(again.state_details.flow_run_id))  # in the run's own log, in the UI


def test_a_hung_training_step_times_out(workspace, curated, tmp_path, monkeypatch):
    import tipsen.train
    from flows.pipeline import train_keyword_flow

    # Injected: training that never finishes (a stalled data loader, a wedged device) cannot be produced on demand.
    # Like a training loop it runs step after step, where Prefect's timeout can stop it (a single blocking call in
    # a worker thread would only be failed once it returned).
    def stalled(*args, **kwargs):
        for _ in range(6000):
            time.sleep(0.1)

    monkeypatch.setattr(tipsen.train, "train", stalled)
    params = write_params(tmp_path / "params.yaml", train_timeout_s=1, retries=0)
    state = train_keyword_flow(KEYWORDS[0], data=str(workspace / "curated"), loras=str(tmp_path / "loras"),
                               params_file=str(params), metrics=None, return_state=True)
    assert state.is_failed() and "timed out" in state.message.lower(), state.message


def test_results_are_persisted_as_json(prefect_api, trained):
    files = [p for p in (prefect_api / "storage").rglob("*") if p.is_file()]
    assert files
    for f in files:
        record = json.loads(f.read_bytes())  # a pickle would not parse
        if isinstance(record, dict) and "metadata" in record:  # task results and cache entries (flows: bare JSON)
            assert record["metadata"]["serializer"]["type"] == "json"


def test_retrain_refuses_a_worse_candidate_and_keeps_the_live_adapter(workspace, trained, tmp_path, monkeypatch):
    import tipsen.evaluate
    from flows.pipeline import retrain_flow

    ws = _copy(workspace, tmp_path)
    write_params(ws / "params.yaml", promotion_margin=0.0)  # no drop allowed
    add_items(ws / "raw", KEYWORDS[0])
    live = ws / "models" / "loras" / KEYWORDS[0] / "pytorch_lora_weights.safetensors"
    before, bank_before = sha(live), sha(ws / "models" / "bank.json")

    # Injected scores: tiny random CLIP models rank two adapters arbitrarily, so no real candidate is reliably
    # worse. Everything else (curation, candidate training, candidate bank, gate, bank) is real.
    def alignment(params, slug, *, bank, curated, **kwargs):
        return 0.40 if "candidates" in str(bank) else 0.50

    monkeypatch.setattr(tipsen.evaluate, "keyword_alignment", alignment)
    kw = dict(raw=str(ws / "raw"), curated=str(ws / "curated"), loras=str(ws / "models" / "loras"),
              bank=str(ws / "models" / "bank.json"), candidates=str(ws / "models" / "candidates"),
              state=str(ws / "models" / ".retrain_state.json"), params_file=str(ws / "params.yaml"),
              metrics=str(ws / "metrics"), dvc_root=None)
    report = retrain_flow(**kw)
    assert report["outdated"] == {KEYWORDS[0]: "data changed"}  # the other keyword's adapter is current
    assert report["train"]["trained"] == [KEYWORDS[0]]
    decision, = report["promotion"]["decisions"]
    assert decision["promote"] is False and decision["candidate"] == 0.40 and decision["current"] == 0.50
    assert report["promotion"]["refused"][KEYWORDS[0]].endswith("worse than the margin 0.0")
    assert sha(live) == before and sha(ws / "models" / "bank.json") == bank_before
    assert (ws / "models" / "candidates" / "loras" / KEYWORDS[0] / "pytorch_lora_weights.safetensors").is_file()
    history = [json.loads(line) for line in (ws / "models" / "promotions.jsonl").read_text().splitlines()]
    assert [(h["slug"], h["promote"]) for h in history] == [(KEYWORDS[0], False)]
    # Nothing new since: the next run stops after looking at the raw export.
    assert retrain_flow(**kw)["changed_raw"] == []


@pytest.mark.slow
def test_retrain_promotes_and_leaves_dvc_status_clean(demo_raw, prefect_api, tmp_path):
    """A git+DVC project built by `dvc repro`; new items for one keyword; retrain_flow; `dvc status` is clean."""
    import yaml

    from flows.pipeline import retrain_flow, train_flow

    repo, dvc = dvc_project(tmp_path / "repo", demo_raw, promotion_margin=1.0)  # any candidate passes the gate
    before = bank_shas(repo / "models" / "bank.json")

    add_items(repo / "data" / "raw", KEYWORDS[0])
    at = {k: str(repo / v) for k, v in dict(  # the flow's defaults (dvc.yaml's layout), rooted in the repo
        raw="data/raw", curated="data/curated", loras="models/loras", bank="models/bank.json",
        candidates="models/candidates", state="models/.retrain_state.json", params_file="params.yaml",
        metrics="metrics").items()}
    report = retrain_flow(**at, dvc_root=str(repo))
    assert report["changed_raw"] == KEYWORDS  # first run: no state yet
    assert list(report["outdated"]) == [KEYWORDS[0]]
    assert report["promotion"]["promoted"] == [KEYWORDS[0]]
    after = bank_shas(repo / "models" / "bank.json")
    assert after[KEYWORDS[0]] != before[KEYWORDS[0]] and after[KEYWORDS[1]] == before[KEYWORDS[1]]
    assert "train@" + KEYWORDS[0] in report["lineage"]["committed"]
    assert json.loads(dvc("status", "--json")) == {}

    # train/local the same way: a training setting changes, the flow retrains both keywords, and DVC knows
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profiles"][params["profile"]]["train"]["steps"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    assert set(json.loads(dvc("status", "--json"))) >= {f"train@{s}" for s in KEYWORDS}
    trained = train_flow(keywords=KEYWORDS, **{k: at[k] for k in ("loras", "bank", "params_file", "metrics")},
                         data=at["curated"], dvc_root=str(repo))
    assert sorted(trained["trained"]) == KEYWORDS and trained["failed"] == {}
    assert {f"train@{s}" for s in KEYWORDS} | {"bank"} <= set(trained["lineage"]["committed"])
    assert json.loads(dvc("status", "--json")) == {}


def dvc_project(repo: Path, demo_raw: Path, **flows):
    """A git+DVC copy of the project on 2 keywords, built by `dvc repro`: (its folder, a `dvc` runner)."""
    (repo / "data").mkdir(parents=True)
    for name in ("dvc.yaml", "data.dvc", "data/keywords.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "tipsen", repo / "tipsen", ignore=shutil.ignore_patterns("__pycache__"))  # stage deps
    write_params(repo / "params.yaml", **flows)
    export(demo_raw, repo / "data" / "raw", KEYWORDS)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}
    dvc = lambda *a, cwd=repo: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "dvc", *a], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    dvc("commit", "-q", "-f", "data.dvc")  # this export is the tracked raw data
    dvc("repro", "-q")
    assert json.loads(dvc("status", "--json")) == {}
    return repo, dvc


@pytest.mark.slow
def test_results_are_versioned_the_dvc_way(demo_raw, tmp_path):
    """dvc.lock and the uncached metrics are git's: an experiment shows its evaluation metrics in `dvc exp show`,
    and a clone plus `dvc pull` is clean."""
    repo, dvc = dvc_project(tmp_path / "repo", demo_raw)
    git = lambda *a, cwd=repo: subprocess.run(["git", *a], cwd=cwd, check=True, capture_output=True,  # noqa: E731
                                              text=True, env={**os.environ, "GIT_AUTHOR_NAME": "t",
                                                              "GIT_AUTHOR_EMAIL": "t@example.org",
                                                              "GIT_COMMITTER_NAME": "t",
                                                              "GIT_COMMITTER_EMAIL": "t@example.org"}).stdout
    dvc("remote", "add", "-d", "store", str(tmp_path / "store"))
    git("add", "-A")
    git("commit", "-q", "-m", "results")
    tracked = set(git("ls-files").split())
    logs = [f"metrics/train/{s}/{f}" for s in KEYWORDS for f in ("metrics.json", "plots/metrics/loss.tsv")]
    assert {"dvc.lock", "metrics/eval/metrics.json", "metrics/curate.json",
            "metrics/eval/plots/custom/per_keyword.json", *logs} <= tracked  # the dvclive logs are git's
    base = json.loads((repo / "metrics" / "eval" / "metrics.json").read_text())
    dvc("push", "-q")
    clone = tmp_path / "clone"  # a teammate's copy: git for the code, params, lock and metrics; DVC for the rest
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("pull", "-q", cwd=clone)
    assert json.loads(dvc("status", "--json", cwd=clone)) == {}

    dvc("exp", "run", "-q", "-n", "steps2", "-S", "profiles.demo.train.steps=2")
    shown = json.loads(dvc("exp", "show", "--json"))  # rows: the workspace, then the commit and its experiments
    (commit,) = [row for row in shown if row.get("experiments")]
    (exp,) = [e for group in commit["experiments"] for e in group["revs"] if e.get("name") == "steps2"]
    metrics = exp["data"]["metrics"]["metrics/eval/metrics.json"]["data"]
    assert set(metrics) == set(base)  # the experiment's own evaluation, not "!"
    assert all(isinstance(m.get("mean"), float) for m in metrics.values())
    assert exp["data"]["params"]["params.yaml"]["data"]["profiles"]["demo"]["train"]["steps"] == 2
    assert commit["data"]["metrics"]["metrics/eval/metrics.json"]["data"] == base  # the committed results
    trained = exp["data"]["metrics"][f"metrics/train/{KEYWORDS[0]}/metrics.json"]["data"]
    assert trained["step"] == 2 and isinstance(trained["loss"], float)  # the experiment's training log


def test_deployments_carry_the_retrain_schedule(workspace):
    from prefect.client.orchestration import get_client

    from flows.deploy import deployments
    from tipsen.config import load_params

    params = load_params(workspace / "params.yaml")
    deps = {d.flow_name: d for d in deployments(params)}
    assert set(deps) == {"curate", "train", "train-keyword", "evaluate", "retrain"}
    deployment_id = deps["retrain"].apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert [(s.schedule.cron, s.schedule.timezone) for s in stored.schedules] == \
        [(params.flows.retrain_cron, "Asia/Seoul")]  # 03:00 in Korea, not 03:00 UTC (noon in Korea)
    assert not deps["train"].schedules  # only retrain is scheduled


def test_a_schedule_time_zone_must_exist():
    from tipsen.config import parse_params
    from tipsen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"flows\.retrain_timezone: 'Seoul' is not a time zone; allowed: an IANA"):
        parse_params({"profile": "p", "keywords": ["gimjang"],
                      "profiles": {"p": {"flows": {"retrain_timezone": "Seoul"}}}})


# ---------------------------------------------------------------- a real work pool


@pytest.mark.slow
def test_work_pool_trains_keywords_in_separate_workers(workspace, curated, prefect_api, tmp_path):
    """Two `prefect worker start` processes on a process pool; train_flow submits one flow run per keyword."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import get_current_settings
    from prefect.workers.process import ProcessWorker

    from flows.pipeline import train_flow
    from flows.deploy import deploy_to_pool
    from tipsen.config import load_params

    pool = "tipsen-test-pool"
    params_file = write_params(tmp_path / "params.yaml", work_pool=pool)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
    deploy_to_pool(pool, load_params(params_file), source=ROOT)
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                 "process", "--limit", "1", "--name", f"worker-{i}"], env=env, cwd=tmp_path,
                                stdout=open(tmp_path / f"worker-{i}.log", "wb"), stderr=subprocess.STDOUT)
               for i in range(2)]
    try:
        with get_client(sync_client=True) as client:  # both workers polling before any run is submitted
            for _ in range(300):
                if len(client.read_workers_for_work_pool(pool)) == 2:
                    break
                time.sleep(1)
        report = train_flow(keywords=KEYWORDS, data=str(workspace / "curated"), loras=str(tmp_path / "loras"),
                            params_file=str(params_file), metrics=None, dvc_root=None)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=60)
    assert sorted(report["trained"]) == KEYWORDS, report
    parents = {report["runs"][s]["ppid"] for s in KEYWORDS}
    assert parents == {w.pid for w in workers}  # each keyword's flow run was a child of a different worker
    assert len({report["runs"][s]["pid"] for s in KEYWORDS} | {os.getpid()}) == 3
    assert sorted(bank_shas(tmp_path / "bank.json")) == KEYWORDS


@pytest.mark.slow
def test_a_promotion_reloads_the_serving_services(workspace, trained, tmp_path):
    """retrain_flow promotes a candidate, then asks each service in flows.reload_urls to reload its bank: a real
    `tipsen serve` on the workspace's bank swaps the new adapter in; a service that is down is retried, recorded as
    failed in promotions.jsonl, and fails nothing else."""
    import httpx

    from flows.pipeline import retrain_flow

    ws = tmp_path / "ws"
    ws.mkdir()
    _copy(workspace, ws)
    bank = ws / "models" / "bank.json"
    server = testing.Server(tmp_path, params=ws / "params.yaml", bank=bank)
    try:
        server.wait_ready()
        down = f"http://127.0.0.1:{testing.free_port()}"  # nothing listens there
        write_params(ws / "params.yaml", promotion_margin=1.0, reload_urls=[server.url, down], retries=1)
        add_items(ws / "raw", KEYWORDS[0])
        report = retrain_flow(raw=str(ws / "raw"), curated=str(ws / "curated"), loras=str(ws / "models" / "loras"),
                              bank=str(bank), candidates=str(ws / "models" / "candidates"),
                              state=str(ws / "models" / ".retrain_state.json"), params_file=str(ws / "params.yaml"),
                              metrics=str(ws / "metrics"), dvc_root=None)
        assert report["promotion"]["promoted"] == [KEYWORDS[0]]
        served, failed = report["reload"][server.url], report["reload"][down]
        assert served["ok"] and served["changed"] == [KEYWORDS[0]]
        assert not failed["ok"] and "ConnectError" in failed["error"]
        rows = {k["slug"]: k for k in httpx.get(f"{server.url}/keywords", timeout=60).json()["keywords"]}
        assert rows[KEYWORDS[0]]["sha256"] == bank_shas(bank)[KEYWORDS[0]]
        history = [json.loads(line) for line in (ws / "models" / "promotions.jsonl").read_text().splitlines()]
        reloads = {h["reload"]: h for h in history if "reload" in h}
        assert reloads[server.url]["version"] == served["version"] and reloads[down]["ok"] is False
    finally:
        server.stop()
