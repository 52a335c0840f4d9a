"""Per-keyword DreamBooth-LoRA: `tipsen train SLUG --data data/curated --out models/loras/SLUG`.

Minimises E_t,eps ||w(t) (eps_theta+psi(x, y, t) - eps)||^2 over LoRA layers psi on the UNet attention
projections, with x the cached VAE latents of a keyword's curated images and y the template prompt. The same
code trains SDXL (micro-conditioning from curation's sizes and crops) and SD 1.x/2.x pipelines.

The model inputs come from `tipsen.train_data.Inputs`. Checkpoints (`tipsen.checkpoint`: LoRA weights, optimizer
and RNG state) live outside the output directory (`tipsen.paths.checkpoint_dir`), because DVC deletes a stage's
outputs before rerunning it; a rerun with the same run key resumes from the last one, bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tipsen import checkpoint, paths
from tipsen import train_data as td
from tipsen.bank import META_PREFIX, SUMMARY_NAME, WEIGHTS_NAME
from tipsen.config import Params, TrainParams, load_params
from tipsen.errors import ConfigError
from tipsen.io import exclusive, publish_dir, sha256_file, sha256_json, sweep_stale
from tipsen.live import log_step, open_live
from tipsen.lora_batch import expected_warnings_quiet
from tipsen.models import load_base, resolve_device
from tipsen.registry import Keyword, Registry

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
VALIDATION_NAME = "validation.png"
PREVIEWS_NAME = "previews.png"  # beside the adapter: a row per train.preview_every steps
PREVIEWS_DIR = "previews"  # beside the checkpoint: the rows so far
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
    init_from: str | None = None  # the adapter it continued from: file name and sha256

    def as_dict(self) -> dict:
        return asdict(self)


# Train params that change how a run is logged, checkpointed or previewed, never its weights.
NOT_IN_WEIGHTS = frozenset({"checkpoint_every", "log_every", "validation_seeds", "preview_every"})
# Train params added after adapters were first published: at their defaults they leave the hash as it was, so
# upgrading tipsen marks no adapter stale.
ADDED_LATER = ("lr_scheduler", "lr_warmup_steps", "gradient_accumulation_steps")


def params_hash(params: Params) -> str:
    """What an adapter's weights depend on besides its data: changing anything else retrains nothing."""
    train = params.train.model_dump(mode="json", exclude=set(NOT_IN_WEIGHTS))
    for key in ADDED_LATER:
        if train[key] == TrainParams.model_fields[key].default:
            del train[key]
    return sha256_json({"train": train, "base": params.models.base, "pipeline_class": params.models.pipeline_class})


def learning_rates(cfg: TrainParams) -> list[float]:
    """The learning rate of each of `cfg.steps` optimizer steps under `train.lr_scheduler`, from diffusers'
    get_scheduler (on a stand-in parameter: the schedule depends only on the step)."""
    import torch
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    schedule = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=cfg.steps)
    rates = []
    for _ in range(cfg.steps):
        rates.append(float(opt.param_groups[0]["lr"]))
        opt.step()  # no gradient, so nothing moves; torch expects it before each schedule step
        schedule.step()
    return rates


