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
from typing import Annotated, Any, Literal

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
    # a bank slug, or several drawn together (as `keywords`); None: routed from the prompt
    keyword: Slug | Annotated[list[Slug], Field(max_length=8)] | None = None
    # bank slugs the caller chose, the first drawn ([] for none: the senior took every routed one back);
    # generate.max_keywords at most; not with `keyword`
    keywords: list[Slug] | None = Field(None, max_length=8)
    seed: Seed | None = None  # None: drawn at random and reported
    steps: Steps | None = None
    guidance: Guidance | None = None
    # every drawn adapter's scale, or one scale per keyword in the order of `keywords` (then routed ones take the
    # default); None: generate.lora_scale
    lora_scale: LoraScale | list[LoraScale] | None = None
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
    adapters: tuple[str, ...] = ()  # loaded bank slugs, drawn together; (): the base model alone
    lora_scale: float = 0.0  # each adapter's scale, unless `lora_scales` gives them one by one
    lora_scales: tuple[float, ...] = ()  # per adapter, for a request that gave a list
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
    def adapter(self) -> str | None:  # the first (main) adapter
        return self.adapters[0] if self.adapters else None

    @property
    def scales(self) -> tuple[float, ...]:  # one per adapter
        return tuple(self.lora_scales[i] if i < len(self.lora_scales) else self.lora_scale
                     for i in range(len(self.adapters)))

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
        from tipsen.lora_batch import components
        from tipsen.models import load_base
        from tipsen.store import BankStore

        self.cfg = params.generate
        self.base = base or params.models.base
        self.registry = registry or Registry.load()
        self.assistant = assistant  # anything with settle(texts, routes) and refine_batch(prompts, keywords=, seeds=)
        self.pipe = pipe or load_base(params, base=self.base)
        self.modules = components(self.pipe)
        sample = self.pipe.unet.config.sample_size
        self.native = (sample if isinstance(sample, int) else sample[0]) * self.pipe.vae_scale_factor
        self.scheduler = self.pipe.scheduler  # the model's own; a request's sampler replaces it for its batch
        self.bank_path = Path(bank) if bank else None
        self.store = BankStore(self.pipe, known=set(self.registry.keywords), base=self.base)
        self._fused: tuple[str, float] | None = None
        self._lock = threading.Lock()  # one pipeline: diffusion batches run one at a time, and swaps between them
        self._reloading = threading.Lock()  # one reload at a time, from reading the index to the swap
        self.store.load(*self._index())
        v = self.store.version
        log.info("generator ready: %s, %d/%d adapters in %.1f s", self.base, len(v.adapters), len(v.reasons),
                 v.loaded_s)

    def _index(self):
        """The bank index and, when it cannot be read, why (the base model then serves alone)."""
        from tipsen.bank import Bank

        if self.bank_path is None:
            return None, None
        try:
            return Bank(self.bank_path), None
        except ConfigError as exc:  # no bank yet: the base model still serves, and status() says why
            log.warning("%s; generating with the base model only", exc)
            return None, str(exc)

    def reload(self) -> dict:
        """Re-read the bank index: new and changed adapters are read and verified beside the serving ones, then
        swapped in between two diffusion batches. A changed adapter whose new file is refused keeps its serving
        version. Raises RuntimeError while another reload runs."""
        from tipsen.store import served

        if not self._reloading.acquire(blocking=False):
            raise RuntimeError("a bank reload is already running")
        try:
            t0 = time.perf_counter()
            old = self.store.version
            new = self.store.prepare(*self._index())
            with self._lock:  # no batch is drawing: the next one starts on the new version
                if self._fused:
                    self.store.unfuse()
                    self._fused = None
                self.store.swap(new)
        finally:
            self._reloading.release()
        before, after = served(old), served(new)
        changes = {
            "added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "changed": sorted(s for s in set(after) & set(before) if after[s]["sha256"] != before[s]["sha256"]),
            "kept": sorted(s for s, r in new.reasons.items() if r and s in new.adapters),
            "unavailable": {s: r for s, r in new.reasons.items() if r and s not in new.adapters},
        }
        log.info("bank reloaded (version %d) in %.2f s: %s", new.number, time.perf_counter() - t0,
                 {k: v for k, v in changes.items() if v})
        return {"version": new.number, "seconds": round(time.perf_counter() - t0, 3), **changes}

    @property
    def available(self) -> list[str]:
        return self.store.version.available

    @property
    def reasons(self) -> dict[str, str | None]:
        return self.store.version.reasons

    @property
    def entries(self) -> dict:
        return self.store.version.entries

    @property
    def bank_error(self) -> str | None:
        return self.store.version.bank_error

    def status(self) -> dict:
        from tipsen.store import served

        v = self.store.version
        loaded = served(v)
        return {
            "base_model": self.base, "pipeline": type(self.pipe).__name__, "device": str(self.pipe.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."), "native_size": self.native,
            "bank": {"path": str(self.bank_path) if self.bank_path else None, "error": v.bank_error,
                     "refused": v.refused, "version": v.number, "load_s": round(v.loaded_s, 3),
                     "resident_bytes": v.nbytes()},
            "fuse_lora": self.cfg.fuse_lora, "fused": self._fused[0] if self._fused else None,
            "adapters": {slug: {"available": slug in v.adapters, "reason": reason,
                                **{k: getattr(v.entries.get(slug) or self.registry[slug], k)
                                   for k in ("keyword", "ko", "class_token")}, **loaded.get(slug, {})}
                         for slug, reason in v.reasons.items()},
        }

    def route(self, text: str, keyword: str | list[str] | None = None) -> Route:
        """Keywords chosen explicitly win; else the keywords the registry routes the text to (tipsen/routing.py)."""
        return self.registry.route(text, explicit=keyword, limit=self.cfg.max_keywords)

    def chosen(self, req: GenerationRequest) -> list[str] | None:
        """The keywords a request names (`keyword` or `keywords`), checked; None: route them from the prompt.
        Each must have a usable adapter unless use_lora is off (then it must only exist)."""
        if req.keyword is not None and req.keywords is not None:
            raise ConfigError("keywords: send either keyword or keywords, not both")
        if req.keyword is not None:
            field, chosen = "keyword", [req.keyword] if isinstance(req.keyword, str) else list(req.keyword)
        else:
            field, chosen = "keywords", req.keywords
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
        kept, dropped = self._drawable(chosen) if req.use_lora else (chosen, [])
        if dropped:
            raise ConfigError(f"{field}: {', '.join(dropped)} cannot be drawn together with {kept[-1]}: each goes "
                              "through peft's path (one per picture); allowed: one of them")
        return chosen

    def _drawable(self, slugs) -> tuple[list[str], list[str]]:
        """`slugs` split into those one picture can draw together and the rest: every store adapter, and at most
        one adapter that goes through peft's path (tipsen.store)."""
        from tipsen.store import PEFT

        adapters, kept, dropped, peft = self.store.version.adapters, [], [], False
        for slug in slugs:
            is_peft = adapters[slug].path == PEFT
            (dropped if is_peft and peft else kept).append(slug)
            peft = peft or is_peft
        return kept, dropped

    def _scales(self, req: GenerationRequest, chosen: list[str] | None) -> tuple[float, tuple[float, ...]]:
        """The request's LoRA scale and, for a list, the scale of each chosen keyword."""
        if not isinstance(req.lora_scale, list):
            return (self.cfg.lora_scale if req.lora_scale is None else req.lora_scale), ()
        if not chosen or len(req.lora_scale) != len(chosen):
            raise ConfigError(f"lora_scale: {len(req.lora_scale)} scales for {len(chosen or [])} chosen keywords; "
                              "allowed: one number, or one per keyword in `keywords`")
        return self.cfg.lora_scale, tuple(req.lora_scale)

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
        usable = [s for s in self.reasons if s in self.store.version.adapters]  # in bank order
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
        adapters = tuple(chosen) if chosen and req.use_lora else ()
        lora_scale, lora_scales = self._scales(req, chosen)
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
                    width=width, height=height, adapters=adapters, lora_scale=lora_scale, lora_scales=lora_scales,
                    negative_prompt=negative, sampler=req.sampler, num_images=req.num_images, input=words,
                    use_lora=req.use_lora,
                    assist=req.assist, notes=tuple(notes))
        plan = self._routed(plan, route)
        return self.refine([plan])[0] if refine and plan.assist else plan

    def _routed(self, plan: Plan, route: Route) -> Plan:
        """`plan` drawn as `route` says: its adapter, its prompt (with the assistant off) and the route's warnings.
        A routed keyword without a usable adapter is drawn by the base model, and the reason is a warning."""
        notes, adapters = list(plan.notes), plan.adapters
        if route.source != "explicit":
            adapters = tuple(s for s in route.slugs if plan.use_lora and s in self.available)
            for slug in route.slugs if plan.use_lora else ():
                if slug not in adapters:
                    why = self.reasons.get(slug) or self.bank_error or "not in the bank"
                    notes.append(f"no LoRA for {slug} ({why}); " + ("the base model is used" if not adapters
                                                                   else "drawn without it"))
            adapters, dropped = self._drawable(adapters)
            if dropped:
                notes.append(f"also recognised: {', '.join(dropped)}; not drawn with {adapters[-1]} (each goes "
                             "through peft's path, one per picture)")
            adapters = tuple(adapters)
        if route.ask:
            notes.append(f"perhaps {', '.join(route.ask)}: not drawn without a clearer mention")
        if route.settled and route.settled["error"]:
            notes.append(f"the route was not settled by {route.settled['by']} ({route.settled['error']}); "
                         "the rules' route is used")
        prompt = plan.input if plan.assist else self._with_keyword(plan.input, route)
        return dataclasses.replace(plan, route=route, adapters=adapters, prompt=prompt, warnings=tuple(notes))

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
        have = normalize(words)
        named = [self.registry[s] for s in route.slugs]
        if all(normalize(kw.keyword) in have and normalize(kw.class_token) in have for kw in named):
            return words
        if len(named) == 1:
            return f"{named[0].prompt}, {words}"
        return f"A photo of {' and '.join(f'{kw.keyword} {kw.class_token}' for kw in named)}, {words}"

    def generate(self, req: GenerationRequest | dict) -> GenerationResult:
        return self.generate_batch([req])[0]

    def generate_batch(self, reqs: list[GenerationRequest | dict]) -> list[GenerationResult]:
        """Resolve every request, refine those that ask for it in one call, and render them together."""
        return self.render(self.refine([self.resolve(r, refine=False) for r in reqs]))

    def render(self, plans: list[Plan]) -> list[GenerationResult]:
        """One diffusion batch per (steps, size, guidance), at most generate.max_batch_size images each."""
        t0 = time.perf_counter()
        for p in plans:  # a plan names only what this generator holds: anything else is a caller's bug
            if any(a not in self.store.seen for a in p.adapters) or (p.assist and p.refined is None):
                raise ValueError(f"render: plan for {p.adapter or p.input!r} is not resolved for this generator "
                                 f"(adapters {p.adapters!r}, assist {p.assist}, refined {p.refined is not None})")
        images, diffusion, done = {}, [0.0] * len(plans), [0.0] * len(plans)
        with self._lock:  # the bank version is fixed from here to the last image: a reload swaps between renders
            version = self.store.version
            plans = [self._still_loaded(p, version) for p in plans]
            groups: dict[tuple, list[tuple[int, int]]] = {}
            for i, plan in enumerate(plans):
                groups.setdefault(plan.key, []).extend((i, j) for j in range(plan.num_images))
            for key, jobs in groups.items():
                for k in range(0, len(jobs), self.cfg.max_batch_size):
                    chunk = jobs[k:k + self.cfg.max_batch_size]
                    t = time.perf_counter()
                    out = self._diffuse(key, [(plans[i], j) for i, j in chunk])
                    images.update(zip(chunk, out))
                    for i in {i for i, _ in chunk}:
                        diffusion[i] += time.perf_counter() - t
                        done[i] = time.perf_counter() - t0
        return [GenerationResult([images[i, j] for j in range(p.num_images)], self._metadata(p, version, {
            "queue": done[i] - diffusion[i], "refine": p.refine_s, "diffusion": diffusion[i],
            "total": done[i] + p.refine_s})) for i, p in enumerate(plans)]

    def _still_loaded(self, plan: Plan, version) -> Plan:
        """`plan` without the adapters a bank reload took out after it was resolved, each with a warning."""
        gone = [a for a in plan.adapters if a not in version.adapters]
        if not gone:
            return plan
        keep = [i for i, a in enumerate(plan.adapters) if a in version.adapters]
        notes = [f"no LoRA for {a} (a bank reload took it out before drawing: {version.reasons.get(a) or 'no longer in the index'}); "
                 "drawn without it" for a in gone]
        return dataclasses.replace(plan, adapters=tuple(plan.adapters[i] for i in keep),
                                   lora_scales=tuple(plan.scales[i] for i in keep) if plan.lora_scales else (),
                                   warnings=plan.warnings + tuple(notes))

    def _diffuse(self, key: tuple, jobs: list[tuple[Plan, int]]) -> list:
        import torch

        steps, width, height, guidance, sampler = key
        names = [p.adapters for p, _ in jobs]
        scales = [p.scales for p, _ in jobs]
        one = names[0][0] if len(names[0]) == 1 else None
        if self.cfg.fuse_lora and one and len(set(zip(names, scales))) == 1:
            if self._fused != (one, scales[0][0]):  # fused weights serve only the one keyword they hold
                self.store.unfuse()
                self.store.fuse(one, scales[0][0])
                self._fused = (one, scales[0][0])
            hooks = nullcontext()
        else:
            if self._fused:
                self.store.unfuse()
                self._fused = None
            hooks = self.store.batch(names, scales)
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

    def _metadata(self, p: Plan, version, timings: dict[str, float]) -> dict[str, Any]:
        return {
            "keyword": p.route.slug, "route": p.route.as_dict(), "input": p.input, "prompt": p.prompt,
            "refined": p.refined, "seed": p.seed, "steps": p.steps, "guidance": p.guidance,
            "negative_prompt": p.negative_prompt, "sampler": p.sampler, "sampler_name": self.sampler_name(p.sampler),
            "lora_scale": p.scales[0] if p.adapter else None, "width": p.width, "height": p.height,
            "num_images": p.num_images, "model": self.base, "adapter": p.adapter,
            "adapter_sha256": version.adapters[p.adapter].sha256 if p.adapter else None,  # the exact weights drawn
            "adapters": [{"slug": a, "scale": s, "sha256": version.adapters[a].sha256}  # every one drawn, in order
                         for a, s in zip(p.adapters, p.scales)],
            "bank_version": version.number,
            "timings": {k: round(max(v, 0.0), 4) for k, v in timings.items()}, "warnings": list(p.warnings),
        }


