"""Shared fixtures. Tiny models are built once into the project's .cache (or $TIPSEN_HOME) and reused."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TIPSEN_HOME", str(ROOT / ".cache" / "tipsen"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# One BLAS/OpenMP thread per process: tests start servers and workers side by side on a small machine, and
# oversubscribed threads make them many times slower. Speed is measured by the benchmarks, not here.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def registry():
    from tipsen.registry import Registry

    return Registry.load()


@pytest.fixture(scope="session")
def demo_params():
    """The repository's demo profile, as shipped."""
    from tipsen.config import load_params

    return load_params(ROOT / "params.yaml", profile="demo")


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory, registry) -> Path:
    """A fresh demo export (read-only for tests: copy it before changing anything)."""
    from tipsen.demodata import demo_data

    out = tmp_path_factory.mktemp("raw") / "raw"
    demo_data(out, registry=registry)
    return out


@pytest.fixture()
def raw_copy(demo_raw, tmp_path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(demo_raw, dst)
    return dst