def _precision(cfg: TrainParams, device: str) -> str:
    return ("bf16" if device == "cuda" else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision


class Trainer:
    """One keyword's training state: frozen base, LoRA layers, optimizer, cached inputs and RNG."""

    def __init__(self, params: Params, kw: Keyword, examples: list[td.Example], *, cache: bool = True, pipe=None,
                 init_from: Path | None = None):
        """`pipe`: an already loaded pipeline in the training dtype (the GPU benchmark builds SDXL at random);
        `init_from`: an adapter file (diffusers or kohya layout, the same rank) to start from instead of a fresh
        initialisation."""
        import torch
        from diffusers import DDPMScheduler
        from diffusers.training_utils import free_memory

        self.cfg = cfg = params.train
        self.device = resolve_device(params.models.device)
        self.precision = _precision(cfg, self.device)
        dtype = self.dtype_name = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision]
        self.dtype = getattr(torch, dtype)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)  # all sampling on the CPU: device-independent
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
            torch.cuda.reset_peak_memory_stats()
        pipe = pipe or load_base(params, device=self.device, dtype=dtype)
        self.pipe_cls, self.unet = type(pipe), pipe.unet
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"models.base: prediction_type {self.scheduler.config.prediction_type!r} is not "
                              "supported for training; allowed: epsilon, v_prediction")
        self.text_time = self.unet.config.addition_embed_type == "text_time"  # SDXL-style micro-conditioning
        self.text_encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2")
                              if getattr(pipe, n, None) is not None and cfg.train_text_encoder}
        self.data = td.Inputs(pipe, params, kw, examples, cache=cache, device=self.device, dtype=self.dtype,
                              train_text=bool(self.text_encoders))
        self.n, self.encoded = self.data.n, self.data.encoded
        del pipe  # kept only in self.data, and only while batches still encode with it
        free_memory()
        self._add_lora(cfg)
        if init_from is not None:
            self._load_adapter(Path(init_from))
        self.opt = torch.optim.AdamW([p for _, p in self.named], lr=cfg.learning_rate,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                     eps=cfg.adam_epsilon)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.precision == "fp16")
        self.rates = learning_rates(cfg)  # step i's rate is rates[i - 1]: resuming at any step needs no state
        self.step_no, self.losses = 0, []

    @property
    def pipe(self):
        """The pipeline while batches still need its encoders (no cache, or trained text encoders), else None."""
        return self.data.pipe

    def _add_lora(self, cfg: TrainParams) -> None:
        import torch
        from diffusers.training_utils import cast_training_params
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
        cast_training_params(list(self.modules.values()))  # trainable LoRA weights in fp32 under a half base
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

    def _loss(self, pred, target, t):
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        if self.cfg.loss_weighting == "min_snr":
            snr = compute_snr(self.scheduler, t)
            w = snr.clamp(max=self.cfg.snr_gamma)  # min(SNR, gamma), Hang et al. 2023
            loss = loss * (w / snr if self.scheduler.config.prediction_type == "epsilon" else w / (snr + 1))
        return loss.mean()

    def preview(self, params: Params, kw: Keyword):
        """One row of pictures from the adapter as it is now: the validation seeds at the serving scale. The
        pipeline is built around the training UNet (its VAE and text encoders loaded for the moment), with its
        own generators, so the run's random state and its resume are untouched."""
        import torch
        from diffusers.training_utils import free_memory
        from PIL import Image

        cfg, seeds = self.cfg, self.cfg.validation_seeds
        pipe = load_base(params, device=self.device, dtype=self.dtype_name, unet=self.unet)
        self.unet.eval()
        try:
            with torch.no_grad(), td.autocast(self.device, self.dtype):
                images = pipe(prompt=[kw.prompt] * len(seeds), num_inference_steps=cfg.sample_steps,
                              height=cfg.resolution, width=cfg.resolution, guidance_scale=VALIDATION_GUIDANCE,
                              cross_attention_kwargs={"scale": params.generate.lora_scale},
                              generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
        finally:
            self.unet.train()
            del pipe
            free_memory()
        r = cfg.resolution
        row = Image.new("RGB", (r * len(seeds), r))
        for col, image in enumerate(images):
            row.paste(image.resize((r, r)), (col * r, 0))
        return row

    def _load_adapter(self, file: Path) -> None:
        """Start from the UNet LoRA in `file`: read as the bank store reads it (diffusers' layout or a kohya/A1111
        file, tipsen.store.lora_updates), its update rescaled to this run's alpha/rank so that the starting adapter
        draws what it drew."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from tipsen.store import PeftOnly, Unavailable, lora_updates, map_safetensors

        what = f"--init-from {file.name}"
        try:
            header, tensors, _ = map_safetensors(file)
            updates = lora_updates(self.pipe_cls, tensors, header)
        except (Unavailable, PeftOnly) as exc:  # not safetensors, or not a LoRA this trainer can continue
            raise ConfigError(f"{what}: not a LoRA adapter diffusers can read ({exc})") from None
        if other := sorted({m.split(".")[0] for m in updates} - {"unet"}):
            raise ConfigError(f"{what}: only UNet adapters can be continued; it also holds {', '.join(other)}")
        ranks = {a.shape[0] for a, _, _ in updates.values()}
        if ranks != {self.cfg.rank}:
            raise ConfigError(f"{what}: rank {', '.join(map(str, sorted(ranks)))}; train.rank is {self.cfg.rank} "
                              "(continued training keeps the rank)")
        scaling = self.cfg.alpha / self.cfg.rank  # this run's: B is stored so that B * scaling is the same update
        state = {}
        for module, (a, b, scale) in updates.items():
            name = module.removeprefix("unet.")
            state[f"{name}.lora_A.weight"] = a.clone()
            state[f"{name}.lora_B.weight"] = b * (scale / scaling)
        expected = set(get_peft_model_state_dict(self.unet))
        if differ := sorted(expected ^ set(state)):
            raise ConfigError(f"{what}: its layers are not train.target_modules' ({len(differ)} differ, e.g. "
                              f"{differ[0]})")
        set_peft_model_state_dict(self.unet, state)  # copied into the fp32 trainable weights in place

    def step(self) -> float:
        """One optimizer step over `train.gradient_accumulation_steps` batches at this step's learning rate;
        returns the mean loss, or raises TrainingError on a NaN or inf loss."""
        import torch

        cfg, micro = self.cfg, self.cfg.gradient_accumulation_steps
        for group in self.opt.param_groups:  # past train.steps (a benchmark's extra steps) the last rate holds
            group["lr"] = self.rates[min(self.step_no, len(self.rates) - 1)]
        value = 0.0
        for _ in range(micro):
            loss = self._batch_loss()
            value += loss.item() / micro
            if not np.isfinite(value):
                raise TrainingError(f"step {self.step_no + 1}: loss is {loss.item()}; the run diverged "
                                    f"(train.learning_rate is {cfg.learning_rate}; try a lower one)")
            self.scaler.scale(loss / micro if micro > 1 else loss).backward()  # gradients sum over the batches
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.losses.append(value)
        return value

    def _batch_loss(self):
        """The loss of one freshly drawn batch (images, noise and timesteps from the trainer's generator)."""
        import torch

        cfg, bs, g = self.cfg, self.cfg.batch_size, self.gen
        idx = torch.randint(self.n, (bs,), generator=g)
        if self.data.n_prior:  # instance and class examples in one batch, as in the DreamBooth paper
            idx = torch.cat([idx, self.n + torch.randint(self.data.n_prior, (bs,), generator=g)])
        latents, embeds, pooled, ids = self.data.batch(idx, g)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(latents, noise, t)
        dtype = self.dtype
        extra = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}} \
            if self.text_time else {}
        with td.autocast(self.device, dtype):
            pred = self.forward(noisy.to(dtype), t, encoder_hidden_states=embeds.to(dtype), return_dict=False,
                                **extra)[0]
        if self.data.n_prior:
            return self._loss(pred[:bs], target[:bs], t[:bs]) + \
                cfg.prior_loss_weight * self._loss(pred[bs:], target[bs:], t[bs:])
        return self._loss(pred, target, t)

    # ------------------------------------------------------------ checkpoints

    def _state(self) -> dict:
        return {"params": self.named, "optimizer": self.opt, "scaler": self.scaler, "generator": self.gen}

    def save_checkpoint(self, path: Path, run_key: str) -> None:
        checkpoint.save(path, run_key=run_key, step=self.step_no, losses=self.losses, **self._state())

    def load_checkpoint(self, path: Path, run_key: str) -> int:
        """Restore a checkpoint of the same run; returns its step, or 0 (and removes it) if it is another run's."""
        step, losses = checkpoint.load(path, run_key=run_key, **self._state())
        if step:
            self.step_no, self.losses = step, losses
        return step

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
        from diffusers.training_utils import free_memory

        for name in ("unet", "forward", "data", "opt", "modules", "named", "text_encoders"):
            self.__dict__.pop(name, None)
        free_memory()


