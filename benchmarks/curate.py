"""Curation throughput: images/s on the demo export and on a generated >= 2,000-image export, scaling at
1x/2x/4x images, one vs two workers (paired), and the near-duplicate index against all-pairs comparison.

    .venv/bin/python -m benchmarks.curate [--smoke]
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import paired, summarize, table, timeit, write_result

SIZES = {"1x": 15, "2x": 32, "4x": 67}  # clean items per keyword: about 506, 999 and 2014 items in all
SMOKE_SIZES = {"1x": 2, "2x": 5}


def export(root: Path, per_keyword: int) -> tuple[Path, int]:
    from tipsen.demodata import demo_data
    from tipsen.registry import Registry

    raw = root / f"raw-{per_keyword}"
    return raw, demo_data(raw, registry=Registry.load(), per_keyword=per_keyword)["items"]


def run_curate(params, raw: Path, out: Path, **update) -> None:
    from tipsen.curate import curate

    curate(params.override("curate", update), raw, out, progress=False)


def fit(points: list[tuple[int, float]]) -> dict:
    import numpy as np

    x, y = np.array(points, dtype=float).T
    per_image, fixed = np.polyfit(x, y, 1)
    r2 = 1 - ((y - (fixed + per_image * x)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    return {"fixed_s": float(fixed), "per_image_ms": float(per_image * 1000), "r2": float(r2),
            "marginal_images_per_s": float(1 / per_image) if per_image > 0 else None}


def hash_index(n: int, threshold: int = 8, bits: int = 256) -> dict:
    """Seconds to dedup n hashes (a third of them near copies) with the index and with all pairs."""
    from tipsen.imaging import HashIndex

    rng = random.Random(0)
    hashes = []
    for _ in range(n):
        h = rng.choice(hashes) if hashes and rng.random() < 0.33 else rng.getrandbits(bits)
        for _ in range(rng.randint(0, threshold)):
            h ^= 1 << rng.randrange(bits)
        hashes.append(h)

    def indexed():
        index = HashIndex(threshold, bits=bits)
        for i, h in enumerate(hashes):
            if index.find(h) is None:
                index.add(h, str(i))

    def all_pairs():
        kept = []
        for h in hashes:
            if not any((h ^ k).bit_count() <= threshold for k in kept):
                kept.append(h)

    return {"n": n, "index_s": timeit(indexed, reps=3)["median"], "all_pairs_s": timeit(all_pairs, reps=1)["median"]}


def measure(params, raw: Path, out: Path, **update) -> tuple[float, float]:
    """Wall seconds, and this process's CPU seconds (all of it when workers=1: pool workers aren't counted)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run_curate(params, raw, out, **update)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, one repetition")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tipsen").setLevel(logging.ERROR)  # every generated export has a short keyword
    os.environ.setdefault("TIPSEN_HOME", str(Path(__file__).resolve().parent.parent / ".cache" / "tipsen"))
    from tipsen.config import load_params

    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml", profile="demo")
    sizes = SMOKE_SIZES if args.smoke else SIZES
    reps = 1 if args.smoke else 2
    root = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    results = {"throughput": [], "workers": {}, "hash_index": [], "load_average_at_start": os.getloadavg()}
    try:
        demo_raw, demo_n = export(root, 2 if args.smoke else 14)
        sets = [("demo", demo_raw, demo_n)] + [(k, *export(root, pk)) for k, pk in sizes.items()]
        measure(params, demo_raw, root / "out")  # warm-up: imports, the tiny CLIP, the fork server
        walls: dict = {}
        for rep in range(reps):  # rounds over every set, so that drift in machine load hits them all alike
            for name, raw, n in sets[rep % len(sets):] + sets[:rep % len(sets)]:
                for relevance in (True, False):
                    walls.setdefault((name, relevance), []).append(measure(params, raw, root / "out",
                                                                           relevance=relevance)[0])
        for name, raw, n in sets:
            for relevance in (True, False):
                wall = summarize(walls[(name, relevance)])
                cpu = measure(params, raw, root / "out", relevance=relevance, workers=1)[1]
                results["throughput"].append({
                    "set": name, "images": n, "relevance": relevance, "seconds": wall["median"], "min": wall["min"],
                    "max": wall["max"], "images_per_s": n / wall["median"], "cpu_s_1_worker": cpu,
                    "cpu_ms_per_image": 1000 * cpu / n})
        for relevance in (True, False):  # seconds = fixed + per_image * images, over 1x/2x/4x
            rows = [r for r in results["throughput"] if r["set"] != "demo" and r["relevance"] is relevance]
            key = "" if relevance else "_no_relevance"
            results["linear_fit_cpu" + key] = fit([(r["images"], r["cpu_s_1_worker"]) for r in rows])
            results["linear_fit_wall" + key] = fit([(r["images"], r["seconds"]) for r in rows])
        pair = paired(lambda: run_curate(params, demo_raw, root / "out", workers=1, relevance=False),
                      lambda: run_curate(params, demo_raw, root / "out", workers=2, relevance=False),
                      reps=max(2, reps), warmup=0)
        results["workers"] = {"images": demo_n, "one_worker": pair["a"], "two_workers": pair["b"],
                              "speedup": pair["ratio_a_over_b"]}
        for n in ((500, 1000) if args.smoke else (1000, 2000, 4000)):
            results["hash_index"].append(hash_index(n))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()

    print(table(results["throughput"]))
    for key in ("linear_fit_cpu", "linear_fit_cpu_no_relevance", "linear_fit_wall", "linear_fit_wall_no_relevance"):
        f = results[key]
        print(f"{key}: {f['fixed_s']:.2f} s + {f['per_image_ms']:.2f} ms/image (r2 {f['r2']:.4f})")
    w = results["workers"]
    print(f"\nworkers, {w['images']} images without CLIP: 1 worker {w['one_worker']['median']:.2f} s, "
          f"2 workers {w['two_workers']['median']:.2f} s, speed-up x{w['speedup']:.2f}")
    print("\n" + table(results["hash_index"]))
    print(f"\nload average: {results['load_average_at_start']} at start, {results['load_average_at_end']} at end")
    path = write_result("curate" + ("-smoke" if args.smoke else ""), results,
                        params={"sizes": sizes, "reps": reps, "curate": params.curate.model_dump(),
                                "clip": params.models.clip})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
