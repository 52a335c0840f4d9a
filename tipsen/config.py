"""Typed params: `params.yaml` -> one pydantic model per section, validated once at the edge.

params.yaml holds a `profile:` switch, the `keywords:` list that is trained and evaluated, and a
`profiles:` mapping with one entry per profile (`demo`, `paper`). Each profile has the sections below;
a missing key takes the default here, and the defaults are the paper's settings.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A user's mistake in params or arguments: printed as one line, never a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsParams(Section):
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"  # HF id, local dir, or tiny:sdxl / tiny:sd
    pipeline_class: Literal["auto", "StableDiffusionXLPipeline", "StableDiffusionPipeline"] = "auto"
    clip: str = "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"  # open_clip ref, or tiny:clip
    dino: str | None = "facebook/dinov2-small"  # transformers ref, tiny:dino, or null to skip
    llm: str = "meta-llama/Meta-Llama-3-8B-Instruct"  # causal LM for the assistant, or tiny:llm
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


class CurateParams(Section):
    per_keyword: int = Field(100, ge=1, le=100_000)
    resolution: int = Field(1024, ge=16, le=4096)
    min_short_side: int = Field(512, ge=1)
    max_aspect: float = Field(3.0, ge=1.0, le=100.0)
    max_pixels: int = Field(64_000_000, ge=1)  # explicit decompression-bomb cap
    max_file_bytes: int = Field(50_000_000, ge=1)
    phash_size: int = Field(8, ge=4, le=32)  # pHash of phash_size^2 bits; 8 is the classic 64-bit hash
    phash_hamming: int = Field(6, ge=0, le=1024)  # near-duplicate: at most this many differing bits
    min_sharpness: float = Field(10.0, ge=0.0)  # Laplacian variance, short side capped at 2 x resolution
    relevance: bool = True
    min_relevance: float = Field(0.15, ge=-1.0, le=1.0)
    relevance_weight: float = Field(1.0, ge=0.0)
    quality_weight: float = Field(0.1, ge=0.0)
    crop: Literal["center", "smart"] = "center"
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # held out from training, used as eval's real images
    batch_size: int = Field(32, ge=1, le=1024)  # CLIP scoring batch
    workers: int = Field(2, ge=1, le=256)

    @model_validator(mode="after")
    def _hamming_fits(self) -> "CurateParams":
        if self.phash_hamming > self.phash_size ** 2:
            raise ValueError(f"phash_hamming {self.phash_hamming} exceeds the hash's {self.phash_size ** 2} bits")
        return self


class TrainParams(Section):
    rank: int = Field(20, ge=1, le=512)
    alpha: float = Field(20.0, gt=0)  # alpha == rank: scale 1.0, as the diffusers DreamBooth scripts do
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    train_text_encoder: bool = False
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    optimizer: Literal["adamw"] = "adamw"
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-4, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(2, ge=1, le=256)
    steps: int = Field(500, ge=1, le=1_000_000)
    resolution: int = Field(1024, ge=16, le=4096)
    loss_weighting: Literal["none", "min_snr"] = "min_snr"
    snr_gamma: float = Field(5.0, gt=0)
    prompt_source: Literal["template", "caption"] = "template"
    prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    allow_tf32: bool = True
    validation_seeds: list[int] = [0, 1]  # columns of validation.png; [] skips the grid
    sample_steps: int = Field(28, ge=1, le=200)  # denoising steps for prior class images and validation.png


class GenerateParams(Section):
    steps: int = Field(28, ge=1, le=50)
    guidance: float = Field(5.0, ge=0.0, le=20.0)
    lora_scale: float = Field(0.7, ge=0.0, le=2.0)
    width: int | None = Field(None, ge=8, le=4096)  # None: the model's native size
    height: int | None = Field(None, ge=8, le=4096)
    min_size: int = Field(64, ge=8)
    max_size: int = Field(2048, ge=8)
    max_batch_size: int = Field(8, ge=1, le=64)
    max_prompt_chars: int = Field(1000, ge=1)
    negative_prompt: str = ""
    fuse_lora: bool = False  # only for single-keyword workloads
    bank: str = "models/bank.json"


class OpenAIParams(Section):
    base_url: str = Field("http://127.0.0.1:8000/v1", pattern=r"^https?://")
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    api_key_env: str = "TIPSEN_LLM_API_KEY"  # the key itself is never stored in params
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)  # transport retries on 5xx, 408/429, timeouts, connection errors
    backoff_s: float = Field(0.5, ge=0.0, le=60.0)  # the i-th retry waits backoff_s * 2**i


class AssistantParams(Section):
    backend: Literal["template", "transformers", "openai"] = "transformers"
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(80, ge=1, le=1024)
    max_words: int = Field(30, ge=5, le=200)
    num_examples: int = Field(2, ge=0, le=16)
    examples: list[str] = ["sebae", "kimbap"]  # slugs; same-category examples are preferred
    attempts: int = Field(2, ge=1, le=10)  # LLM attempts before falling back to the template
    batch_size: int = Field(16, ge=1, le=256)  # prompts per generate() call, or concurrent endpoint requests
    openai: OpenAIParams = OpenAIParams()


class EvalMethod(Section):
    name: str = Field(min_length=1)
    base: str
    lora: bool = False
    assist: bool = False
    steps: int = Field(28, ge=1, le=50)
    guidance: float = Field(5.0, ge=0.0, le=20.0)
    lora_scale: float = Field(0.7, ge=0.0, le=2.0)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)


class EvalParams(Section):
    methods: list[EvalMethod] = []
    images_per_keyword: int = Field(100, ge=1, le=10_000)
    real_images: int = Field(100, ge=1, le=10_000)
    keywords: list[str] | None = None  # None: the profile's keyword list
    batch_size: int = Field(8, ge=1, le=256)
    seed: int = Field(0, ge=0)
    bootstrap: int = Field(1000, ge=0, le=100_000)
    grid_keywords: int = Field(6, ge=1, le=100)

    @model_validator(mode="after")
    def _unique_methods(self) -> "EvalParams":
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: the name {dup[0]!r} is used twice; method names must be unique")
        return self


class ServiceParams(Section):
    max_batch_size: int = Field(8, ge=2, le=64)  # requests per adaptive batch (BentoML needs >= 2)
    max_latency_ms: int = Field(60_000, ge=1)  # BentoML sheds (503) a queued request predicted to take longer
    timeout_s: int = Field(300, ge=1)  # per HTTP request; the GPU work of a timed-out request still runs
    max_concurrency: int = Field(80, ge=2)  # HTTP requests in flight per worker; each generation holds two
    max_queue: int = Field(32, ge=1)  # generation/refine requests admitted and not yet finished; beyond: 429
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    gpus: int = Field(1, ge=0, le=1)  # one SDXL worker per GPU; scale out with replicas

    @model_validator(mode="after")
    def _room_for_queue(self) -> "ServiceParams":
        if self.max_concurrency < 2 * self.max_queue:
            raise ValueError(f"max_concurrency ({self.max_concurrency}) must be at least 2 x max_queue "
                             f"({self.max_queue}): each admitted generation is an outer and an inner HTTP call")
        return self


class FlowsParams(Section):
    train_concurrency: int = Field(2, ge=1, le=256)  # keywords in training at once (threads, or pool runs)
    work_pool: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # null: train in-process
    retries: int = Field(2, ge=0, le=10)  # per keyword, transient errors only; never a ConfigError
    retry_delay_s: float = Field(30.0, ge=0.0, le=3600.0)  # first retry's wait; each next one waits 2x longer
    retrain_cron: str = Field("0 3 * * 1", pattern=r"^\s*(\S+\s+){4}\S+\s*$")  # weekly, Monday 03:00
    promotion_margin: float = Field(0.01, ge=0.0, le=1.0)  # a candidate may score this much below the current


class Params(Section):
    """One resolved profile."""

    profile: str
    keywords: list[str] = Field(min_length=1)
    models: ModelsParams = ModelsParams()
    curate: CurateParams = CurateParams()
    train: TrainParams = TrainParams()
    generate: GenerateParams = GenerateParams()
    assistant: AssistantParams = AssistantParams()
    eval: EvalParams = EvalParams()
    service: ServiceParams = ServiceParams()
    flows: FlowsParams = FlowsParams()

    @model_validator(mode="after")
    def _unique_keywords(self) -> "Params":
        dup = sorted({k for k in self.keywords if self.keywords.count(k) > 1})
        if dup:
            raise ValueError(f"keywords are listed twice: {', '.join(dup)}")
        return self

    def log(self) -> None:
        log.info("resolved config: %s", self.model_dump(mode="json"))


def _describe(err: dict[str, Any], prefix: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    key = f"{prefix}.{loc}" if loc else prefix
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        ann = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return []
        model = ann
    return sorted(model.model_fields)


def parse_params(raw: Any, *, source: str = PARAMS_FILE, profile: str | None = None) -> Params:
    """Validate a params mapping and return the selected profile."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'profile' and 'profiles'")
    unknown = sorted(set(raw) - {"profile", "keywords", "profiles"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}; allowed: profile, keywords, profiles")
    profiles = raw.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{source}: 'profiles' must map profile names to their sections")
    name = profile or os.environ.get("TIPSEN_PROFILE") or raw.get("profile")
    if name not in profiles:
        raise ConfigError(f"{source}: profile {name!r} is not defined; allowed: {', '.join(sorted(profiles))}")
    body = profiles[name] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: profiles.{name}: expected a mapping of sections")
    if "keywords" in body or "profile" in body:
        raise ConfigError(f"{source}: profiles.{name}: 'keywords' and 'profile' belong at the top level")
    try:
        return Params(profile=name, keywords=raw.get("keywords"), **body)
    except ValidationError as exc:
        err = exc.errors()[0]
        top = err["loc"][0] == "keywords"
        msg = _describe(err, "" if top else f"profiles.{name}").lstrip(".")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, err["loc"])
            msg += f"; allowed: {', '.join(a for a in allowed if a != 'profile')}"
        raise ConfigError(f"{source}: {msg}") from None
    except TypeError as exc:  # e.g. a section given as a list
        raise ConfigError(f"{source}: profiles.{name}: {exc}") from None


def load_params(path: str | Path = PARAMS_FILE, *, profile: str | None = None) -> Params:
    """Load and validate `params.yaml`; `TIPSEN_PROFILE` overrides the file's `profile:`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    params = parse_params(raw, source=str(path), profile=profile)
    from tipsen.registry import Registry  # the registry module imports this one

    registry = Registry.load()
    unknown = [k for k in params.keywords if k not in registry.keywords]
    if unknown:
        raise ConfigError(f"{path}: keywords: unknown slug {unknown[0]!r}; allowed: {', '.join(registry.keywords)}")
    return params


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")


def run(args) -> int:
    """Print the resolved profile."""
    import json

    data = load_params(args.params, profile=args.profile).model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return 0
