"""Generation: route a senior's words to a keyword, pick its LoRA from the bank, and sample.

Two steps. `Generator.resolve(request)` validates a request once and settles everything about it (defaults,
sizes, the keyword and its adapter, the seed, the assistant's prompt) into a frozen `Plan`. `Generator.render(plans)`
only batches and diffuses: every plan that shares steps, size and guidance runs in one diffusion batch whatever its
keyword and LoRA scale (see tipsen.lora_batch). The CLI and the service resolve requests; the evaluation builds its
plans directly, with the protocol's exact prompt, adapter and seed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tipsen import paths
from tipsen.config import Guidance, LoraScale, NumImages, Params, Seed, Size, Slug, Steps, draw_seed, load_params
from tipsen.errors import ConfigError, NoTopic, first_error
from tipsen.io import write_bytes_atomic
from tipsen.registry import NO_ROUTE, Registry, Route, normalize
from tipsen.routing import HANGUL

log = logging.getLogger(__name__)

# The samplers a request may name: diffusers' scheduler class and settings, and the name AUTOMATIC1111 shows.
# None (the default) keeps the model's own scheduler.
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                        "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
}
Sampler = Literal[tuple(SAMPLERS)]
# The page's three picture shapes: SDXL's own trained sizes (its aspect buckets), scaled to another model's native
# size by Generator.shapes.
SHAPES = {"square": (1024, 1024), "landscape": (1216, 832), "portrait": (832, 1216)}
SDXL_NATIVE = 1024


class PictureRequest(BaseModel):
    """One picture's request. None takes the value from params (sizes: generate.width/height, else native)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str  # the senior's own words; generate.max_prompt_chars at most (longer is cut, with a warning)
    keyword: Slug | None = None  # a bank slug; None: routed from the prompt
    # bank slugs the caller chose, the first drawn ([] for none: the senior took every routed one back);
    # generate.max_keywords at most; not with `keyword`
    keywords: list[Slug] | None = Field(None, max_length=8)
    seed: Seed | None = None  # None: drawn at random and reported
    steps: Steps | None = None
    guidance: Guidance | None = None
    lora_scale: LoraScale | None = None
    width: Size | None = None
    height: Size | None = None
    assist: bool = False  # rewrite the prompt with the Senior Prompting Assistant
    use_lora: bool = True  # False: the base model only, even for a keyword with an adapter
    negative_prompt: str | None = None  # None: generate.negative_prompt; "" for none
    sampler: Sampler | None = None  # None: the model's own scheduler


class GenerationRequest(PictureRequest):
    num_images: NumImages = 1


@dataclass(frozen=True)
class Plan:
    """A request with everything resolved: what `render` draws, and nothing it still has to look up or check."""

    prompt: str  # what the pipeline sees
    seed: int  # image j of the plan uses seed + j
    steps: int
    guidance: float
    width: int
    height: int
    adapter: str | None = None  # a loaded bank slug; None: the base model alone
    lora_scale: float = 0.0  # applied only with an adapter
    negative_prompt: str = ""
    sampler: str | None = None  # a SAMPLERS name; None: the model's own scheduler
    num_images: int = 1
    input: str = ""  # the caller's own words
    route: Route = NO_ROUTE  # how the keyword was chosen
    use_lora: bool = True  # False: no adapter, whatever the route
    assist: bool = False  # the assistant is to rewrite `prompt` (Generator.refine); done once `refined` is set
    refined: dict | None = None  # the assistant's record (backend, attempts, fallback reason, ...)
    refine_s: float = 0.0
    notes: tuple[str, ...] = ()  # warnings about the request itself
    warnings: tuple[str, ...] = ()  # the notes, then those about its route

    @property
    def key(self) -> tuple:  # plans with equal keys share one diffusion batch
        return self.steps, self.width, self.height, self.guidance, self.sampler


@dataclass
class GenerationResult:
    images: list  # PIL images
    metadata: dict[str, Any]