def validation_grid(params: Params, kw: Keyword, weights: Path):
    """Rows: the base model, then base + LoRA at the serving scale (`generate.lora_scale`, as the service draws
    it); columns: `train.validation_seeds`, same seeds in both rows."""
    import torch
    from diffusers.training_utils import free_memory
    from PIL import Image

    cfg, seeds = params.train, params.train.validation_seeds
    pipe = load_base(params)
    kwargs = dict(prompt=[kw.prompt] * len(seeds), num_inference_steps=cfg.sample_steps, height=cfg.resolution,
                  width=cfg.resolution, guidance_scale=VALIDATION_GUIDANCE)
    with torch.no_grad():
        base = pipe(generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kwargs).images
        with expected_warnings_quiet():  # the published file, through the stock loader
            pipe.load_lora_weights(str(weights), adapter_name=kw.slug, use_safetensors=True)
        pipe.set_adapters([kw.slug], [params.generate.lora_scale])
        tuned = pipe(generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kwargs).images
    r = cfg.resolution
    grid = Image.new("RGB", (r * len(seeds), 2 * r))
    for col, (a, b) in enumerate(zip(base, tuned)):
        grid.paste(a.resize((r, r)), (col * r, 0))
        grid.paste(b.resize((r, r)), (col * r, r))
    del pipe
    free_memory()
    return grid


