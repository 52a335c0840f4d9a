"""Benchmark harness: warm-up, repetitions, paired A/B alternation, and JSON results with machine info."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "TIPSEN_BENCH_RESULTS"  # another folder for the JSON results (the smoke tests write to a temporary one)
PACKAGES = ["torch", "diffusers", "peft", "transformers", "open_clip_torch", "bentoml", "prefect", "dvc", "pillow"]


def machine_info() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=False).stdout.strip()
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def timeit(fn: Callable[[], Any], *, reps: int = 5, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return summarize(samples)


def paired(a: Callable[[], Any], b: Callable[[], Any], *, reps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time A and B alternately in one process so that machine drift cancels; ratio = median(A)/median(B)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(reps):
        for fn, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    sa, sb = summarize(ta), summarize(tb)
    return {"a": sa, "b": sb, "ratio_a_over_b": sa["median"] / sb["median"]}


def alternated(fns: dict[str, Callable[[], Any]], *, reps: int = 3, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time several callables in one process, in a rotating order each repetition so that drift and position
    favour none; a summary per name."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t)
    return {name: summarize(s) for name, s in samples.items()}


def write_result(name: str, data: dict[str, Any], *, params: dict[str, Any] | None = None) -> Path:
    from tipsen.io import write_json_atomic

    out = Path(os.environ.get(RESULTS_ENV) or RESULTS) / f"{name}.json"
    return write_json_atomic(out, {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "machine": machine_info(), "params": params or {}, "results": data})


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of dict rows (same keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
