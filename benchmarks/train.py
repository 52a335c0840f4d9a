"""Trainer cost: seconds per step with the latent and text caches vs encoding every step, and checkpoint cost.

    .venv/bin/python -m benchmarks.train [--smoke] [--threads N] [--profile demo]

Both trainers are built once and then timed alternately (paired), so only the loop is measured: the cached one
samples latents from stored VAE posteriors and reuses prompt embeddings; the uncached one runs the VAE encoder
and the text encoders on every batch. Checkpoint cost is the save (weights + optimizer + RNG, safetensors) and
the restore of that file into a live trainer.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import paired, table, timeit, write_result

ROOT = Path(__file__).resolve().parent.parent
SLUG = "yakgwa"


def write_curated(root: Path, registry, slug: str, n: int, res: int) -> None:
    """Curated-format data (metadata.jsonl + square PNGs), as `tipsen curate` writes it."""
    from tipsen.demodata import motif

    kw, ki = registry[slug], list(registry.keywords).index(slug)
    folder = root / slug
    folder.mkdir(parents=True)
    rng = np.random.default_rng(ki)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for j in range(n):
            motif(ki, rng, res, res).save(folder / f"{j:03d}.png")
            f.write(json.dumps({"file_name": f"{j:03d}.png", "slug": slug, "text": kw.ko, "prompt": kw.prompt,
                                "original_size": [res, res], "crop_top_left": [0, 0], "split": "train"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="smallest size, a few seconds")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from tipsen.config import load_params
    from tipsen.registry import Registry
    from tipsen.train import Trainer
    from tipsen.train_data import load_examples

    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml", profile=args.profile)
    steps, reps, images = (2, 3, 2) if args.smoke else (10, 7, 10)
    registry = Registry.load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_curated(tmp / "data", registry, SLUG, images, params.train.resolution)
        examples = load_examples(tmp / "data", SLUG, resolution=params.train.resolution)
        cached = Trainer(params, registry[SLUG], examples, cache=True)
        fresh = Trainer(params, registry[SLUG], examples, cache=False)

        def run(trainer):
            return lambda: [trainer.step() for _ in range(steps)]

        loop = paired(run(cached), run(fresh), reps=reps, warmup=1)
        ckpt = tmp / "checkpoint.safetensors"
        save = timeit(lambda: cached.save_checkpoint(ckpt, "bench"), reps=reps, warmup=1)
        load = timeit(lambda: cached.load_checkpoint(ckpt, "bench"), reps=reps, warmup=1)
        size = ckpt.stat().st_size

    step_c, step_u = loop["a"]["median"] / steps, loop["b"]["median"] / steps
    rows = [
        {"what": "step, cached latents+text", "median_s": step_c, "min_s": loop["a"]["min"] / steps,
         "max_s": loop["a"]["max"] / steps},
        {"what": "step, encode every step", "median_s": step_u, "min_s": loop["b"]["min"] / steps,
         "max_s": loop["b"]["max"] / steps},
        {"what": "checkpoint save", "median_s": save["median"], "min_s": save["min"], "max_s": save["max"]},
        {"what": "checkpoint resume", "median_s": load["median"], "min_s": load["min"], "max_s": load["max"]},
    ]
    print(table(rows))
    ratio = step_u / step_c
    print(f"cache makes a step {ratio:.2f}x cheaper (target >= 1.5x); checkpoint {size / 1e6:.2f} MB, "
          f"save = {save['median'] / step_c:.2f} steps, resume = {load['median'] / step_c:.2f} steps")
    out = write_result("train" + ("_smoke" if args.smoke else ""), {
        "rows": rows, "uncached_over_cached": ratio, "checkpoint_bytes": size, "steps_per_sample": steps,
        "paired": loop}, params={"profile": args.profile, "base": params.models.base, "images": images,
                                 "train": params.train.model_dump(mode="json"), "threads": torch.get_num_threads(),
                                 "smoke": args.smoke})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
