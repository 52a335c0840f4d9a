"""Generation runtime on tiny:sdxl: batching, mixed-keyword batches, keyword switching, fusion, cold start.

    .venv/bin/python -m benchmarks.generate [--smoke] [--steps 28] [--size 64] [--adapters 30] [--reps 3]
                                            [--threads N] [--label TAG]
    .venv/bin/python -m benchmarks.generate --sdxl [--size 256] [--steps 2]   # the paper profile's path on the
                                            # SDXL-base architecture (random weights): resolve, then one
                                            # mixed-keyword render; CPU or CUDA

Adapters are random (rank = train.rank of the demo profile) and written to a temporary bank, so only speed is
measured, never quality. Every comparison is paired and alternated in one process (benchmarks.common).
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import paired, summarize, table, write_result

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TIPSEN_HOME", str(ROOT / ".cache" / "tipsen"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def unet_scaling(pipe, size: int, reps: int) -> dict:
    """The ceiling for any batching scheme: the bare UNet forward at the shapes of 1 and of 8 guided requests.

    If 16 rows cost 8x what 2 rows cost, the UNet is compute-bound and no batching can beat the fixed per-request
    costs (prompt encoding, VAE decode, the scheduler) that batching removes."""
    import torch

    from benchmarks.common import timeit

    unet, cfg = pipe.unet, pipe.unet.config
    side = size // pipe.vae_scale_factor
    runs = {}
    for rows in (2, 16):
        x = torch.randn(rows, cfg.in_channels, side, side)
        ctx = torch.randn(rows, 77, cfg.cross_attention_dim)
        extra = {}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and six micro-conditioning ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(rows, pooled), "time_ids": torch.randn(rows, 6)}}
        with torch.no_grad():
            runs[rows] = timeit(lambda: unet(x, 500, ctx, **extra), reps=reps, warmup=1)
    return {"rows2_s": runs[2], "rows16_s": runs[16], "latent": side,
            "per_request_speedup": 8 * runs[2]["median"] / runs[16]["median"]}


def sdxl_main(args) -> None:
    """The paper profile's Generator on the full SDXL-base architecture with random weights and two random rank-20
    adapters: plans resolved from requests, then one render mixing both adapters and the base model."""
    import torch

    from benchmarks.train import random_sdxl
    from tipsen.config import load_params
    from tipsen.generate import Generator
    from tipsen.registry import Registry
    from tipsen.testing import random_bank

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    profile = "demo" if args.smoke else "paper"
    params, registry, slugs = load_params(ROOT / "params.yaml", profile=profile), Registry.load(), ["gimjang", "yakgwa"]
    size, steps = (64, 1) if args.smoke else (args.size, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        tmp, t0 = Path(tmp), time.perf_counter()
        # --smoke builds the architecture on the meta device (no memory) and runs the tiny model through the same path
        pipe = random_sdxl("meta" if args.smoke else device, dtype, tmp)
        build_s = time.perf_counter() - t0
        rank = params.train.rank
        t0 = time.perf_counter()
        bank = random_bank(tmp / "bank", slugs, rank=rank, seed=0, scale=0.1, registry=registry,
                           unet=None if args.smoke else pipe.unet)
        gen = Generator(params, pipe=None if args.smoke else pipe, bank=bank, registry=registry)
        load_s = time.perf_counter() - t0
        assert gen.available == sorted(slugs), gen.status()
        reqs = [{"prompt": "어릴 적 김장하던 날", "seed": 1}, {"prompt": "grandma's yakgwa", "seed": 2, "lora_scale": 1.0},
                {"prompt": "a quiet morning by the sea", "seed": 3}]
        t0 = time.perf_counter()
        plans = [gen.resolve({**r, "steps": steps, "width": size, "height": size}) for r in reqs]
        resolve_s = (time.perf_counter() - t0) / len(plans)
        assert [p.adapter for p in plans] == ["gimjang", "yakgwa", None], plans
        gen.render([plans[0]])  # warm-up: first-call allocations and kernel selection
        t0 = time.perf_counter()
        out = gen.render(plans)
        render_s = time.perf_counter() - t0
    assert [r.images[0].size for r in out] == [(size, size)] * len(plans)
    row = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "dtype": str(dtype)[6:],
           "native": gen.native, "size": size, "steps": steps, "plans": len(plans), "rank": rank,
           "build_s": build_s, "bank_and_load_s": load_s, "resolve_ms": 1000 * resolve_s, "render_s": render_s,
           "render_s_per_step": render_s / steps}
    print(table([row]))
    path = write_result("generate_sdxl" + ("-smoke" if args.smoke else ""), {"row": row},
                        params={"profile": profile, "size": size, "steps": steps})
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdxl", action="store_true", help="the SDXL-base architecture with random weights")
    ap.add_argument("--smoke", action="store_true", help="2 steps, 32 px, 8 adapters, 1 repetition")
    ap.add_argument("--steps", type=int, default=None, help="default 28; --sdxl: 2")
    ap.add_argument("--size", type=int, default=None, help="default 64; --sdxl: 256 (1024 is native, for CUDA)")
    ap.add_argument("--adapters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--label", default="", help="suffix of the result name, e.g. 32px -> generate-32px.json")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sdxl:  # 256 px and 2 steps are what a CPU can afford; on CUDA pass --size 1024 --steps 28
        args.size, args.steps = args.size or 256, args.steps or 2
        return sdxl_main(args)
    args.size, args.steps = args.size or 64, args.steps or 28
    if args.smoke:
        args.steps, args.size, args.adapters, args.reps = 2, 32, 8, 1
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from tipsen.config import load_params
    from tipsen.generate import Generator
    from tipsen.registry import Registry
    from tipsen.testing import random_bank

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    params = load_params(ROOT / "params.yaml", profile="demo")
    params = params.override("generate", {"max_batch_size": 8})
    fused_params = params.override("generate", {"fuse_lora": True})
    registry = Registry.load()
    slugs = list(registry.keywords)[:args.adapters]  # the whole registry (30), not the demo's 6
    reps, warmup = args.reps, 0 if args.smoke else 1
    rows, results = [], {}

    def req(slug: str, seed: int) -> dict:
        return {"prompt": f"{registry[slug].ko} 하던 날", "keyword": slug, "seed": seed, "steps": args.steps,
                "width": args.size, "height": args.size}

    with tempfile.TemporaryDirectory() as tmp:
        # Random adapters at the demo's rank; lora_B x0.1 is a trained adapter's magnitude, roughly (speed does not
        # depend on it).
        bank = random_bank(Path(tmp), slugs, rank=params.train.rank, seed=0, scale=0.1, registry=registry)
        Generator(params, bank=None, registry=registry)  # imports and first-load costs
        gc.collect()

        base_s, bank_s = [], []
        for _ in range(max(reps, 2)):
            t = time.perf_counter()
            Generator(params, bank=None, registry=registry)
            base_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            gen = Generator(params, bank=bank, registry=registry)
            bank_s.append(time.perf_counter() - t)
            gc.collect()
        assert len(gen.available) == len(slugs), gen.status()
        results["cold_start"] = {"base_s": summarize(base_s), "base_plus_adapters_s": summarize(bank_s),
                                 "adapters": len(slugs)}
        per_adapter = (results["cold_start"]["base_plus_adapters_s"]["median"] - summarize(base_s)["median"])
        rows.append({"measure": f"cold start: base + {len(slugs)} adapters", "a_s": summarize(bank_s)["median"],
                     "b_s": summarize(base_s)["median"], "ratio": per_adapter / len(slugs) * 1000,
                     "target": "ms per adapter"})

        mixed = [req(slugs[i % len(slugs)], i) for i in range(8)]
        same = [req(slugs[0], i) for i in range(8)]
        plain = [{**r, "use_lora": False} for r in mixed]
        fused = Generator(fused_params, bank=bank, registry=registry)
        comparisons = {
            # name: (A, B, ratio from medians, target)
            "batch8_vs_sequential8": (lambda: gen.generate_batch(mixed), lambda: [gen.generate(r) for r in mixed],
                                      lambda a, b: b / a, "speedup >= 3x"),
            "batch8_vs_sequential8_base_model": (lambda: gen.generate_batch(plain),
                                                 lambda: [gen.generate(r) for r in plain],
                                                 lambda a, b: b / a, "reference: no LoRA"),
            "mixed8_vs_same8_batch": (lambda: gen.generate_batch(mixed), lambda: gen.generate_batch(same),
                                      lambda a, b: b / a, "throughput >= 0.8x"),
            "fused_vs_unfused_single_keyword": (lambda: fused.generate_batch(same), lambda: gen.generate_batch(same),
                                                lambda a, b: b / a, "speedup (informative)"),
        }
        for name, (a, b, ratio, target) in comparisons.items():
            r = paired(a, b, reps=reps, warmup=warmup)
            r["ratio"] = ratio(r["a"]["median"], r["b"]["median"])
            results[name] = r
            rows.append({"measure": name, "a_s": r["a"]["median"], "b_s": r["b"]["median"], "ratio": r["ratio"],
                         "target": target})
            print(f"{name}: {r['ratio']:.3f}", flush=True)

        scaling = results["unet_batch_scaling"] = unet_scaling(gen.pipe, args.size, max(reps, 3))
        rows.append({"measure": "bare UNet: 8 guided requests as 16 rows vs 2 rows, per request",
                     "a_s": scaling["rows16_s"]["median"], "b_s": scaling["rows2_s"]["median"],
                     "ratio": scaling["per_request_speedup"], "target": "ceiling for batching"})

        # Keyword switching, timed per request in pairs of one request that switches keyword and one that
        # repeats the last keyword, switch first in even pairs and second in odd ones, so that neither drift
        # nor position favours either. The figure is the median over pairs of switch / repeat, minus 1.
        switch, repeat, keyword, seed = [], [], 0, 0
        for pair in range(4 * (warmup + 2 * reps)):
            took = {}
            for switching in (True, False) if pair % 2 == 0 else (False, True):
                keyword = (keyword + 1) % len(slugs) if switching else keyword
                seed += 1
                t = time.perf_counter()
                gen.generate(req(slugs[keyword], seed))
                took[switching] = time.perf_counter() - t
            if pair >= 4 * warmup:
                switch.append(took[True])
                repeat.append(took[False])
        ratios = [s / r_ for s, r_ in zip(switch, repeat)]
        r = {"a": summarize(switch), "b": summarize(repeat), "pair_ratio": summarize(ratios)}
        r["ratio"] = r["pair_ratio"]["median"] - 1
        results["switching_vs_same_keyword"] = r
        rows.append({"measure": "switching_vs_same_keyword (per request)", "a_s": r["a"]["median"],
                     "b_s": r["b"]["median"], "ratio": r["ratio"], "target": "overhead <= 0.02"})

    print(table(rows))
    name = "-".join(filter(None, ["generate", args.label, "smoke" if args.smoke else ""]))
    out = write_result(name, results, params={
        "model": "tiny:sdxl", "steps": args.steps, "size": args.size, "adapters": len(slugs),
        "rank": params.train.rank, "reps": reps, "warmup": warmup, "smoke": args.smoke,
        "device": str(gen.pipe.device), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