def _canonical(blob: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: the writer emits metadata in hash-map order, so
    the same tensors and metadata could otherwise give different bytes."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _peak_memory(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(params: Params, slug: str, data: Path, out: Path, *, checkpoint_dir: Path | None = None,
          metrics_dir: Path | None = None, cache: bool = True, progress: bool = True,
          log_fn: Callable[[int, float], None] | None = None, init_from: Path | None = None) -> TrainSummary:
    """Train one keyword's LoRA on `data/<slug>` and publish it atomically at `out`.

    `checkpoint_dir` defaults to `paths.checkpoint_dir(out)` (models/loras/x -> models/.checkpoints/x);
    `metrics_dir` (if given) receives the dvclive log train/<slug>/ (loss and learning rate per step, the summary,
    the validation grid); `log_fn(step, mean loss)` is called every
    `train.log_every` steps; `init_from` is an adapter file to continue from (`Trainer`). A second run into the same
    `out` while one is running fails at once, naming it.
    """
    cfg, out = params.train, Path(out)
    kw = Registry.load().get(slug, field="slug")
    with exclusive(paths.checkpoint_dir(out).parent / f"{out.name}.lock", what=f"train {slug} into {out}"):
        sweep_stale(out)  # what a killed run of this same output left; only its own
        return _train(params, kw, data, out, checkpoint_dir=checkpoint_dir, metrics_dir=metrics_dir, cache=cache,
                      progress=progress, log_fn=log_fn, init_from=Path(init_from) if init_from else None)


def _train(params: Params, kw: Keyword, data: Path, out: Path, *, checkpoint_dir, metrics_dir, cache, progress,
           log_fn, init_from) -> TrainSummary:
    from tqdm import tqdm

    cfg, slug = params.train, kw.slug
    examples = td.load_examples(Path(data), slug, resolution=cfg.resolution, prompt_source=cfg.prompt_source)
    phash, dhash = params_hash(params), td.dataset_hash(examples)
    init = f"{init_from.name} sha256:{sha256_file(init_from)}" if init_from else None  # before it can change
    run_key = sha256_json([phash, dhash, params.models.base, slug, *([init] if init else [])])
    ckpt = Path(checkpoint_dir or paths.checkpoint_dir(out)) / CHECKPOINT_NAME
    t0 = time.perf_counter()
    live = open_live(Path(metrics_dir) / "train" / slug, what="the training log (--metrics)") if metrics_dir else None
    trainer = Trainer(params, kw, examples, cache=cache, init_from=init_from)
    start = trainer.load_checkpoint(ckpt, run_key)
    if start:
        log.info("resuming %s from step %d (%s)", slug, start, ckpt)
    for step, value in enumerate(trainer.losses if live else [], 1):  # a resumed run's log is the checkpoint's
        log_step(live, step, loss=value, lr=trainer.rates[step - 1])
    previews = _previews(ckpt.parent / PREVIEWS_DIR, start, live)
    every = cfg.preview_every if cfg.validation_seeds else 0
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {slug}", disable=not progress, dynamic_ncols=True)
    t_loop = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        loss = trainer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if live:
            log_step(live, step, loss=loss, lr=trainer.rates[step - 1])
        if step % cfg.log_every == 0:
            window = trainer.losses[-cfg.log_every:]
            (log.debug if progress else log.info)("step %d loss %.4f", step, sum(window) / len(window))
            if log_fn:
                log_fn(step, sum(window) / len(window))
        if every and step % every == 0 and step < cfg.steps:
            row = trainer.preview(params, kw)
            previews.mkdir(parents=True, exist_ok=True)
            row.save(previews / f"{step:07d}.png")  # kept beside the checkpoint, for a resumed run's grid
            if live:
                live.log_image(f"previews/{step}.png", row)  # dvclive's slider: one image per step
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            trainer.save_checkpoint(ckpt, run_key)
    bar.close()
    loop_s = time.perf_counter() - t_loop
    tail = trainer.losses[-cfg.log_every:]
    summary = TrainSummary(
        slug=slug, keyword=kw.keyword, base_model=params.models.base, steps=cfg.steps, final_loss=trainer.losses[-1],
        final_loss_mean=sum(tail) / len(tail), wall_time_s=round(time.perf_counter() - t0, 3),
        steps_per_s=round((cfg.steps - start) / loop_s, 3) if loop_s > 0 else 0.0, device=trainer.device,
        peak_memory_bytes=_peak_memory(trainer.device), params_hash=phash, dataset_hash=dhash,
        num_images=trainer.n, resumed_from=start, cache=cache, encoded=trainer.encoded, init_from=init)
    meta = {"slug": slug, "keyword": kw.keyword, "class_token": kw.class_token, "rank": str(cfg.rank),
            "alpha": str(cfg.alpha), "base_model": params.models.base, "params_hash": phash,
            "steps": str(cfg.steps), "resolution": str(cfg.resolution), "dataset_hash": dhash,
            **({"init_from": init} if init else {})}
    with publish_dir(out) as tmp:
        trainer.save_weights(tmp, {META_PREFIX + k: v for k, v in meta.items()})
        trainer.release()
        if cfg.validation_seeds:
            validation_grid(params, kw, tmp).save(tmp / VALIDATION_NAME)
        if rows := sorted(previews.glob("*.png")):
            _stack(rows).save(tmp / PREVIEWS_NAME)
        summary.wall_time_s = round(time.perf_counter() - t0, 3)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8")
    if live:
        live.log_metric("loss_mean", summary.final_loss_mean, plot=False)  # over the last train.log_every steps
        if (out / VALIDATION_NAME).is_file():
            live.log_image(VALIDATION_NAME, out / VALIDATION_NAME)
        (Path(live.plots_dir) / "images").mkdir(exist_ok=True)  # a dvc.yaml output, empty without validation seeds
        live.end()
    checkpoint.remove(ckpt)
    shutil.rmtree(previews, ignore_errors=True)
    with contextlib.suppress(OSError):  # keep the folder if something else lives there
        ckpt.parent.rmdir()
    log.info("trained %s: %s", slug, summary.as_dict())
    return summary


