"""Scheduled retraining, minus the scheduler: what changed since the last run, whether an adapter is current,
the promotion gate, the atomic bank swap, and recording the result in dvc.lock.

Every function here is plain Python over files; `flows/` only orchestrates them. The state of the last run
lives in `models/.retrain_state.json`; every gate decision is appended to `promotions.jsonl` beside the bank.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tipsen import paths
from tipsen import train_data as td
from tipsen.bank import WEIGHTS_NAME, Bank, adapter_metadata, build_bank
from tipsen.config import API_KEY_ENV, Params
from tipsen.errors import ConfigError, require
from tipsen.io import publish_dir, sha256_file, sha256_json, write_json_atomic
from tipsen.registry import Registry

log = logging.getLogger(__name__)

HISTORY_NAME = "promotions.jsonl"


# ---------------------------------------------------------------- what changed


def raw_digests(raw: Path, registry: Registry) -> dict[str, str]:
    """One digest per keyword over its items.jsonl records and image bytes: an added, edited or removed item
    changes it. Lines curation would reject (bad JSON, unknown keyword) are curation's business and ignored."""
    raw, rows = Path(raw), {}
    for line in (raw / "items.jsonl").read_bytes().splitlines():
        try:
            item = json.loads(line)
            kw = registry.resolve(item["keyword"]) if isinstance(item.get("keyword"), str) else None
        except (ValueError, TypeError):
            continue
        if kw is None:
            continue
        image = (raw / str(item.get("image", ""))).resolve()
        inside = image.is_relative_to(raw.resolve()) and image.is_file()  # never hash a file outside the export
        rows.setdefault(kw.slug, []).append([sha256_json(item), sha256_file(image) if inside else None])
    return {slug: sha256_json(sorted(r)) for slug, r in sorted(rows.items())}


def folder_digest(folder: Path) -> str | None:
    """Digest of every file's relative name and bytes under `folder`; None when it does not exist."""
    if not Path(folder).is_dir():
        return None
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return sha256_json([[p.relative_to(folder).as_posix(), sha256_file(p)] for p in files])


def changed(current: dict[str, str | None], previous: dict[str, str | None]) -> list[str]:
    """Keys whose digest differs from the previous run's: new, edited or removed."""
    return sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))


def load_state(path: Path = paths.STATE) -> dict:
    """The last run's digests ({"raw": {...}, "curated": {...}}); empty on the first run."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"raw": {}, "curated": {}}
    except json.JSONDecodeError as exc:  # our own file, so start over (every keyword is checked) rather than stop
        log.warning("%s is not valid JSON (%s); treating every keyword as changed", path, exc.msg)
        return {"raw": {}, "curated": {}}
    return {"raw": state.get("raw", {}), "curated": state.get("curated", {})}


def save_state(path: Path, state: dict) -> None:
    write_json_atomic(path, {**state, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def adapter_status(params: Params, slug: str, data: Path, adapter: Path) -> str | None:
    """None when the adapter in `adapter` was trained on the keyword's current data with these params (as its
    safetensors metadata records), else why it is out of date. Missing curated data raises ConfigError."""
    from tipsen.train import params_hash

    examples = td.load_examples(Path(data), slug, resolution=params.train.resolution,
                                prompt_source=params.train.prompt_source)
    weights = Path(adapter) / WEIGHTS_NAME
    if not weights.is_file():
        return "no adapter"
    meta = adapter_metadata(weights)
    if meta.get("params_hash") != params_hash(params):
        return "train params or base model changed"
    if meta.get("dataset_hash") != td.dataset_hash(examples):
        return "data changed"
    return None


# ---------------------------------------------------------------- the gate


@dataclass
class Decision:
    slug: str
    promote: bool
    candidate: float
    current: float | None
    margin: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(slug: str, candidate: float, current: float | None, margin: float, *,
           live_problem: str | None = None) -> Decision:
    """Promote unless the candidate's alignment is worse than the current adapter's by more than `margin`.

    A live adapter that cannot be used (`live_problem`: a missing file, a checksum or a refused index entry)
    loses by definition: the candidate replaces it, and the reason says why."""
    if current is None:
        why = "no current adapter" if live_problem in (None, "no adapter in the bank") else \
            f"the current adapter cannot be used ({live_problem}); the candidate replaces it"
        return Decision(slug, True, candidate, None, margin, why)
    ok = candidate >= current - margin  # False for a NaN score: a broken candidate is never promoted
    verdict = "within" if ok else "worse than"
    return Decision(slug, ok, candidate, current, margin, f"alignment {candidate:.4f} vs current {current:.4f}: "
                    f"{verdict} the margin {margin}")


def _live(bank: Path, slug: str) -> tuple[Bank | None, str | None]:
    try:
        index = Bank(bank)
    except ConfigError as exc:
        return None, str(exc)
    return index, index.reason(slug)


def unusable(bank: Path, slug: str) -> str | None:
    """Why the bank's adapter for `slug` cannot be scored (no index, no entry, a refused entry, a failed check)."""
    return _live(bank, slug)[1]


def score_key(bank: Path, curated: Path, slug: str) -> str | None:
    """What a keyword's score depends on besides params: its adapter's sha256 and its curated folder.
    None when the bank's adapter for it cannot be used (there is then nothing to score)."""
    index, problem = _live(bank, slug)
    return None if problem else sha256_json([index.entries[slug].sha256, folder_digest(Path(curated) / slug)])


