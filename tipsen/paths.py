"""The project layout, in one place: where each stage reads and writes by default (dvc.yaml uses the same paths).

Relative paths are relative to the project root, the folder holding params.yaml and dvc.yaml, which is where
DVC stages, Prefect workers and `tipsen` commands run.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source checkout
REGISTRY = ROOT / "data" / "keywords.yaml"
PARAMS = Path("params.yaml")

RAW = Path("data/raw")  # the KS-KEIT-V1 export, never modified
CURATED = Path("data/curated")  # KS-KEIT-V1.2: <slug>/metadata.jsonl and images
LORAS = Path("models/loras")  # <slug>/pytorch_lora_weights.safetensors
BANK = Path("models/bank.json")  # the index the generator and the service read
CANDIDATES = Path("models/candidates")  # the retrain flow's candidates: loras/, bank.json, metrics/
STATE = Path("models/.retrain_state.json")  # the retrain flow's digests of the last run
METRICS = Path("metrics")
REPORTS = Path("reports")


def checkpoint_dir(adapter: str | Path) -> Path:
    """Where training of the adapter folder `adapter` keeps its checkpoint: models/loras/x -> models/.checkpoints/x.

    Outside the adapter folder, because DVC deletes a stage's outputs before rerunning it."""
    adapter = Path(adapter)
    return adapter.parent.parent / ".checkpoints" / adapter.name


def bank_beside(loras: str | Path) -> Path:
    """The bank index beside an adapters folder: models/loras -> models/bank.json."""
    return Path(loras).parent / BANK.name


def in_project(path: str | Path) -> Path:
    """A relative path as given when it exists from here, else under the checkout (a service started elsewhere)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else ROOT / path