def parameters_text(metadata: dict, index: int = 0) -> str:
    """AUTOMATIC1111's `parameters` text for image `index` of a result: the prompt SDXL saw, `Negative prompt: …`,
    then one line of `key: value` pairs, as its "PNG info" tab and civitai read them."""
    from tipsen import __version__

    m = metadata
    pairs = {"Steps": m["steps"], "Sampler": m["sampler_name"], "CFG scale": m["guidance"], "Seed": m["seed"] + index,
             "Size": f"{m['width']}x{m['height']}", "Model": m["model"]}
    drawn = m.get("adapters") or ([{"slug": m["adapter"], "sha256": m["adapter_sha256"]}] if m.get("adapter") else [])
    if drawn:  # A1111 quotes the list
        pairs["Lora hashes"] = '"' + ", ".join(f'{a["slug"]}: {a["sha256"][:12]}' for a in drawn) + '"'
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
    parser.add_argument("--keyword", action="append", help="bank keyword slug (default: routed from the prompt); "
                        "repeat it to draw several keywords in one picture")
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
    keyword = args.keyword[0] if args.keyword and len(args.keyword) == 1 else args.keyword
    fields = dict(prompt=args.prompt, keyword=keyword, seed=args.seed, steps=args.steps, guidance=args.guidance,
                  lora_scale=args.lora_scale, width=args.width, height=args.height, num_images=args.num_images,
                  assist=args.assist, use_lora=not args.no_lora, negative_prompt=args.negative_prompt,
                  sampler=args.sampler)
    req = as_request({k: v for k, v in fields.items() if v is not None})  # bad input fails before loading
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        raise ConfigError(f"--out {args.out}: is a folder; give the PNG's file name")
    registry = Registry.load()
    for slug in [req.keyword] if isinstance(req.keyword, str) else req.keyword or []:
        registry.get(slug, field="--keyword")
    assistant = _assistant(params, registry) if args.assist else None
    generator = Generator(params, bank=args.bank, assistant=assistant, registry=registry)
    result = generator.generate(req)
    names = [out] if len(result.images) == 1 else \
        [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(result.images))]
    files = [str(save_png(image, path, result.metadata, j)) for j, (image, path) in enumerate(zip(result.images, names))]
    print(json.dumps({**result.metadata, "files": files}, ensure_ascii=False, indent=2))
    return 0