def score(params: Params, slug: str, *, bank: Path, curated: Path) -> float:
    """The keyword's CLIP image alignment with the bank's adapter on its held-out real images (tipsen.evaluate)."""
    from tipsen.evaluate import keyword_alignment

    return float(keyword_alignment(params, slug, bank=Path(bank), curated=Path(curated)))


def promote(decisions: list[Decision], *, candidates: Path, loras: Path, bank: Path, keywords: list[str],
            registry: Registry, base_model: str, candidate_metrics: Path | None = None,
            metrics: Path | None = None) -> dict:
    """Install the promoted candidates (`candidates/<slug>`) under `loras`, then swap the bank index in one
    os.replace. Refused candidates stay in `candidates`; the live adapters and the bank are untouched for them.
    Every decision is appended to promotions.jsonl beside the bank."""
    bank, promoted = Path(bank), [d.slug for d in decisions if d.promote]
    for slug in promoted:
        src = Path(candidates) / slug
        with publish_dir(Path(loras) / slug) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        shutil.rmtree(src)
        log_dir = Path(candidate_metrics or "") / "train" / slug
        if candidate_metrics and metrics and log_dir.is_dir():  # the training log travels with its adapter
            with publish_dir(Path(metrics) / "train" / slug) as tmp:
                shutil.copytree(log_dir, tmp, dirs_exist_ok=True)
            shutil.rmtree(log_dir)
    if promoted:  # the whole index is rewritten in one rename: a reader sees the old bank or the new
        build_bank(Path(loras), bank, keywords=keywords, registry=registry, base_model=base_model)
    with open(bank.parent / HISTORY_NAME, "a", encoding="utf-8") as f:
        for d in decisions:
            f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **d.as_dict()}) + "\n")
    for d in decisions:
        log.info("%s %s: %s", "promoted" if d.promote else "kept the current adapter of", d.slug, d.reason)
    return {"promoted": promoted, "refused": {d.slug: d.reason for d in decisions if not d.promote},
            "bank": str(bank), "bank_sha256": sha256_file(bank) if bank.is_file() else None}


# ---------------------------------------------------------------- reloading the services


def reload_service(url: str, *, timeout_s: float = 120.0) -> dict:
    """POST `url`/bank/reload: the service re-reads its bank index and swaps the new adapters in between two
    batches. Sends TIPSEN_API_KEY as the bearer key when it is set. Returns the service's answer (the bank version
    now serving, what changed); raises ReloadError on any other answer (a 409 too: a reload is running there)."""
    import httpx

    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.post(url.rstrip("/") + "/bank/reload", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ReloadError(f"{url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        try:
            why = response.json().get("error") or response.text
        except ValueError:
            why = response.text
        raise ReloadError(f"{url}: HTTP {response.status_code}: {str(why)[:300]}")
    return response.json()


class ReloadError(RuntimeError):
    """A service did not reload its bank (unreachable, refused, or busy with another reload)."""


def record_reloads(bank: Path, outcomes: dict[str, dict]) -> None:
    """Append each service's reload outcome (its answer, or the error after the last retry) to promotions.jsonl."""
    with open(Path(bank).parent / HISTORY_NAME, "a", encoding="utf-8") as f:
        for url, outcome in outcomes.items():
            f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reload": url, **outcome}) + "\n")


# ---------------------------------------------------------------- lineage


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def record_lineage(root: Path, outputs: list[Path], *, downstream_of: Path | None = None) -> dict:
    """Record in dvc.lock the outputs this run wrote (`dvc commit` of the stages owning them), then rerun what is
    stale downstream of `downstream_of` (`dvc repro --downstream`, e.g. an evaluate stage after the bank)."""
    require("dvc", "dvc", what="recording the retrained outputs in dvc.lock")
    from dvc.exceptions import NoOutputOrStageError
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    def owner(repo, path: Path) -> str | None:
        """The stage writing `path`, addressed from `root` ("bank", "train@x", "data.dvc")."""
        try:
            stage = repo.stage.collect_granular(str(Path(path).resolve()))[0].stage
        except NoOutputOrStageError:
            return None
        file = os.path.relpath(stage.path, root)
        return (stage.name if file == "dvc.yaml" else f"{file}:{stage.name}") \
            if isinstance(stage, PipelineStage) else file

    with Repo(str(root)) as repo:  # closed before the subprocesses take the repo lock
        stages = {str(p): owner(repo, p) for p in outputs}
        tail = owner(repo, downstream_of) if downstream_of else None
    untracked = [p for p, s in stages.items() if s is None]
    committed = sorted({s for s in stages.values() if s})
    if untracked:
        log.warning("not DVC outputs, so not recorded: %s", ", ".join(untracked))
    if committed:
        _dvc(root, "commit", "--force", "--quiet", *committed)
    if tail:
        _dvc(root, "repro", "--downstream", tail)
    status = json.loads(_dvc(root, "status", "--json") or "{}")
    if status:
        log.warning("dvc status is not clean after recording (stale for other reasons): %s", status)
    return {"committed": committed, "reproduced_downstream_of": tail, "untracked": untracked, "dvc_status": status}
