"""Generation: route a senior's words to a keyword, pick its LoRA from the bank, and sample.

`Generator` loads one pipeline and every adapter of the bank once. `generate_batch` runs all requests that
share steps, size and guidance as one diffusion batch whatever their keywords and LoRA scales (see
tipsen.lora_batch); only those parameters split a batch. The CLI, the evaluation and the HTTP service call it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tipsen import paths
from tipsen.config import Params, load_params
from tipsen.errors import ConfigError
from tipsen.registry import Registry, Route, normalize

log = logging.getLogger(__name__)


class GenerationRequest(BaseModel):
    """One caller's request. None takes the value from params (sizes: the model's native size)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    keyword: str | None = Field(None, max_length=64)  # a bank slug; None: routed from the prompt
    seed: int | None = Field(None, ge=0, lt=2**63)  # None: drawn at random and reported
    steps: int | None = Field(None, ge=1, le=50)
    guidance: float | None = Field(None, ge=0.0, le=20.0)
    lora_scale: float | None = Field(None, ge=0.0, le=2.0)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    num_images: int = Field(1, ge=1, le=4)
    assist: bool = False
    use_lora: bool = True  # False: the base model only, as evaluation's baseline needs


@dataclass
class GenerationResult:
    images: list  # PIL images
    metadata: dict[str, Any]


@dataclass
class _Plan:
    """A validated request, routed and prompted, waiting for its diffusion batch."""

    req: GenerationRequest
    route: Route
    prompt: str
    seed: int
    adapter: str | None
    refined: dict | None
    refine_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:  # requests with equal keys share one diffusion batch
        return self.req.steps, self.req.width, self.req.height, self.req.guidance


def as_request(req: GenerationRequest | dict) -> GenerationRequest:
    """A request from a dict, with pydantic's first error as one line naming the field and its bounds."""
    if isinstance(req, GenerationRequest):
        return req
    try:
        return GenerationRequest.model_validate(req)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(map(str, err["loc"])) or "request"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{loc}: unknown field; allowed: {', '.join(GenerationRequest.model_fields)}") from None
        raise ConfigError(f"{loc}: {err['msg']} (got {err.get('input')!r})") from None


