"""Trainer cost: seconds per step with the latent and text caches vs encoding every step, and checkpoint cost.

    .venv/bin/python -m benchmarks.train [--smoke] [--threads N] [--profile demo]
    .venv/bin/python -m benchmarks.train --sdxl [--compile] [--steps 20]   # any single CUDA machine

Both trainers are built once and then timed alternately (paired), so only the loop is measured: the cached one
samples latents from stored VAE posteriors and reuses prompt embeddings; the uncached one reads, decodes and
encodes every batch's images and prompts. Checkpoint cost is the save (weights + optimizer + RNG, safetensors)
and the restore of that file into a live trainer.

`--sdxl` times the paper's setting (SDXL at 1024 px, rank 20, batch 2, the paper profile's train params) on the
real SDXL-base architecture with random weights, since the weights cannot be downloaded everywhere; the time per
step and the memory do not depend on the values. It reports seconds per step, the projected 500 steps and peak
memory. With `--smoke` it only checks the architecture (parameter count, on the meta device) and runs tiny:sdxl.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.common import paired, table, timeit, write_result

ROOT = Path(__file__).resolve().parent.parent
SLUG = "yakgwa"


SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_UNET_PARAMS = 2_567_463_684
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")


def random_sdxl(device: str, dtype, tmp: Path):
    """The SDXL-base pipeline architecture with random weights (byte-level tokenizers stand in for CLIP's BPE)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tipsen.models import _clip_tokenizer, _sd_scheduler_config

    tok, tok2 = _clip_tokenizer(tmp / "tok"), _clip_tokenizer(tmp / "tok2")
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes
        parts = dict(unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids)))
    for name, m in parts.items():
        m.to(dtype=dtype).eval()
    return StableDiffusionXLPipeline(**parts, tokenizer=tok, tokenizer_2=tok2, scheduler=EulerDiscreteScheduler(
        **_sd_scheduler_config(), interpolation_type="linear"))


