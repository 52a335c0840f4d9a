"""Per-keyword DreamBooth-LoRA: `tipsen train SLUG --data data/curated --out models/loras/SLUG`.

Minimises E_t,eps ||w(t) (eps_theta+psi(x, y, t) - eps)||^2 over LoRA layers psi on the UNet attention
projections, with x the cached VAE latents of a keyword's curated images and y the template prompt. The same
code trains SDXL (micro-conditioning from curation's sizes and crops) and SD 1.x/2.x pipelines.

Checkpoints (LoRA weights, optimizer and RNG state) live outside the output directory, because DVC deletes a
stage's outputs before rerunning it; a rerun with the same run key resumes from the last one, bit for bit.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tipsen import train_data as td
from tipsen.bank import META_PREFIX, SUMMARY_NAME, WEIGHTS_NAME
from tipsen.config import Params, TrainParams, load_params
from tipsen.errors import ConfigError
from tipsen.io import publish_dir, sha256_json
from tipsen.models import cache_dir, load_pipeline, resolve_device, resolve_ref
from tipsen.registry import Keyword, Registry

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_ROOT = Path("models/.checkpoints")  # relative to the project root, as every DVC path is
VALIDATION_NAME = "validation.png"
VALIDATION_GUIDANCE = 5.0  # the paper's sampling guidance
TEXT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # as diffusers' DreamBooth-LoRA script


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message names the step."""


@dataclass
class TrainSummary:
    slug: str
    keyword: str
    base_model: str
    steps: int
    final_loss: float
    final_loss_mean: float  # over the last log_every steps
    wall_time_s: float
    steps_per_s: float  # steps run in this process over the training loop's time
    device: str
    peak_memory_bytes: int
    params_hash: str
    dataset_hash: str
    num_images: int
    resumed_from: int
    cache: bool
    encoded: int  # latents and prompts encoded (cache misses) in this run

    def as_dict(self) -> dict:
        return asdict(self)


def params_hash(params: Params) -> str:
    return sha256_json({"train": params.train.model_dump(mode="json"), "base": params.models.base,
                        "pipeline_class": params.models.pipeline_class})


