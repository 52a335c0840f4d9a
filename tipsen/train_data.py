"""Training data for the LoRA trainer: curated examples, the content-addressed latent and text caches, and the
per-batch model inputs.

Curation writes `data/curated/<slug>/metadata.jsonl`, one JSON object per image. `Inputs` encodes each image
with the VAE once and each prompt with the text encoders once; both results are cached under
`$TIPSEN_HOME/cache/` by a hash of their content and the model, so reruns and resumed runs skip the encoders.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tipsen.errors import ConfigError
from tipsen.io import atomic_path, sha256_json
from tipsen.models import cache_dir, resolve_ref

if TYPE_CHECKING:
    from tipsen.config import Params
    from tipsen.registry import Keyword

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
CACHE_FORMAT = 1  # bump when what is cached changes


@dataclass(frozen=True)
class Example:
    file: Path
    sha256: str
    prompt: str
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the image before curation's crop and resize
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left)

    def time_ids(self, resolution: int) -> list[int]:
        """SDXL micro-conditioning: original size, crop corner, target size."""
        return [*self.original_size, *self.crop_top_left, resolution, resolution]


def _pair(rec: dict, key: str) -> tuple[int, int]:
    value = rec[key]
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)):
        raise ValueError(f"{key} must be two non-negative integers, got {value!r}")
    return value[0], value[1]


def load_examples(data: Path, slug: str, *, resolution: int, prompt_source: str = "template") -> list[Example]:
    """The split=="train" examples of one keyword, each checked to be an RGB square at `resolution`."""
    import hashlib

    root = Path(data) / slug
    meta = root / METADATA
    if not meta.is_file():
        raise ConfigError(f"data: {meta} not found; run 'tipsen curate' (or 'dvc repro curate') first")
    examples = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"data: {meta} line {n}"
        try:
            rec = json.loads(line)
            if rec["split"] != "train":
                continue
            if rec.get("slug", slug) != slug:
                raise ValueError(f"slug {rec['slug']!r} does not match {slug!r}")
            prompt = rec["prompt"] if prompt_source == "template" else rec["text"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"empty {'prompt' if prompt_source == 'template' else 'text'}")
            size, crop = _pair(rec, "original_size"), _pair(rec, "crop_top_left")
            file = (root / str(rec["file_name"])).resolve()
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
        except KeyError as exc:
            raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if root.resolve() not in file.parents or not file.is_file():
            raise ConfigError(f"{where}: file_name {rec['file_name']!r} is not a file inside {root}")
        data_bytes = file.read_bytes()
        with Image.open(io.BytesIO(data_bytes)) as img:
            if img.size != (resolution, resolution) or img.mode != "RGB":
                raise ConfigError(f"{where}: {file.name} is {img.mode} {img.width}x{img.height}; train.resolution "
                                  f"needs RGB {resolution}x{resolution} (curate at the same resolution)")
        examples.append(Example(file, hashlib.sha256(data_bytes).hexdigest(), prompt.strip(), size, crop))
    if not examples:
        raise ConfigError(f"data: {meta} has no split=train images for {slug!r}")
    return examples


def dataset_hash(examples: list[Example]) -> str:
    """What the weights depend on: the image bytes, prompts and micro-conditioning (not file paths)."""
    return sha256_json([[e.sha256, e.prompt, list(e.original_size), list(e.crop_top_left)] for e in examples])


def pixels(files: list[Path]):
    """Images as a float tensor [N, 3, H, W] in [-1, 1]."""
    import torch

    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class TensorCache:
    """Safetensors files addressed by content hash; `root=None` stores nothing (every lookup misses)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.misses = 0

    def key(self, *parts) -> str:
        return sha256_json([CACHE_FORMAT, *parts])

    def get(self, kind: str, key: str):
        from safetensors.torch import load_file

        file = self.root / kind / f"{key}.safetensors" if self.root else None
        if file is not None and file.is_file():
            return load_file(str(file))
        self.misses += 1
        return None

    def put(self, kind: str, key: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        if self.root is None:
            return
        with atomic_path(self.root / kind / f"{key}.safetensors") as tmp:  # concurrent writers write the same bytes
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def latent_dist(vae, batch):
    """The VAE posterior (mean, std) of a pixel batch; the trainer samples from it each step."""
    import torch

    with torch.no_grad():
        dist = vae.encode(batch.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def encode_prompts(pipe, prompts: list[str]):
    """Prompt embeddings and (SDXL) pooled embeddings, exactly as the pipeline computes them at inference."""
    out = pipe.encode_prompt(prompt=prompts, device=pipe.unet.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=False)
    return out[0], (out[2] if len(out) > 2 else None)  # SDXL: (embeds, neg, pooled, neg_pooled); SD: (embeds, neg)


def cached_latents(vae, examples: list[Example], cache: TensorCache, model_key: str, resolution: int):
    """(mean, std) stacked over examples, from the cache or encoded one image at a time."""
    import torch

    means, stds = [], []
    for e in examples:
        key = cache.key("latent", model_key, resolution, e.sha256)
        hit = cache.get("latents", key)
        if hit is None:
            mean, std = latent_dist(vae, pixels([e.file]))
            hit = {"mean": mean[0], "std": std[0]}
            cache.put("latents", key, hit)
        means.append(hit["mean"])
        stds.append(hit["std"])
    return torch.stack(means), torch.stack(stds)


def cached_prompts(pipe, prompts: list[str], cache: TensorCache, model_key: str):
    """Embeddings (and pooled embeddings, or None) per prompt in `prompts`, each distinct prompt encoded once."""
    import torch

    found: dict[str, dict] = {}
    for p in dict.fromkeys(prompts):
        key = cache.key("text", model_key, p)
        hit = cache.get("text", key)
        if hit is None:
            with torch.no_grad():
                embeds, pooled = encode_prompts(pipe, [p])
            hit = {"embeds": embeds[0].float()} | ({"pooled": pooled[0].float()} if pooled is not None else {})
            cache.put("text", key, hit)
        found[p] = hit
    embeds = torch.stack([found[p]["embeds"] for p in prompts])
    pooled = torch.stack([found[p]["pooled"] for p in prompts]) if "pooled" in found[prompts[0]] else None
    return embeds, pooled


def class_images(pipe, prompt: str, *, count: int, resolution: int, steps: int, root: Path) -> list[Example]:
    """DreamBooth prior-preservation images of the bare class, generated by the base model once and kept."""
    import hashlib

    import torch

    files = [root / f"{i:05d}.png" for i in range(count)]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    for start in range(0, len(todo), 4):
        chunk = todo[start:start + 4]
        gens = [torch.Generator("cpu").manual_seed(i) for i in chunk]  # CPU generators: device-independent noise
        with torch.no_grad():
            images = pipe(prompt=[prompt] * len(chunk), generator=gens, num_inference_steps=steps,
                          height=resolution, width=resolution).images
        for i, img in zip(chunk, images):
            with atomic_path(files[i]) as tmp:
                img.convert("RGB").save(tmp, format="PNG")
    log.info("class images: %d cached, %d generated in %s", count - len(todo), len(todo), root)
    return [Example(f, hashlib.sha256(f.read_bytes()).hexdigest(), prompt, (resolution, resolution), (0, 0))
            for f in files]


def autocast(device: str, dtype):
    """Mixed precision when training in a half type; nothing in float32."""
    import torch

    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


class Inputs:
    """One keyword's examples (then, with prior preservation, the class images) as UNet inputs.

    The VAE posteriors and the prompt embeddings are encoded once, from the disk cache when possible; without
    the cache, or for prompts when the text encoders are trained, they are encoded batch by batch."""

    def __init__(self, pipe, params: Params, kw: Keyword, examples: list[Example], *, cache: bool, device: str,
                 dtype, train_text: bool):
        import torch

        cfg = params.train
        self.device, self.dtype, self.train_text = device, dtype, train_text
        store = TensorCache(cache_dir() / "cache" if cache else None)
        model_key = [params.models.base, resolve_ref(params.models.base), device, str(dtype)]
        prior = []
        if cfg.prior_preservation:
            folder = cache_dir() / "cache" / "class_images" / store.key(model_key, kw.class_token, cfg.resolution,
                                                                         cfg.sample_steps)
            prior = class_images(pipe, f"A photo of {kw.class_token}", count=cfg.num_class_images,
                                 resolution=cfg.resolution, steps=cfg.sample_steps, root=folder)
        self.examples = examples + prior
        self.n, self.n_prior = len(examples), len(prior)
        self.prompts = [e.prompt for e in self.examples]
        self.ids = torch.tensor([e.time_ids(cfg.resolution) for e in self.examples], dtype=torch.float32,
                                device=device)
        if pipe.vae.dtype != torch.float32:
            pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in half precision
        self.scale = pipe.vae.config.scaling_factor
        self.shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
        self.mean = self.std = self.embeds = self.pooled = None
        if cache:
            self.mean, self.std = (t.to(device) for t in cached_latents(
                pipe.vae, self.examples, store, model_key, cfg.resolution))
            if not train_text:
                embeds, pooled = cached_prompts(pipe, self.prompts, store, model_key)
                self.embeds = embeds.to(device, dtype)
                self.pooled = pooled.to(device, dtype) if pooled is not None else None
            pipe.vae = None
        self.pipe = pipe if self.embeds is None or self.mean is None else None  # still needed for encoding
        self.encoded = store.misses  # latents and prompts encoded because the cache missed

    def batch(self, idx, generator):
        """Scaled latents (a fresh draw from each posterior, from `generator`), prompt embeddings, pooled
        embeddings (None for SD 1.x/2.x) and time ids for the example indices `idx`."""
        import torch

        on = idx.to(self.device)
        if self.mean is not None:
            mean, std = self.mean[on], self.std[on]
        else:  # no cache: read, decode and encode the images of every batch
            mean, std = latent_dist(self.pipe.vae, pixels([self.examples[i].file for i in idx.tolist()]))
        eps = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = (mean + std * eps - self.shift) * self.scale
        if self.embeds is not None:
            embeds, pooled = self.embeds[on], (self.pooled[on] if self.pooled is not None else None)
        else:  # with gradients when the text encoders are trained
            with autocast(self.device, self.dtype), contextlib.nullcontext() if self.train_text else torch.no_grad():
                embeds, pooled = encode_prompts(self.pipe, [self.prompts[i] for i in idx.tolist()])
        return latents, embeds, pooled, self.ids[on]