def sdxl_main(args) -> None:
    import time

    import torch
    from diffusers import UNet2DConditionModel

    from tipsen.config import load_params
    from tipsen.live import log_step, open_live
    from tipsen.registry import Registry
    from tipsen.testing import write_curated
    from tipsen.train import Trainer
    from tipsen.train_data import load_examples

    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet2DConditionModel(**SDXL_UNET).parameters())
    assert n_params == SDXL_UNET_PARAMS, f"SDXL UNet config drifted: {n_params} parameters"
    profile = "demo" if args.smoke else "paper"
    params = load_params(ROOT / "params.yaml", profile=profile)
    if args.compile or args.gradient_checkpointing:
        params = params.override("train", {"compile": args.compile,
                                           "gradient_checkpointing": args.gradient_checkpointing})
    cfg, registry = params.train, Registry.load()
    steps = 3 if args.smoke else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_curated(tmp / "data", SLUG, n=4, heldout=0, res=cfg.resolution, registry=registry)
        examples = load_examples(tmp / "data", SLUG, resolution=cfg.resolution)
        t0 = time.perf_counter()
        if args.smoke:
            random_sdxl("meta", torch.bfloat16, tmp)  # builds, without allocating
            trainer = Trainer(params, registry[SLUG], examples)
        else:
            os.environ["TIPSEN_HOME"] = str(tmp / "home")  # random weights must not seed the real model's caches
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            trainer = Trainer(params, registry[SLUG], examples, pipe=random_sdxl(device, dtype, tmp))
        setup = time.perf_counter() - t0
        for _ in range(3):  # warm-up: allocator, cuDNN autotuning, compilation
            trainer.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()  # each step ends in loss.item(), a device sync
        per_step = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if trainer.device == "cuda" else 0
    row = {"device": torch.cuda.get_device_name(0) if trainer.device == "cuda" else trainer.device,
           "resolution": cfg.resolution, "rank": cfg.rank, "batch": cfg.batch_size, "precision": trainer.precision,
           "compile": cfg.compile, "grad_ckpt": cfg.gradient_checkpointing, "s_per_step": per_step,
           "500_steps_s": 500 * per_step, "peak_GiB": peak / 2**30, "setup_s": setup}
    print(table([row]))
    print(f"500 steps in {500 * per_step / 60:.1f} min (target < 3 min on an H200; the paper: 20-30 min on an A100)")
    out = write_result("train_sdxl" + ("-smoke" if args.smoke else ""), {"row": row, "unet_params": n_params},
                       params={"profile": profile, "steps": steps, "train": cfg.model_dump(mode="json")})
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="smallest size, a few seconds")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--sdxl", action="store_true", help="SDXL at 1024 px with random weights (for a CUDA machine)")
    ap.add_argument("--steps", type=int, default=20, help="--sdxl: timed steps after 3 warm-up steps")
    ap.add_argument("--compile", action="store_true", help="--sdxl: torch.compile the UNet")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="--sdxl: trade compute for memory")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sdxl:
        return sdxl_main(args)

    import torch

    from tipsen.config import load_params
    from tipsen.live import log_step, open_live
    from tipsen.registry import Registry
    from tipsen.testing import write_curated
    from tipsen.train import Trainer
    from tipsen.train_data import encode_prompts, latent_dist, load_examples, pixels

    params = load_params(ROOT / "params.yaml", profile=args.profile)
    steps, reps, images = (2, 3, 2) if args.smoke else (10, 7, 10)
    registry = Registry.load()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_curated(tmp / "data", SLUG, n=images, heldout=0, res=params.train.resolution, registry=registry)
        examples = load_examples(tmp / "data", SLUG, resolution=params.train.resolution)
        cached = Trainer(params, registry[SLUG], examples, cache=True)
        fresh = Trainer(params, registry[SLUG], examples, cache=False)

        def run(trainer):
            return lambda: [trainer.step() for _ in range(steps)]

        loop = paired(run(cached), run(fresh), reps=reps, warmup=1)
        # What the cache removes from a step, measured alone: one batch through the VAE encoder (from the
        # files) and through the text encoders.
        batch = [e.file for e in examples[:params.train.batch_size]]
        prompts = [e.prompt for e in examples[:params.train.batch_size]]
        with torch.no_grad():
            vae = timeit(lambda: latent_dist(fresh.pipe.vae, pixels(batch)), reps=reps, warmup=1)
            text = timeit(lambda: encode_prompts(fresh.pipe, prompts), reps=reps, warmup=1)
        ckpt = tmp / "checkpoint.safetensors"
        save = timeit(lambda: cached.save_checkpoint(ckpt, "bench"), reps=reps, warmup=1)
        load = timeit(lambda: cached.load_checkpoint(ckpt, "bench"), reps=reps, warmup=1)
        size = ckpt.stat().st_size
        # The dvclive log (tipsen.live): one step's row of loss and rate plus the summary, as the loop writes it;
        # and a resume's replay of the paper's 500 steps from the checkpoint's losses
        live = open_live(tmp / "log", what="benchmark")
        counter = iter(range(1, 10**6))
        log_one = timeit(lambda: log_step(live, next(counter), loss=0.1, lr=2e-4), reps=50, warmup=5)

        def replay():
            again = open_live(tmp / "replay", what="benchmark")
            for i in range(1, 501):
                log_step(again, i, loss=0.1, lr=2e-4)

        log_replay = timeit(replay, reps=3, warmup=1)
        # One row of previews (train.preview_every): the validation seeds at the serving scale, the pipeline built
        # around the training UNet (its VAE and text encoders loaded each time)
        preview = timeit(lambda: cached.preview(params, registry[SLUG]), reps=3, warmup=1)

    step_c, step_u = loop["a"]["median"] / steps, loop["b"]["median"] / steps
    rows = [
        {"what": "step, cached latents+text", "median_s": step_c, "min_s": loop["a"]["min"] / steps,
         "max_s": loop["a"]["max"] / steps},
        {"what": "step, encode every step", "median_s": step_u, "min_s": loop["b"]["min"] / steps,
         "max_s": loop["b"]["max"] / steps},
        {"what": "  of which VAE encode", "median_s": vae["median"], "min_s": vae["min"], "max_s": vae["max"]},
        {"what": "  of which text encode", "median_s": text["median"], "min_s": text["min"], "max_s": text["max"]},
        {"what": "checkpoint save", "median_s": save["median"], "min_s": save["min"], "max_s": save["max"]},
        {"what": "checkpoint resume", "median_s": load["median"], "min_s": load["min"], "max_s": load["max"]},
        {"what": "dvclive log, one step", "median_s": log_one["median"], "min_s": log_one["min"],
         "max_s": log_one["max"]},
        {"what": "dvclive log, replay of 500 steps", "median_s": log_replay["median"], "min_s": log_replay["min"],
         "max_s": log_replay["max"]},
        {"what": f"preview row ({len(params.train.validation_seeds)} seeds, {params.train.sample_steps} steps)",
         "median_s": preview["median"], "min_s": preview["min"], "max_s": preview["max"]},
    ]
    print(table(rows))
    ratio = step_u / step_c
    expected = (step_c + vae["median"] + text["median"]) / step_c
    print(f"cache makes a step {ratio:.2f}x cheaper (target >= 1.5x; the encoders' share predicts {expected:.2f}x); "
          f"checkpoint {size / 1e6:.2f} MB, "
          f"save = {save['median'] / step_c:.2f} steps, resume = {load['median'] / step_c:.2f} steps; "
          f"the dvclive log costs {log_one['median'] / step_c:.1%} of a cached step; "
          f"a preview row costs {preview['median'] / step_c:.1f} steps")
    out = write_result("train" + ("-smoke" if args.smoke else ""), {
        "rows": rows, "uncached_over_cached": ratio, "log_over_step": log_one["median"] / step_c,
        "preview_over_step": preview["median"] / step_c, "predicted_from_components": expected, "checkpoint_bytes": size,
        "steps_per_sample": steps,
        "paired": loop}, params={"profile": args.profile, "base": params.models.base, "images": images,
                                 "train": params.train.model_dump(mode="json"), "threads": torch.get_num_threads(),
                                 "smoke": args.smoke})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
