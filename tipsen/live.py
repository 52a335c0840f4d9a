"""Training and evaluation logs as DVC users read them: dvclive folders that `dvc plots` and `dvc exp show` use.

Each folder is a dvclive `Live` directory: `metrics.json` (the summary, a `dvc metrics` file), `plots/metrics/*.tsv`
(one row per step), `plots/images/` and `plots/custom/*.json`. dvc.yaml declares those files itself, so dvclive
writes no dvc.yaml of its own and saves no experiment of its own (`dvc exp run` records them).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from tipsen.errors import require

log = logging.getLogger(__name__)


def open_live(folder: str | Path, *, what: str):
    """A fresh dvclive logger writing into `folder`; what was logged there before is removed (dvclive's own rule)."""
    require("dvclive", "dvc", what=what)
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    class _Live(Live):
        def _init_dvc(self):
            try:
                super()._init_dvc()
            except SCMError as exc:  # dvclive reads HEAD, and `dvc repro` before the first commit has none
                log.debug("dvclive: no git revision (%s); logging without experiment tracking", exc)
                self._dvc_repo = None

    logging.getLogger("dvclive").setLevel(logging.WARNING)  # "Logging to experiment ..." on every run otherwise
    return _Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)


def log_step(live, step: int, **values: float) -> None:
    """One step's values as row `step` of each metric's TSV, then the summary (dvclive's `next_step`)."""
    live.step = step
    for name, value in values.items():
        live.log_metric(name, value)
    live.next_step()


def read_metric(folder: str | Path, name: str) -> list[tuple[int, float]]:
    """A metric's history from a dvclive folder, as (step, value) rows."""
    path = Path(folder) / "plots" / "metrics" / f"{name}.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(f, delimiter="\t")]