def _precision(cfg: TrainParams, device: str) -> str:
    return ("bf16" if device == "cuda" else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision


class Trainer:
    """One keyword's training state: frozen base, LoRA layers, optimizer, cached inputs and RNG."""

    def __init__(self, params: Params, kw: Keyword, examples: list[td.Example], *, cache: bool = True, pipe=None):
        """`pipe`: an already loaded pipeline in the training dtype (the GPU benchmark builds SDXL at random)."""
        import torch

        self.cfg = cfg = params.train
        self.device = resolve_device(params.models.device)
        self.precision = _precision(cfg, self.device)
        dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision]
        self.dtype = getattr(torch, dtype)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)  # all sampling on the CPU: device-independent
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
            torch.cuda.reset_peak_memory_stats()
        pipe = pipe or load_pipeline(params.models.base, pipeline_class=params.models.pipeline_class,
                                     device=self.device, dtype=dtype)
        self._inputs_from(pipe, params, kw, examples, cache)
        self._add_lora(cfg)
        self.opt = torch.optim.AdamW([p for _, p in self.named], lr=cfg.learning_rate,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                     eps=cfg.adam_epsilon)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.precision == "fp16")
        self.step_no, self.losses = 0, []

    def _inputs_from(self, pipe, params: Params, kw: Keyword, examples: list[td.Example], cache: bool) -> None:
        """Encode latents and prompts once (from the disk cache when possible), then free the encoders."""
        import torch
        from diffusers import DDPMScheduler

        cfg = self.cfg
        self.pipe_cls, self.unet = type(pipe), pipe.unet
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"models.base: prediction_type {self.scheduler.config.prediction_type!r} is not "
                              "supported for training; allowed: epsilon, v_prediction")
        self.time_ids = self.unet.config.addition_embed_type == "text_time"  # SDXL-style micro-conditioning
        self.cache = td.TensorCache(cache_dir() / "cache" if cache else None)
        model_key = [params.models.base, resolve_ref(params.models.base), self.device, str(self.dtype)]
        self.prior = None
        if cfg.prior_preservation:
            folder = cache_dir() / "cache" / "class_images" / self.cache.key(model_key, kw.class_token,
                                                                              cfg.resolution, cfg.sample_steps)
            self.prior = td.class_images(pipe, f"A photo of {kw.class_token}", count=cfg.num_class_images,
                                         resolution=cfg.resolution, steps=cfg.sample_steps, root=folder)
        self.examples = examples + (self.prior or [])
        self.n = len(examples)
        self.prompts = [e.prompt for e in self.examples]
        self.ids = torch.tensor([e.time_ids(cfg.resolution) for e in self.examples], dtype=torch.float32,
                                device=self.device)
        if pipe.vae.dtype != torch.float32:
            pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in half precision
        self.scale = pipe.vae.config.scaling_factor
        self.shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
        self.text_encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2")
                              if getattr(pipe, n, None) is not None and cfg.train_text_encoder}
        self.mean = self.std = self.embeds = self.pooled = None
        if cache:
            self.mean, self.std = (t.to(self.device) for t in td.cached_latents(
                pipe.vae, self.examples, self.cache, model_key, cfg.resolution))
            if not self.text_encoders:
                embeds, pooled = td.cached_prompts(pipe, self.prompts, self.cache, model_key)
                self.embeds = embeds.to(self.device, self.dtype)
                self.pooled = pooled.to(self.device, self.dtype) if pooled is not None else None
            pipe.vae = None
        self.pipe = pipe if self.embeds is None or self.mean is None else None  # still needed for encoding
        self.encoded = self.cache.misses
        del pipe
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _add_lora(self, cfg: TrainParams) -> None:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        self.unet.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # the gaussian LoRA init draws from the global RNG
        lora = dict(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian")
        self.unet.add_adapter(LoraConfig(**lora, target_modules=list(cfg.target_modules)))
        self.modules = {"unet": self.unet}
        for name, enc in self.text_encoders.items():
            enc.requires_grad_(False)
            # peft directly: transformers' add_adapter asks for a newer peft than diffusers does
            inject_adapter_in_model(LoraConfig(**lora, target_modules=TEXT_LORA_MODULES), enc)
            self.modules[name] = enc
        self.named = [(f"{m}.{n}", p) for m, mod in self.modules.items() for n, p in mod.named_parameters()
                      if p.requires_grad]
        for _, p in self.named:
            p.data = p.data.float()  # trainable LoRA weights in fp32 even when the base is in half precision
        for mod in self.modules.values():
            mod.train()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for enc in self.text_encoders.values():
                enc.activation_checkpointing_enable()
        self.forward = self.unet
        if cfg.compile and self.device == "cuda":
            self.forward = torch.compile(self.unet)
        elif cfg.compile:
            log.warning("train.compile: ignored on %s; it pays off only on CUDA", self.device)

    def _autocast(self):
        import torch

        return torch.autocast(self.device, dtype=self.dtype) if self.precision != "no" else contextlib.nullcontext()

    def _inputs(self, idx):
        """Scaled latents, prompt embeddings, pooled embeddings and time ids for example indices `idx`."""
        import torch

        on = idx.to(self.device)
        if self.mean is not None:
            mean, std = self.mean[on], self.std[on]
        else:  # no cache: read, decode and encode the images of every batch
            mean, std = td.latent_dist(self.pipe.vae, td.pixels([self.examples[i].file for i in idx.tolist()]))
        eps = torch.randn(mean.shape, generator=self.gen).to(self.device)
        latents = (mean + std * eps - self.shift) * self.scale
        if self.embeds is not None:
            embeds, pooled = self.embeds[on], (self.pooled[on] if self.pooled is not None else None)
        else:  # with gradients when the text encoders are trained
            with self._autocast(), contextlib.nullcontext() if self.text_encoders else torch.no_grad():
                embeds, pooled = td.encode_prompts(self.pipe, [self.prompts[i] for i in idx.tolist()])
        return latents, embeds, pooled, self.ids[on]

    def _loss(self, pred, target, t):
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        if self.cfg.loss_weighting == "min_snr":
            snr = compute_snr(self.scheduler, t)
            w = snr.clamp(max=self.cfg.snr_gamma)  # min(SNR, gamma), Hang et al. 2023
            loss = loss * (w / snr if self.scheduler.config.prediction_type == "epsilon" else w / (snr + 1))
        return loss.mean()

    def step(self) -> float:
        """One optimizer step; returns its loss, or raises TrainingError on a NaN or inf loss."""
        import torch

        cfg, bs, g = self.cfg, self.cfg.batch_size, self.gen
        idx = torch.randint(self.n, (bs,), generator=g)
        if self.prior:  # instance and class examples in one batch, as in the DreamBooth paper
            idx = torch.cat([idx, self.n + torch.randint(len(self.prior), (bs,), generator=g)])
        latents, embeds, pooled, ids = self._inputs(idx)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(latents, noise, t)
        dtype = self.dtype
        extra = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}} \
            if self.time_ids else {}
        with self._autocast():
            pred = self.forward(noisy.to(dtype), t, encoder_hidden_states=embeds.to(dtype), return_dict=False,
                                **extra)[0]
        if self.prior:
            loss = self._loss(pred[:bs], target[:bs], t[:bs]) + \
                cfg.prior_loss_weight * self._loss(pred[bs:], target[bs:], t[bs:])
        else:
            loss = self._loss(pred, target, t)
        value = loss.item()
        if not np.isfinite(value):
            raise TrainingError(f"step {self.step_no + 1}: loss is {value}; the run diverged "
                                f"(train.learning_rate is {cfg.learning_rate}; try a lower one)")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.losses.append(value)
        return value

    # ------------------------------------------------------------ checkpoints (safetensors + JSON, no pickles)

    def save_checkpoint(self, path: Path, run_key: str) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in self.named}
        opt = self.opt.state_dict()
        scalars = {}
        for i, state in opt["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{i}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = self.gen.get_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        py = random.getstate()
        state = {"run_key": run_key, "step": self.step_no, "losses": self.losses, "param_groups": opt["param_groups"],
                 "optim_scalars": scalars, "scaler": self.scaler.state_dict(),
                 "numpy": [np_state[0], *np_state[2:]], "python": [py[0], list(py[1]), py[2]]}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"tipsen.checkpoint": json.dumps(state)})
        os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact

    def load_checkpoint(self, path: Path, run_key: str) -> int:
        """Restore a checkpoint of the same run; returns its step, or 0 (and removes it) if it is another run's."""
        import torch
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            return 0
        try:
            with safe_open(str(path), framework="pt") as f:
                state = json.loads(f.metadata()["tipsen.checkpoint"])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("checkpoint %s is unreadable (%s); starting over", path, exc)
            path.unlink(missing_ok=True)
            return 0
        if state["run_key"] != run_key:
            log.info("checkpoint %s belongs to another run (params, data or base changed); starting over", path)
            path.unlink()
            return 0
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(tensors[f"param.{n}"])
        opt_state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                opt_state.setdefault(int(i), {})[k] = v
        for key, v in state["optim_scalars"].items():
            i, k = key.split(".", 1)
            opt_state.setdefault(int(i), {})[k] = v
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.generator"])
        if torch.cuda.is_available() and "rng.cuda.0" in tensors:
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
        name, *rest = state["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), *rest))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        self.step_no, self.losses = state["step"], state["losses"]
        return self.step_no

    # ------------------------------------------------------------ export

    def save_weights(self, folder: Path, metadata: dict[str, str]) -> None:
        """Diffusers' LoRA format via the pipeline class's own saver, then our `tipsen.*` keys in the header."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file, save

        layers = {f"{n}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
                  for n, m in self.modules.items()}
        adapters = {f"{n}_lora_adapter_metadata": {k: sorted(v) if isinstance(v, set) else v  # sets: hash order
                                                   for k, v in m.peft_config["default"].to_dict().items()}
                    for n, m in self.modules.items()}
        self.pipe_cls.save_lora_weights(str(folder), **layers, **adapters, safe_serialization=True)
        file = folder / WEIGHTS_NAME
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
        file.write_bytes(_canonical(save(load_file(str(file)), metadata={**header, **metadata})))
        file.chmod(0o644)

    def release(self) -> None:
        """Free the models before the validation pipeline is loaded."""
        import torch

        for name in ("unet", "forward", "pipe", "opt", "modules", "named", "text_encoders", "mean", "std",
                     "embeds", "pooled"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def validation_grid(params: Params, kw: Keyword, weights: Path):
    """Rows: the base model, then base + LoRA; columns: `train.validation_seeds`, same seeds in both rows."""
    import torch
    from PIL import Image

    cfg, seeds = params.train, params.train.validation_seeds
    device = resolve_device(params.models.device)
    pipe = load_pipeline(params.models.base, pipeline_class=params.models.pipeline_class, device=device)
    kwargs = dict(prompt=[kw.prompt] * len(seeds), num_inference_steps=cfg.sample_steps, height=cfg.resolution,
                  width=cfg.resolution, guidance_scale=VALIDATION_GUIDANCE)
    with torch.no_grad():
        base = pipe(generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kwargs).images
        pipe.load_lora_weights(str(weights), use_safetensors=True)  # the published file, through the stock loader
        tuned = pipe(generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kwargs).images
    r = cfg.resolution
    grid = Image.new("RGB", (r * len(seeds), 2 * r))
    for col, (a, b) in enumerate(zip(base, tuned)):
        grid.paste(a.resize((r, r)), (col * r, 0))
        grid.paste(b.resize((r, r)), (col * r, r))
    del pipe
    gc.collect()
    return grid


def _canonical(blob: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: the writer emits metadata in hash-map order, so
    the same tensors and metadata could otherwise give different bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _write_csv(path: Path, losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("step,loss\n" + "".join(f"{i},{v:.6g}\n" for i, v in enumerate(losses, 1)), encoding="utf-8")
    os.replace(tmp, path)


def _peak_memory(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(params: Params, slug: str, data: Path, out: Path, *, checkpoint_dir: Path | None = None,
          metrics_dir: Path | None = None, cache: bool = True, progress: bool = True,
          log_fn: Callable[[int, float], None] | None = None) -> TrainSummary:
    """Train one keyword's LoRA on `data/<slug>` and publish it atomically at `out`.

    `checkpoint_dir` defaults to models/.checkpoints/<slug>; `metrics_dir` (if given) receives
    train/<slug>.csv; `log_fn(step, mean loss)` is called every `train.log_every` steps.
    """
    from tqdm import tqdm

    cfg, out = params.train, Path(out)
    kw = Registry.load().get(slug, field="slug")
    examples = td.load_examples(Path(data), slug, resolution=cfg.resolution, prompt_source=cfg.prompt_source)
    phash, dhash = params_hash(params), td.dataset_hash(examples)
    run_key = sha256_json([phash, dhash, params.models.base, slug])
    ckpt = Path(checkpoint_dir or CHECKPOINT_ROOT / slug) / CHECKPOINT_NAME
    csv = Path(metrics_dir) / "train" / f"{slug}.csv" if metrics_dir else None
    t0 = time.perf_counter()
    trainer = Trainer(params, kw, examples, cache=cache)
    start = trainer.load_checkpoint(ckpt, run_key)
    if start:
        log.info("resuming %s from step %d (%s)", slug, start, ckpt)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {slug}", disable=not progress, dynamic_ncols=True)
    t_loop = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        loss = trainer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % cfg.log_every == 0:
            window = trainer.losses[-cfg.log_every:]
            (log.debug if progress else log.info)("step %d loss %.4f", step, sum(window) / len(window))
            if log_fn:
                log_fn(step, sum(window) / len(window))
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            trainer.save_checkpoint(ckpt, run_key)
            if csv:
                _write_csv(csv, trainer.losses)
    bar.close()
    loop_s = time.perf_counter() - t_loop
    tail = trainer.losses[-cfg.log_every:]
    summary = TrainSummary(
        slug=slug, keyword=kw.keyword, base_model=params.models.base, steps=cfg.steps, final_loss=trainer.losses[-1],
        final_loss_mean=sum(tail) / len(tail), wall_time_s=round(time.perf_counter() - t0, 3),
        steps_per_s=round((cfg.steps - start) / loop_s, 3) if loop_s > 0 else 0.0, device=trainer.device,
        peak_memory_bytes=_peak_memory(trainer.device), params_hash=phash, dataset_hash=dhash,
        num_images=trainer.n, resumed_from=start, cache=cache, encoded=trainer.encoded)
    meta = {"slug": slug, "keyword": kw.keyword, "class_token": kw.class_token, "rank": str(cfg.rank),
            "alpha": str(cfg.alpha), "base_model": params.models.base, "params_hash": phash,
            "steps": str(cfg.steps), "dataset_hash": dhash}
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a run killed while publishing
        shutil.rmtree(stale, ignore_errors=True)
    with publish_dir(out) as tmp:
        trainer.save_weights(tmp, {META_PREFIX + k: v for k, v in meta.items()})
        trainer.release()
        if cfg.validation_seeds:
            validation_grid(params, kw, tmp).save(tmp / VALIDATION_NAME)
        summary.wall_time_s = round(time.perf_counter() - t0, 3)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8")
    if csv:
        _write_csv(csv, trainer.losses)
    ckpt.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # keep the folder if something else lives there
        ckpt.parent.rmdir()
    log.info("trained %s: %s", slug, summary.as_dict())
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("slug", help="keyword slug (data/keywords.yaml)")
    parser.add_argument("--data", default="data/curated", help="curated data root, holding SLUG/metadata.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: models/loras/SLUG)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: models/.checkpoints/SLUG)")
    parser.add_argument("--metrics", default="metrics", help="metrics root; the loss log goes to METRICS/train/SLUG.csv")
    parser.add_argument("--no-cache", action="store_true", help="encode latents and prompts every step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    from pydantic import ValidationError

    params = load_params(args.params, profile=args.profile)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    if overrides:
        try:
            train_cfg = TrainParams.model_validate({**params.train.model_dump(), **overrides})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"--{err['loc'][0]}: {err['msg']} (got {err.get('input')!r})") from None
        params = params.model_copy(update={"train": train_cfg})
    params.log()
    Registry.load().get(args.slug, field="slug")  # before the slug becomes part of any path
    try:
        summary = train(params, args.slug, Path(args.data), Path(args.out or f"models/loras/{args.slug}"),
                        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
                        metrics_dir=Path(args.metrics), cache=not args.no_cache, progress=not args.no_progress)
    except TrainingError as exc:
        print(f"tipsen train: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()))
    return 0
