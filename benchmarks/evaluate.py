"""Evaluation wall time on the demo profile (cold cache and fully cached rerun), and its scaling with
images_per_keyword: N vs 2N images (paired, cold cache each time) should take about 2x, not 4x.

    .venv/bin/python -m benchmarks.evaluate [--smoke] [--keywords 4] [--images 4] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import paired, table, timeit, write_result

ROOT = Path(__file__).resolve().parent.parent


def workspace(root: Path, params, keywords: list[str]) -> tuple[Path, Path]:
    """The real curation of `keywords` from the demo export, and a bank of random adapters (as the tests build)."""
    from tipsen.curate import curate
    from tipsen.demodata import demo_data
    from tipsen.registry import Registry
    from tipsen.testing import random_bank

    registry = Registry.load()
    demo_data(root / "raw-all", registry=registry)
    items = [json.loads(line) for line in (root / "raw-all" / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    keep = [i for i in items if i["image"].split("/")[1] in keywords]
    for item in keep:
        (root / "raw" / item["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "raw-all" / item["image"], root / "raw" / item["image"])
    (root / "raw" / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in keep), encoding="utf-8")
    curate(params, root / "raw", root / "curated", progress=False)
    random_bank(root, keywords, rank=params.train.rank, alpha=params.train.alpha,
                target_modules=params.train.target_modules, seed=0, registry=registry)
    return root / "curated", root / "bank.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 keyword, 1 image, 1 step, one repetition")
    ap.add_argument("--keywords", type=int, default=4, help="keywords evaluated (the demo profile's first K)")
    ap.add_argument("--images", type=int, default=None, help="N for the scaling pair (default: the profile's)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TIPSEN_HOME", str(ROOT / ".cache" / "tipsen"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tipsen.config import load_params
    from tipsen.evaluate import evaluate

    params = load_params(ROOT / "params.yaml", profile="demo")
    k, reps = (1, 1) if args.smoke else (args.keywords, args.reps)
    keywords = params.keywords[:k]
    if args.smoke:
        params = params.override("eval", {"images_per_keyword": 1, "bootstrap": 10, "methods": [
            {**m.model_dump(), "steps": 1} for m in params.eval.methods]})
    params = params.override(None, {"keywords": keywords})
    ev = params.eval
    n = 1 if args.smoke else (args.images or ev.images_per_keyword)
    root = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    results = {"load_average_at_start": os.getloadavg()}
    try:
        curated, bank = workspace(root, params, keywords)

        cpu: dict[int, list[float]] = {}  # process CPU seconds per run: what contention on a shared machine hides

        def run(images: int, *, cold: bool):
            cache = root / f"cache-{images}"
            if cold:
                shutil.rmtree(cache, ignore_errors=True)
            p = params.override("eval", {"images_per_keyword": images})
            start = time.process_time()
            evaluate(p, curated=curated, bank=bank, metrics_dir=root / "metrics", reports_dir=root / "reports",
                     cache_dir=cache)
            if cold:
                cpu.setdefault(images, []).append(time.process_time() - start)

        demo = timeit(lambda: run(ev.images_per_keyword, cold=True), reps=reps, warmup=1)
        cached = timeit(lambda: run(ev.images_per_keyword, cold=False), reps=reps, warmup=0)
        images = len(keywords) * len(ev.methods) * ev.images_per_keyword
        results["demo"] = {"keywords": len(keywords), "methods": len(ev.methods), "images": images,
                           "cold": demo, "cached_rerun": cached, "images_per_s_cold": images / demo["median"]}
        cpu.clear()
        pair = paired(lambda: run(2 * n, cold=True), lambda: run(n, cold=True), reps=reps, warmup=0)
        t_4n = timeit(lambda: run(4 * n, cold=True), reps=1, warmup=0)["median"]
        per_n = n * len(keywords) * len(ev.methods)  # images generated per N
        c = {k: statistics.median(v) for k, v in cpu.items()}
        slope, fixed = np.polyfit([per_n, 2 * per_n, 4 * per_n], [c[n], c[2 * n], c[4 * n]], 1)
        results["scaling"] = {
            "n": n, "images_n": per_n, "wall_n": pair["b"], "wall_2n": pair["a"], "wall_4n": t_4n,
            "wall_ratio_2n_over_n": pair["ratio_a_over_b"], "cpu_s": {str(k): v for k, v in c.items()},
            "cpu_ratio_2n_over_n": c[2 * n] / c[n],
            # t = a + b*N + c*N^2 gives an increment ratio of 2 when c = 0 (linear) and 4 when b = 0 (quadratic)
            "cpu_increment_ratio": (c[4 * n] - c[2 * n]) / (c[2 * n] - c[n]),
            "cpu_fit": {"fixed_s": float(fixed), "per_image_s": float(slope)}}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    d, s = results["demo"], results["scaling"]
    rows = [{"run": "demo cold", "images": d["images"], **{k: d["cold"][k] for k in ("median", "min", "max")},
             "cpu_s": ""},
            {"run": "demo cached", "images": d["images"], **{k: d["cached_rerun"][k] for k in ("median", "min", "max")},
             "cpu_s": ""}]
    for mult, wall in ((1, s["wall_n"]), (2, s["wall_2n"]), (4, {"median": s["wall_4n"], "min": "", "max": ""})):
        rows.append({"run": f"{mult}N", "images": mult * s["images_n"],
                     **{k: wall[k] for k in ("median", "min", "max")}, "cpu_s": s["cpu_s"][str(mult * n)]})
    print(table(rows))
    print(f"\nN = {n} images per keyword; 2N/N: wall x{s['wall_ratio_2n_over_n']:.2f}, "
          f"CPU x{s['cpu_ratio_2n_over_n']:.2f} (model loads included: < 2 when linear)")
    print(f"CPU increment ratio (4N-2N)/(2N-N) = {s['cpu_increment_ratio']:.2f} (2: linear, 4: quadratic)")
    print(f"CPU fit: {s['cpu_fit']['fixed_s']:.1f} s + {s['cpu_fit']['per_image_s'] * 1000:.0f} ms/image; "
          f"cached rerun {d['cold']['median'] / d['cached_rerun']['median']:.0f}x faster than cold")
    path = write_result("evaluate" + ("-smoke" if args.smoke else ""), results, params={
        "keywords": keywords, "reps": reps, "eval": params.eval.model_dump(mode="json"),
        "models": params.models.model_dump(mode="json"), "load_average_at_end": os.getloadavg()})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