class Generator:
    def __init__(self, params: Params, *, base: str | None = None, bank: str | Path | None = None,
                 assistant=None, registry: Registry | None = None):
        from tipsen.bank import Bank
        from tipsen.lora_batch import components, load_adapters
        from tipsen.models import load_pipeline

        self.cfg = params.generate
        self.base = base or params.models.base
        self.registry = registry or Registry.load()
        self.assistant = assistant  # anything with refine(prompt, keyword=, seed=) -> .prompt, .model_dump()
        self.pipe = load_pipeline(self.base, pipeline_class=params.models.pipeline_class,
                                  device=params.models.device, dtype=params.models.dtype)
        self.modules = components(self.pipe)
        sample = self.pipe.unet.config.sample_size
        self.native = (sample if isinstance(sample, int) else sample[0]) * self.pipe.vae_scale_factor
        self.bank_path, self.bank_error, self.entries, self.reasons = Path(bank or paths.BANK), None, {}, {}
        try:
            index = Bank(self.bank_path)
        except ConfigError as exc:  # no bank yet: the base model still serves, and status() says why
            self.bank_error = str(exc)
            log.warning("%s; generating with the base model only", exc)
        else:
            self.entries = index.entries
            self.reasons = load_adapters(self.pipe, index, set(self.registry.keywords))
        self.available = sorted(slug for slug, reason in self.reasons.items() if reason is None)
        self._fused: tuple[str, float] | None = None
        self._lock = threading.Lock()  # one pipeline: diffusion batches run one at a time
        log.info("generator ready: %s, %d/%d adapters", self.base, len(self.available), len(self.reasons))

    def status(self) -> dict:
        return {
            "base_model": self.base, "pipeline": type(self.pipe).__name__, "device": str(self.pipe.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."), "native_size": self.native,
            "bank": {"path": str(self.bank_path), "error": self.bank_error},
            "fuse_lora": self.cfg.fuse_lora, "fused": self._fused[0] if self._fused else None,
            "adapters": {slug: {"available": reason is None, "reason": reason, "keyword": self.entries[slug].keyword,
                                "ko": self.entries[slug].ko, "class_token": self.entries[slug].class_token}
                         for slug, reason in self.reasons.items()},
        }

    def route(self, text: str, keyword: str | None = None) -> Route:
        """An explicit keyword wins; else the longest registry name or alias found in the text; else none."""
        return self.registry.route(text, explicit=keyword)

    def validate(self, req: GenerationRequest | dict) -> GenerationRequest:
        """The request with every default resolved, or a ConfigError naming the field and what is allowed."""
        return self._validate(req)[0]

    def _validate(self, req) -> tuple[GenerationRequest, list[str]]:
        req, cfg, notes = as_request(req), self.cfg, []
        prompt = req.prompt.strip()
        if not prompt:
            raise ConfigError(f"prompt: empty; allowed: 1 to {cfg.max_prompt_chars} characters")
        if len(prompt) > cfg.max_prompt_chars:
            notes.append(f"prompt truncated from {len(prompt)} to {cfg.max_prompt_chars} characters")
            log.warning(notes[-1])
            prompt = prompt[:cfg.max_prompt_chars]
        if req.keyword:
            self.registry.get(req.keyword)  # unknown: a ConfigError listing the valid slugs
        sizes = {}
        for name in ("width", "height"):
            value = getattr(req, name) or getattr(cfg, name) or self.native
            if value % 8 or not cfg.min_size <= value <= cfg.max_size:
                problem = "is not a multiple of 8" if value % 8 else "is out of bounds"
                raise ConfigError(f"{name}: {value} {problem}; allowed: multiples of 8 from {cfg.min_size} "
                                  f"to {cfg.max_size}")
            sizes[name] = value
        return req.model_copy(update=dict(
            prompt=prompt, keyword=req.keyword or None, steps=req.steps or cfg.steps,
            guidance=cfg.guidance if req.guidance is None else req.guidance,
            lora_scale=cfg.lora_scale if req.lora_scale is None else req.lora_scale, **sizes)), notes

    def _with_keyword(self, words: str, slug: str | None) -> str:
        """The paper's "A photo of [keyword] [class]", then the caller's own words (unless they already hold both)."""
        if slug is None:
            return words
        kw, have = self.registry[slug], normalize(words)
        if normalize(kw.keyword) in have and normalize(kw.class_token) in have:
            return words
        return f"{kw.prompt}, {words}"

    def _plan(self, req: GenerationRequest, notes: list[str]) -> _Plan:
        route = self.route(req.prompt, req.keyword)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        t, refined = time.perf_counter(), None
        if req.assist and self.assistant is not None:
            result = self.assistant.refine(req.prompt, keyword=route.slug, seed=seed)
            prompt, refined = result.prompt, result.model_dump()
        else:
            if req.assist:
                notes.append("assist requested but no assistant is loaded; the template prompt is used")
            prompt = self._with_keyword(req.prompt, route.slug)
        adapter = route.slug if route.slug in self.available and req.use_lora else None
        if route.slug and req.use_lora and adapter is None:
            why = self.reasons.get(route.slug) or self.bank_error or "not in the bank"
            notes.append(f"no LoRA for {route.slug} ({why}); the base model is used")
        return _Plan(req, route, prompt, seed, adapter, refined, time.perf_counter() - t, notes)

    def generate(self, req: GenerationRequest | dict) -> GenerationResult:
        return self.generate_batch([req])[0]

    def generate_batch(self, reqs: list[GenerationRequest | dict]) -> list[GenerationResult]:
        """One diffusion batch per (steps, size, guidance), at most generate.max_batch_size images each."""
        t0 = time.perf_counter()
        plans = [self._plan(*self._validate(r)) for r in reqs]
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(plan.key, []).extend((i, j) for j in range(plan.req.num_images))
        images, diffusion, done = {}, [0.0] * len(plans), [0.0] * len(plans)
        with self._lock:
            for key, jobs in groups.items():
                for k in range(0, len(jobs), self.cfg.max_batch_size):
                    chunk = jobs[k:k + self.cfg.max_batch_size]
                    t = time.perf_counter()
                    out = self._diffuse(key, [(plans[i], j) for i, j in chunk])
                    images.update(zip(chunk, out))
                    for i in {i for i, _ in chunk}:
                        diffusion[i] += time.perf_counter() - t
                        done[i] = time.perf_counter() - t0
        return [GenerationResult([images[i, j] for j in range(p.req.num_images)], self._metadata(p, {
            "queue": done[i] - diffusion[i] - p.refine_s, "refine": p.refine_s, "diffusion": diffusion[i],
            "total": done[i]})) for i, p in enumerate(plans)]

    def _diffuse(self, key: tuple, jobs: list[tuple[_Plan, int]]) -> list:
        import torch

        from tipsen.lora_batch import fuse, per_sample, unfuse

        steps, width, height, guidance = key
        names = [p.adapter for p, _ in jobs]
        scales = [p.req.lora_scale if p.adapter else 0.0 for p, _ in jobs]
        if self.cfg.fuse_lora and names[0] and len(set(zip(names, scales))) == 1:
            if self._fused != (names[0], scales[0]):  # fused weights serve only the one keyword they hold
                unfuse(self.modules)
                fuse(self.modules, names[0], scales[0])
                self._fused = (names[0], scales[0])
            hooks = nullcontext()
        else:
            if self._fused:
                unfuse(self.modules)
                self._fused = None
            hooks = per_sample(self.modules, names, scales)
        # One CPU generator per image: its noise is the same alone or in any batch, on any device.
        generators = [torch.Generator("cpu").manual_seed(p.seed + j) for p, j in jobs]
        negative = [self.cfg.negative_prompt] * len(jobs) if self.cfg.negative_prompt else None
        with hooks:
            out = self.pipe(prompt=[p.prompt for p, _ in jobs], negative_prompt=negative, num_inference_steps=steps,
                            guidance_scale=guidance, width=width, height=height, generator=generators,
                            output_type="np")
        return self.pipe.numpy_to_pil(out.images)

    def _metadata(self, p: _Plan, timings: dict[str, float]) -> dict[str, Any]:
        r = p.req
        return {
            "keyword": p.route.slug, "route": p.route.as_dict(), "input": r.prompt, "prompt": p.prompt,
            "refined": p.refined, "seed": p.seed, "steps": r.steps, "guidance": r.guidance,
            "lora_scale": r.lora_scale if p.adapter else None, "width": r.width, "height": r.height,
            "num_images": r.num_images, "model": self.base, "adapter": p.adapter,
            "timings": {k: round(max(v, 0.0), 4) for k, v in timings.items()}, "warnings": p.notes,
        }


def save_png(image, path: Path, metadata: dict) -> Path:
    """Write a PNG atomically, with the generation metadata in an iTXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("tipsen", json.dumps(metadata, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def _assistant(params: Params, registry: Registry):
    try:
        from tipsen.assistant import Assistant
    except ModuleNotFoundError as exc:
        if exc.name != "tipsen.assistant":
            raise
        raise ConfigError("--assist: the Senior Prompting Assistant is unavailable in this installation") from None
    return Assistant.from_params(params, registry=registry)


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help="the senior's own words, in Korean or English")
    parser.add_argument("--out", required=True, type=Path,
                        help="PNG to write; with --num-images N, OUT-0.png ... OUT-(N-1).png")
    parser.add_argument("--keyword", help="bank keyword slug (default: routed from the prompt)")
    parser.add_argument("--seed", type=int, help="default: random, and reported")
    parser.add_argument("--assist", action="store_true", help="refine the prompt with the prompting assistant")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--lora-scale", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--no-lora", action="store_true", help="the base model only")
    parser.add_argument("--bank", default=str(paths.BANK), help=f"bank index (default: {paths.BANK})")


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    params.log()
    fields = dict(prompt=args.prompt, keyword=args.keyword, seed=args.seed, steps=args.steps, guidance=args.guidance,
                  lora_scale=args.lora_scale, width=args.width, height=args.height, num_images=args.num_images,
                  assist=args.assist, use_lora=not args.no_lora)
    req = as_request({k: v for k, v in fields.items() if v is not None})  # bad input fails before loading
    registry = Registry.load()
    if req.keyword:
        registry.get(req.keyword)
    assistant = _assistant(params, registry) if args.assist else None
    generator = Generator(params, bank=args.bank, assistant=assistant, registry=registry)
    result = generator.generate(req)
    out: Path = args.out
    paths = [out] if len(result.images) == 1 else \
        [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(result.images))]
    files = [str(save_png(image, path, result.metadata)) for image, path in zip(result.images, paths)]
    print(json.dumps({**result.metadata, "files": files}, ensure_ascii=False, indent=2))
    return 0