def _previews(folder: Path, start: int, live) -> Path:
    """The folder of a run's preview rows: those of steps up to `start` (a resume) are kept and logged again, any
    later or another run's are removed."""
    for row in sorted(folder.glob("*.png")):  # none when the folder does not exist
        step = int(row.stem)
        if step > start:
            row.unlink()
        elif live:
            live.log_image(f"previews/{step}.png", row)
    return folder


def _stack(rows: list[Path]):
    """Preview rows, oldest at the top, as one image."""
    from PIL import Image

    images = [Image.open(r).convert("RGB") for r in rows]
    grid = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)))
    y = 0
    for image in images:
        grid.paste(image, (0, y))
        y += image.height
    return grid


def start_adapter(value: str, *, bank: Path, registry: Registry) -> Path:
    """The adapter file `--init-from` names: a keyword slug is its verified bank adapter; anything else is a file,
    or a folder holding pytorch_lora_weights.safetensors."""
    if value in registry.keywords:
        from tipsen.bank import Bank

        index = Bank(bank)
        if (reason := index.reason(value)) is not None:
            raise ConfigError(f"--init-from {value}: the bank's adapter cannot be used: {reason}")
        return index.entries[value].path
    path = Path(value)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--init-from {value}: neither a keyword slug nor an adapter file (or a folder holding "
                          f"{WEIGHTS_NAME})")
    if file.suffix != ".safetensors":
        raise ConfigError(f"--init-from {value}: adapters are read from .safetensors files only")
    return file


def add_arguments(parser) -> None:
    parser.add_argument("slug", help="keyword slug (data/keywords.yaml)")
    parser.add_argument("--data", default="data/curated", help="curated data root, holding SLUG/metadata.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: models/loras/SLUG)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint folder (default: models/.checkpoints/NAME for --out models/loras/NAME)")
    parser.add_argument("--metrics", default=None,
                        help="metrics root; the dvclive log goes to METRICS/train/SLUG/ (default: no log)")
    parser.add_argument("--init-from", default=None, metavar="SLUG_OR_PATH",
                        help="continue from an adapter: a bank slug (--bank), or a file or folder in the diffusers "
                             "or kohya layout, of the same rank (default: a fresh initialisation)")
    parser.add_argument("--bank", default=str(paths.BANK), help=f"the bank --init-from SLUG reads (default: {paths.BANK})")
    parser.add_argument("--no-cache", action="store_true", help="encode latents and prompts every step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    params = load_params(args.params, profile=args.profile)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    if overrides:
        params = params.override("train", overrides, flags=True)
    params.log()
    registry = Registry.load()
    registry.get(args.slug, field="slug")  # before the slug becomes part of any path
    init_from = start_adapter(args.init_from, bank=Path(args.bank), registry=registry) if args.init_from else None
    try:
        summary = train(params, args.slug, Path(args.data), Path(args.out or paths.LORAS / args.slug),
                        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
                        metrics_dir=Path(args.metrics) if args.metrics else None, cache=not args.no_cache,
                        progress=not args.no_progress, init_from=init_from)
    except TrainingError as exc:
        print(f"tipsen train: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()))
    return 0