def as_request(req: PictureRequest | dict) -> GenerationRequest:
    """A request from a dict, with pydantic's first error as one line naming the field and its bounds."""
    if isinstance(req, GenerationRequest):
        return req
    if isinstance(req, PictureRequest):  # already validated: one picture
        return GenerationRequest.model_construct(**dict(req), num_images=1)
    try:
        return GenerationRequest.model_validate(req)
    except ValidationError as exc:
        raise ConfigError(first_error(exc, allowed=GenerationRequest.model_fields, unknown="field")) from None


class Generator:
    def __init__(self, params: Params, *, base: str | None = None, bank: str | Path | None = None,
                 assistant=None, registry: Registry | None = None, pipe=None):
        """`bank`: the bank index whose adapters are loaded; None: no adapters, the base model alone.
        `pipe`: an already loaded pipeline instead of `base` (the full-size check builds SDXL at random)."""
        from tipsen.bank import Bank
        from tipsen.lora_batch import components, load_adapters
        from tipsen.models import load_base

        self.cfg = params.generate
        self.base = base or params.models.base
        self.registry = registry or Registry.load()
        self.assistant = assistant  # anything with settle(texts, routes) and refine_batch(prompts, keywords=, seeds=)
        self.pipe = pipe or load_base(params, base=self.base)
        self.modules = components(self.pipe)
        sample = self.pipe.unet.config.sample_size
        self.native = (sample if isinstance(sample, int) else sample[0]) * self.pipe.vae_scale_factor
        self.scheduler = self.pipe.scheduler  # the model's own; a request's sampler replaces it for its batch
        self.bank_path, self.bank_error, self.entries, self.reasons = Path(bank) if bank else None, None, {}, {}
        self.refused: dict[str, str] = {}
        if bank is not None:
            try:
                index = Bank(self.bank_path)
            except ConfigError as exc:  # no bank yet: the base model still serves, and status() says why
                self.bank_error = str(exc)
                log.warning("%s; generating with the base model only", exc)
            else:  # a refused index entry costs only its own keyword, reported like an unloadable adapter
                self.entries, self.refused = index.entries, index.invalid
                self.reasons = {**{s: f"refused by the index: {r}" for s, r in index.invalid.items()
                                   if s in self.registry.keywords},
                                **load_adapters(self.pipe, index, set(self.registry.keywords))}
        self.available = sorted(slug for slug, reason in self.reasons.items() if reason is None)
        self._fused: tuple[str, float] | None = None
        self._lock = threading.Lock()  # one pipeline: diffusion batches run one at a time
        log.info("generator ready: %s, %d/%d adapters", self.base, len(self.available), len(self.reasons))

    def status(self) -> dict:
        return {
            "base_model": self.base, "pipeline": type(self.pipe).__name__, "device": str(self.pipe.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."), "native_size": self.native,
            "bank": {"path": str(self.bank_path) if self.bank_path else None, "error": self.bank_error,
                     "refused": self.refused},
            "fuse_lora": self.cfg.fuse_lora, "fused": self._fused[0] if self._fused else None,
            "adapters": {slug: {"available": reason is None, "reason": reason,
                                **{k: getattr(self.entries.get(slug) or self.registry[slug], k)
                                   for k in ("keyword", "ko", "class_token")}}
                         for slug, reason in self.reasons.items()},
        }

    def route(self, text: str, keyword: str | list[str] | None = None) -> Route:
        """Keywords chosen explicitly win; else the keywords the registry routes the text to (tipsen/routing.py)."""
        return self.registry.route(text, explicit=keyword, limit=self.cfg.max_keywords)

    def chosen(self, req: GenerationRequest) -> list[str] | None:
        """The keywords a request names (`keyword` or `keywords`), checked; None: route them from the prompt.
        Each must have a usable adapter unless use_lora is off (then it must only exist)."""
        if req.keyword is not None and req.keywords is not None:
            raise ConfigError("keywords: send either keyword or keywords, not both")
        field, chosen = ("keyword", [req.keyword]) if req.keyword is not None else ("keywords", req.keywords)
        if chosen is None:
            return None
        if len(set(chosen)) < len(chosen):
            raise ConfigError(f"keywords: {', '.join(chosen)} names a keyword twice; allowed: distinct slugs")
        if len(chosen) > self.cfg.max_keywords:
            raise ConfigError(f"keywords: {len(chosen)} keywords; allowed: at most {self.cfg.max_keywords} "
                              "(generate.max_keywords)")
        for slug in chosen:
            if req.use_lora:
                self.adapter_for(slug, field=field)
            else:
                self.registry.get(slug, field=field)
        return chosen

    def size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """The picture size: the given one, else generate.width/height, else the model's native size; checked."""
        cfg, sizes = self.cfg, []
        for name, value in (("width", width), ("height", height)):
            value = value or getattr(cfg, name) or self.native
            if value % 8 or not cfg.min_size <= value <= cfg.max_size:
                problem = "is not a multiple of 8" if value % 8 else "is out of bounds"
                raise ConfigError(f"{name}: {value} {problem}; allowed: multiples of 8 from {cfg.min_size} "
                                  f"to {cfg.max_size}")
            sizes.append(value)
        return sizes[0], sizes[1]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """SHAPES at this model's native size: SDXL's sizes as they are; on another model scaled by its native size
        over SDXL's (and down to generate.max_size if need be), keeping the aspect, in multiples of 8."""
        cfg, out = self.cfg, {}
        for name, (w, h) in SHAPES.items():
            scale = self.native / SDXL_NATIVE
            scale = min(scale, cfg.max_size / (max(w, h) * scale) * scale)
            out[name] = tuple(max(int(x * scale / 8 + 0.5) * 8, cfg.min_size) for x in (w, h))
        return out

    def adapter_for(self, slug: str, *, field: str = "keyword") -> str:
        """`slug` if its adapter is loaded, else a ConfigError naming why and the usable slugs."""
        if slug in self.available:
            return slug
        if slug not in self.registry.keywords:
            problem = f"unknown keyword {slug!r}"
        elif slug in self.reasons:
            problem = f"{slug!r} is unavailable ({self.reasons[slug]})"
        else:
            problem = f"{slug!r} is not in the bank ({self.bank_error or 'no adapter for it'})" if self.bank_path \
                else f"{slug!r} has no adapter: no bank is loaded"
        usable = [s for s, reason in self.reasons.items() if reason is None]  # in bank order
        raise ConfigError(f"{field}: {problem}; allowed: {', '.join(usable) or 'none (the bank is empty)'}")

    def resolve(self, request: GenerationRequest | dict, *, refine: bool = True) -> Plan:
        """Validate a request once and settle it into a Plan, or raise a ConfigError naming the field.

        A keyword named explicitly must have a usable adapter (unless use_lora is off); a routed keyword without
        one is drawn by the base model, with the reason among the plan's warnings. `refine=False` leaves the
        assistant's step to `refine` (the service runs it on the device, after admission)."""
        req, cfg, notes = as_request(request), self.cfg, []
        words = req.prompt.strip()
        if not words:
            raise ConfigError(f"prompt: empty; allowed: 1 to {cfg.max_prompt_chars} characters")
        if len(words) > cfg.max_prompt_chars:
            notes.append(f"prompt truncated from {len(words)} to {cfg.max_prompt_chars} characters")
            log.warning(notes[-1])
            words = words[:cfg.max_prompt_chars]
        chosen = self.chosen(req)
        if req.assist and self.assistant is None:
            raise ConfigError("assist: no prompting assistant is loaded here; send assist: false")
        adapter = chosen[0] if chosen and req.use_lora else None
        width, height = self.size(req.width, req.height)
        negative = cfg.negative_prompt if req.negative_prompt is None else req.negative_prompt.strip()
        if len(negative) > cfg.max_prompt_chars:
            raise ConfigError(f"negative_prompt: {len(negative)} characters; allowed: at most {cfg.max_prompt_chars}")
        if HANGUL.search(negative):
            notes.append("negative_prompt: SDXL reads only English; its Korean words reach the model as byte "
                         "fragments")
        route = self.route(words, chosen)
        plan = Plan(prompt=words, seed=draw_seed() if req.seed is None else req.seed,
                    steps=req.steps or cfg.steps, guidance=cfg.guidance if req.guidance is None else req.guidance,
                    width=width, height=height, adapter=adapter,
                    lora_scale=cfg.lora_scale if req.lora_scale is None else req.lora_scale,
                    negative_prompt=negative, sampler=req.sampler, num_images=req.num_images, input=words,
                    use_lora=req.use_lora,
                    assist=req.assist, notes=tuple(notes))
        plan = self._routed(plan, route)
        return self.refine([plan])[0] if refine and plan.assist else plan

    def _routed(self, plan: Plan, route: Route) -> Plan:
        """`plan` drawn as `route` says: its adapter, its prompt (with the assistant off) and the route's warnings.
        A routed keyword without a usable adapter is drawn by the base model, and the reason is a warning."""
        notes, adapter = list(plan.notes), plan.adapter
        if route.source != "explicit":
            adapter = route.slug if plan.use_lora and route.slug in self.available else None
            if plan.use_lora and route.slug and adapter is None:
                why = self.reasons.get(route.slug) or self.bank_error or "not in the bank"
                notes.append(f"no LoRA for {route.slug} ({why}); the base model is used")
        if route.also:  # one adapter per picture until the bank draws several together
            how = "chosen" if route.source == "explicit" else "recognised"
            notes.append(f"also {how}: {', '.join(route.also)}; only {route.slug} is drawn")
        if route.ask:
            notes.append(f"perhaps {', '.join(route.ask)}: not drawn without a clearer mention")
        if route.settled and route.settled["error"]:
            notes.append(f"the route was not settled by {route.settled['by']} ({route.settled['error']}); "
                         "the rules' route is used")
        prompt = plan.input if plan.assist else self._with_keyword(plan.input, route)
        return dataclasses.replace(plan, route=route, adapter=adapter, prompt=prompt, warnings=tuple(notes))

    def refine(self, plans: list[Plan]) -> list[Plan]:
        """The assistant's work for every plan that asks for it and has none yet, in one batched call each: an
        unsure route settled by its LLM (Assistant.settle), then the prompt rewritten."""
        todo = [i for i, p in enumerate(plans) if p.assist and p.refined is None]
        if not todo:
            return list(plans)
        t = time.perf_counter()
        out = list(plans)
        routes = self.assistant.settle([plans[i].input for i in todo], [plans[i].route for i in todo])
        for i, route in zip(todo, routes):
            if route is not plans[i].route:
                out[i] = self._routed(plans[i], route)
        results = self.assistant.refine_batch([out[i].input for i in todo], keywords=[out[i].route for i in todo],
                                              seeds=[out[i].seed for i in todo])
        each = (time.perf_counter() - t) / len(todo)
        for i, r in zip(todo, results):
            out[i] = dataclasses.replace(out[i], prompt=r.prompt, refined=r.model_dump(), refine_s=each)
        return out

    def _with_keyword(self, words: str, route: Route) -> str:
        """What SDXL reads when the assistant is off. English words: the paper's "A photo of [keyword] [class]",
        then the words (unless they already hold both). Korean words: each routed keyword's template and English
        description, since CLIP's tokenizer turns Hangul into byte fragments; the words stay in the metadata.
        Korean words with no keyword in them are a NoTopic error that lists the topics."""
        if HANGUL.search(words):
            if not route.slugs:
                topics = ", ".join(f"{k.ko} ({k.slug})" for k in self.registry)
                raise NoTopic("prompt: no topic was recognised in these Korean words, and SDXL reads only English; "
                              "name one of the topics, or ask for the assistant (assist: true; the CLI's --assist). "
                              f"Topics: {topics}")
            return "; ".join(f"{self.registry[s].prompt}, {self.registry[s].description}" for s in route.slugs)
        if route.slug is None:
            return words
        kw, have = self.registry[route.slug], normalize(words)
        if normalize(kw.keyword) in have and normalize(kw.class_token) in have:
            return words
        return f"{kw.prompt}, {words}"

    def generate(self, req: GenerationRequest | dict) -> GenerationResult:
        return self.generate_batch([req])[0]

    def generate_batch(self, reqs: list[GenerationRequest | dict]) -> list[GenerationResult]:
        """Resolve every request, refine those that ask for it in one call, and render them together."""
        return self.render(self.refine([self.resolve(r, refine=False) for r in reqs]))

    def render(self, plans: list[Plan]) -> list[GenerationResult]:
        """One diffusion batch per (steps, size, guidance), at most generate.max_batch_size images each."""
        t0 = time.perf_counter()
        for p in plans:  # a plan names only what this generator holds: anything else is a caller's bug
            if (p.adapter is not None and p.adapter not in self.available) or (p.assist and p.refined is None):
                raise ValueError(f"render: plan for {p.adapter or p.input!r} is not resolved for this generator "
                                 f"(adapter {p.adapter!r}, assist {p.assist}, refined {p.refined is not None})")
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(plan.key, []).extend((i, j) for j in range(plan.num_images))
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
        return [GenerationResult([images[i, j] for j in range(p.num_images)], self._metadata(p, {
            "queue": done[i] - diffusion[i], "refine": p.refine_s, "diffusion": diffusion[i],
            "total": done[i] + p.refine_s})) for i, p in enumerate(plans)]

    def _diffuse(self, key: tuple, jobs: list[tuple[Plan, int]]) -> list:
        import torch

        from tipsen.lora_batch import fuse, per_sample, unfuse

        steps, width, height, guidance, sampler = key
        names = [p.adapter for p, _ in jobs]
        scales = [p.lora_scale if p.adapter else 0.0 for p, _ in jobs]
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
        negative = [p.negative_prompt for p, _ in jobs] if any(p.negative_prompt for p, _ in jobs) else None
        self.pipe.scheduler = self._scheduler(sampler)
        try:
            with hooks:
                out = self.pipe(prompt=[p.prompt for p, _ in jobs], negative_prompt=negative,
                                num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                                generator=generators, output_type="np")
        finally:
            self.pipe.scheduler = self.scheduler  # the model's own between batches
        return self.pipe.numpy_to_pil(out.images)

    def _scheduler(self, sampler: str | None):
        """A fresh scheduler for one batch: the request's sampler on the model's own schedule settings."""
        if sampler is None:
            return self.scheduler
        import diffusers

        name, settings, _ = SAMPLERS[sampler]
        return getattr(diffusers, name).from_config(self.scheduler.config, **settings)

    def sampler_name(self, sampler: str | None) -> str:
        """The sampler as AUTOMATIC1111 names it, or the model's own scheduler's class."""
        return SAMPLERS[sampler][2] if sampler else type(self.scheduler).__name__

    def _metadata(self, p: Plan, timings: dict[str, float]) -> dict[str, Any]:
        return {
            "keyword": p.route.slug, "route": p.route.as_dict(), "input": p.input, "prompt": p.prompt,
            "refined": p.refined, "seed": p.seed, "steps": p.steps, "guidance": p.guidance,
            "negative_prompt": p.negative_prompt, "sampler": p.sampler, "sampler_name": self.sampler_name(p.sampler),
            "lora_scale": p.lora_scale if p.adapter else None, "width": p.width, "height": p.height,
            "num_images": p.num_images, "model": self.base, "adapter": p.adapter,
            "adapter_sha256": self.entries[p.adapter].sha256 if p.adapter else None,  # the exact weights drawn
            "timings": {k: round(max(v, 0.0), 4) for k, v in timings.items()}, "warnings": list(p.warnings),
        }


def parameters_text(metadata: dict, index: int = 0) -> str:
    """AUTOMATIC1111's `parameters` text for image `index` of a result: the prompt SDXL saw, `Negative prompt: …`,
    then one line of `key: value` pairs, as its "PNG info" tab and civitai read them."""
    from tipsen import __version__

    m = metadata
    pairs = {"Steps": m["steps"], "Sampler": m["sampler_name"], "CFG scale": m["guidance"], "Seed": m["seed"] + index,
             "Size": f"{m['width']}x{m['height']}", "Model": m["model"]}
    if m.get("adapter"):
        pairs["Lora hashes"] = f'"{m["adapter"]}: {m["adapter_sha256"][:12]}"'  # A1111 quotes the list
    pairs["Version"] = f"tipsen {__version__}"
    one_line = lambda text: " ".join(str(text).split())  # noqa: E731 -- the format is line-based
    return (f"{one_line(m['prompt'])}\nNegative prompt: {one_line(m['negative_prompt'])}\n"
            + ", ".join(f"{k}: {v}" for k, v in pairs.items()))


def png_bytes(image, metadata: dict, index: int = 0) -> bytes:
    """Image `index` of a result as PNG bytes with how it was made: A1111's `parameters` chunk and tipsen's own
    (the result's metadata: the senior's words, the route, the adapter's sha256). Timings stay out, so the same
    request and seed give the same bytes."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(metadata, index))  # iTXt when it is not Latin-1
    own = {k: v for k, v in metadata.items() if k != "timings"}
    if own.get("refined"):  # the assistant's record, less its latency
        own["refined"] = {k: v for k, v in own["refined"].items() if k != "latency_s"}
    info.add_itxt("tipsen", json.dumps({**own, "image": index, "image_seed": metadata["seed"] + index},
                                       ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image, path: Path, metadata: dict, index: int = 0) -> Path:
    """Write image `index` of a result as a PNG file, atomically (`png_bytes`)."""
    return write_bytes_atomic(path, png_bytes(image, metadata, index))


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
    parser.add_argument("--out", required=True,  # a str: Path() would drop the trailing '/' of a folder
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
    parser.add_argument("--negative-prompt", help="what to keep out of the picture (default: generate.negative_prompt)")
    parser.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: the model's own scheduler)")
    parser.add_argument("--no-lora", action="store_true", help="the base model only")
    parser.add_argument("--bank", default=str(paths.BANK), help=f"bank index (default: {paths.BANK})")


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    params.log()
    fields = dict(prompt=args.prompt, keyword=args.keyword, seed=args.seed, steps=args.steps, guidance=args.guidance,
                  lora_scale=args.lora_scale, width=args.width, height=args.height, num_images=args.num_images,
                  assist=args.assist, use_lora=not args.no_lora, negative_prompt=args.negative_prompt,
                  sampler=args.sampler)
    req = as_request({k: v for k, v in fields.items() if v is not None})  # bad input fails before loading
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        raise ConfigError(f"--out {args.out}: is a folder; give the PNG's file name")
    registry = Registry.load()
    if req.keyword:
        registry.get(req.keyword)
    assistant = _assistant(params, registry) if args.assist else None
    generator = Generator(params, bank=args.bank, assistant=assistant, registry=registry)
    result = generator.generate(req)
    names = [out] if len(result.images) == 1 else \
        [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(result.images))]
    files = [str(save_png(image, path, result.metadata, j)) for j, (image, path) in enumerate(zip(result.images, names))]
    print(json.dumps({**result.metadata, "files": files}, ensure_ascii=False, indent=2))
    return 0
