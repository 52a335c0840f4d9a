"""Typed params: `params.yaml` -> one pydantic model per section, validated once at the edge.

params.yaml holds a `profile:` switch, the `keywords:` list that is trained and evaluated, and a
`profiles:` mapping with one entry per profile (`demo`, `paper`). Each profile has the sections below;
a missing key takes the default here, and the defaults are the paper's settings.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from tipsen import paths
from tipsen.errors import ConfigError, describe
from tipsen.registry import SLUG_PATTERN, Registry

log = logging.getLogger(__name__)

PARAMS_FILE = str(paths.PARAMS)

# Every sampling knob and its bounds, defined once: params, requests, the evaluation and the HTTP schema use these.
SEED_MAX = 2**32 - 1  # A1111's range; every seed tipsen draws, derives or accepts lies in [0, SEED_MAX]
# Strict: `true` is not 1 and "2" is not 2 (an int is still a valid float).
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, strict=True)]
Steps = Annotated[int, Field(ge=1, le=50, strict=True)]  # denoising steps at inference
Guidance = Annotated[float, Field(ge=0.0, le=20.0, strict=True)]
LoraScale = Annotated[float, Field(ge=0.0, le=2.0, strict=True)]
Size = Annotated[int, Field(ge=8, le=4096, strict=True)]  # px; generate.min/max_size and multiples of 8 on use
NumImages = Annotated[int, Field(ge=1, le=4, strict=True)]  # images per request
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN)]


def draw_seed() -> int:
    """A random seed in the one seed range (recorded wherever it is used, so the result is reproducible)."""
    import secrets

    return secrets.randbelow(SEED_MAX + 1)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # YAML's `true` is not 1, "2" is not 2


class ModelsParams(Section):
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"  # HF id, local dir, or tiny:sdxl / tiny:sd
    pipeline_class: Literal["auto", "StableDiffusionXLPipeline", "StableDiffusionPipeline"] = "auto"
    clip: str = "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"  # open_clip ref, or tiny:clip
    dino: str | None = "facebook/dinov2-small"  # transformers ref, tiny:dino, or null to skip
    llm: str = "meta-llama/Meta-Llama-3-8B-Instruct"  # causal LM for the assistant, or tiny:llm
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 where the GPU has it, else fp16
    # a VAE to use instead of the base model's own: on GPUs without bf16, SDXL's VAE overflows in fp16, so use an
    # fp16-safe one such as madebyollin/sdxl-vae-fp16-fix; HF id or local dir (config.json + safetensors)
    vae: str | None = None


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
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"  # the paper's
    lr_warmup_steps: int = Field(0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)  # batches per optimizer step
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
    seed: Seed = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    allow_tf32: bool = True
    validation_seeds: list[int] = [0, 1]  # columns of validation.png; [] skips the grid
    preview_every: int = Field(0, ge=0)  # a row of previews (validation seeds, serving scale) every N steps; 0: none
    sample_steps: int = Field(28, ge=1, le=200)  # denoising steps for prior class images and validation.png

    @model_validator(mode="after")
    def _warmup_has_a_schedule(self) -> "TrainParams":
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("lr_warmup_steps: the constant schedule has no warmup; use lr_scheduler "
                             "constant_with_warmup, linear or cosine")
        if self.lr_warmup_steps >= self.steps:
            raise ValueError(f"lr_warmup_steps: {self.lr_warmup_steps} must be below steps ({self.steps})")
        return self


class GenerateParams(Section):
    steps: Steps = 28
    guidance: Guidance = 5.0
    lora_scale: LoraScale = 0.7
    width: Size | None = None  # None: the model's native size
    height: Size | None = None
    min_size: int = Field(64, ge=8)
    max_size: int = Field(2048, ge=8)
    max_batch_size: int = Field(8, ge=1, le=64)
    max_prompt_chars: int = Field(1000, ge=1)
    negative_prompt: str = ""
    fuse_lora: bool = False  # only for single-keyword workloads
    max_keywords: int = Field(2, ge=1, le=8)  # keywords routing returns and one picture draws together


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
    """One row of the table. Sampling knobs left out (None) follow the generate section, so the table and the
    promotion gate draw exactly as the service does unless a method says otherwise."""

    name: str = Field(min_length=1)
    base: str
    lora: bool = False
    assist: bool = False
    steps: Steps | None = None
    guidance: Guidance | None = None
    lora_scale: LoraScale | None = None
    width: Size | None = None
    height: Size | None = None

    def sampling(self, g: GenerateParams) -> dict[str, Any]:
        """steps, guidance, lora_scale, width and height, each the method's own or else the generate section's."""
        return {k: g_v if (v := getattr(self, k)) is None else v
                for k, g_v in (("steps", g.steps), ("guidance", g.guidance), ("lora_scale", g.lora_scale),
                               ("width", g.width), ("height", g.height))}


class EvalParams(Section):
    methods: list[EvalMethod] = []
    images_per_keyword: int = Field(100, ge=1, le=10_000)
    real_images: int = Field(100, ge=1, le=10_000)
    keywords: list[Slug] | None = None  # None: the profile's keyword list
    batch_size: int = Field(8, ge=1, le=256)
    seed: Seed = 0
    bootstrap: int = Field(1000, ge=0, le=100_000)
    grid_keywords: int = Field(6, ge=1, le=100)

    @model_validator(mode="after")
    def _unique_methods(self) -> "EvalParams":
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: the name {dup[0]!r} is used twice; method names must be unique")
        return self


# A Host header name the service answers to: "tipsen.example.org", ".example.org" (it and its subdomains) or "*".
HostName = Annotated[str, StringConstraints(pattern=r"^(\*|\.?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*)$",
                                            max_length=253)]


API_KEY_ENV = "TIPSEN_API_KEY"  # the service's bearer key (unset: no auth); the key itself is never in params


class ServiceParams(Section):
    max_batch_size: int = Field(8, ge=2, le=64)  # requests per adaptive batch (BentoML needs >= 2)
    max_latency_ms: int = Field(60_000, ge=1)  # BentoML sheds (503) a queued request predicted to take longer
    timeout_s: int = Field(300, ge=1)  # per HTTP request; the GPU work of a timed-out request still runs
    max_concurrency: int = Field(80, ge=1)  # requests in flight, counted once their body is read; beyond: 429
    max_queue: int = Field(32, ge=1)  # generation/refine requests admitted and not yet finished; beyond: 429
    max_client_requests: int = Field(16, ge=0)  # in flight from one client address, body reads too; 0: no cap
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    body_timeout_s: float = Field(10.0, gt=0.0, le=600.0)  # a request body must arrive within this; beyond: 408
    min_body_rate: int = Field(1024, ge=0)  # bytes/s on average after the first second; slower: 408 (0: any)
    allowed_hosts: list[HostName] = Field(default_factory=list)  # Host names besides localhost and IPs; "*": any
    log_prompts: bool = False  # a senior's words are personal: they appear in the server log only when true
    gpus: int = Field(1, ge=0, le=1)  # one SDXL worker per GPU; scale out with replicas
    # Hub models a Bento packs (the base; the assistant's LLM, gated, when the backend is transformers); any other
    # is downloaded when the container starts. tiny: refs and local paths are never packed.
    pack: list[Literal["base", "llm"]] = ["base"]

    @model_validator(mode="after")
    def _limits_agree(self) -> "ServiceParams":
        if self.max_concurrency < self.max_queue:
            raise ValueError(f"max_concurrency ({self.max_concurrency}) must be at least max_queue "
                             f"({self.max_queue}): every admitted request is also in flight")
        if self.body_timeout_s >= self.timeout_s:
            raise ValueError(f"body_timeout_s ({self.body_timeout_s:g}) must be less than timeout_s "
                             f"({self.timeout_s}): reading the body is part of the request")
        return self


class FlowsParams(Section):
    train_concurrency: int = Field(2, ge=1, le=256)  # keywords in training at once (threads, or pool runs)
    work_pool: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # null: train in-process
    retries: int = Field(2, ge=0, le=10)  # per keyword, transient errors only; never a ConfigError
    retry_delay_s: float = Field(30.0, ge=0.0, le=3600.0)  # first retry's wait; each next one waits 2x longer
    retrain_cron: str = Field("0 3 * * 1", pattern=r"^\s*(\S+\s+){4}\S+\s*$")  # weekly, Monday 03:00
    retrain_timezone: str = "Asia/Seoul"  # the IANA time zone retrain_cron is read in (03:00 in Korea)
    promotion_margin: float = Field(0.01, ge=0.0, le=1.0)  # a candidate may score this much below the current
    failed_runs: str = Field("models/failed_runs.jsonl", min_length=1)  # a line per failed or crashed flow run
    notify_block: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")  # a saved Prefect Webhook block
    # services whose bank a promotion reloads (POST <url>/bank/reload, with TIPSEN_API_KEY as bearer key if set)
    reload_urls: list[Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")]] = Field([], max_length=32)
    # Task timeouts (s): a hung step fails its run (and its keyword, for training) instead of holding a worker
    train_timeout_s: float = Field(6 * 3600, gt=0, le=7 * 86400)
    curate_timeout_s: float = Field(2 * 3600, gt=0, le=7 * 86400)
    evaluate_timeout_s: float = Field(12 * 3600, gt=0, le=7 * 86400)

    @field_validator("retrain_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone; allowed: an IANA name such as Asia/Seoul or UTC") \
                from None
        return value


class Params(Section):
    """One resolved profile."""

    profile: str
    keywords: list[Slug] = Field(min_length=1)
    models: ModelsParams = ModelsParams()
    curate: CurateParams = CurateParams()
    train: TrainParams = TrainParams()
    generate: GenerateParams = GenerateParams()
    assistant: AssistantParams = AssistantParams()
    eval: EvalParams = EvalParams()
    service: ServiceParams = ServiceParams()
    flows: FlowsParams = FlowsParams()

    @field_validator("keywords")
    @classmethod
    def _known_keywords(cls, keywords: list[str]) -> list[str]:
        dup = sorted({k for k in keywords if keywords.count(k) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        registry = Registry.load()
        unknown = [k for k in keywords if k not in registry.keywords]
        if unknown:
            raise ValueError(f"unknown slug {unknown[0]!r}; allowed: {', '.join(registry.keywords)}")
        return keywords

    def log(self, level: int = logging.DEBUG) -> None:
        """The resolved config, at DEBUG for commands (shown with -v); the service logs it at INFO."""
        log.log(level, "resolved config: %s", self.model_dump(mode="json"))

    def override(self, section: str | None, changes: dict[str, Any], *, flags: bool = False) -> "Params":
        """A copy with `changes` applied to one section (None: the top level), validated as params.yaml is.

        A bad value raises ConfigError naming the key (`train.steps`) or, with `flags`, the command-line flag
        (`--steps`). Nested models in `changes` may be given as mappings."""
        data = self.model_dump()
        if section is None:
            data.update(changes)
        elif section not in data or not isinstance(data[section], dict):
            raise ConfigError(f"{section}: not a params section; allowed: "
                              f"{', '.join(k for k, v in data.items() if isinstance(v, dict))}")
        else:
            data[section] = {**data[section], **changes}
        try:
            return Params.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            if flags and err["loc"][:1] == (section,):
                err = {**err, "loc": err["loc"][1:]}
            raise ConfigError(describe(err, prefix="--" if flags else "",
                                       allowed=_allowed_keys(Params, err["loc"]))) from None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` was found."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        ann = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return []
        model = ann
    return sorted(k for k in model.model_fields if model is not Params or k != "profile")


def parse_params(raw: Any, *, source: str = PARAMS_FILE, profile: str | None = None) -> Params:
    """Validate a params mapping and return the selected profile."""
    if not isinstance(raw, dict):
        got = "nothing" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{source}: expected a mapping with 'profile' and 'profiles', got {got}")
    unknown = sorted(set(raw) - {"profile", "keywords", "profiles"}, key=str)
    profiles = raw.get("profiles")
    name = profile or os.environ.get("TIPSEN_PROFILE") or raw.get("profile")
    if unknown:
        raise ConfigError(f"{source}: {_misplaced(unknown[0], raw[unknown[0]], name)}")
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{source}: 'profiles' must map profile names to their sections")
    if name not in profiles:
        raise ConfigError(f"{source}: profile {name!r} is not defined; allowed: {', '.join(sorted(profiles))}")
    body = profiles[name] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: profiles.{name}: expected a mapping of sections")
    if "keywords" in body or "profile" in body:
        raise ConfigError(f"{source}: profiles.{name}: 'keywords' and 'profile' belong at the top level")
    try:
        return Params.model_validate({**body, "profile": name, "keywords": raw.get("keywords")})
    except ValidationError as exc:
        err = exc.errors()[0]
        top = err["loc"][:1] == ("keywords",)
        msg = describe(err, prefix="" if top else f"profiles.{name}", allowed=_allowed_keys(Params, err["loc"]))
        raise ConfigError(f"{source}: {msg}") from None


def _misplaced(key: Any, value: Any, profile: Any) -> str:
    """The message for an unknown top-level key. A section's key there is what `dvc exp run -S train.steps=25`
    writes (and DVC's `+train.steps` hint): name the key that works, under the active profile."""
    path, leaf = [str(key)], value
    while isinstance(leaf, dict) and len(leaf) == 1:  # train: {steps: 25} -> train.steps
        (k, leaf), = leaf.items()
        path.append(str(k))
    dotted = ".".join(path)
    if dotted.split(".")[0] not in Params.model_fields or not isinstance(profile, str):
        return f"unknown top-level key {key!r}; allowed: profile, keywords, profiles"
    where = f"profiles.{profile}.{dotted}"
    shown = f"={leaf}" if not isinstance(leaf, (dict, list)) else ""
    return (f"{dotted}: a profile's setting given at the top level; set {where} instead "
            f"(dvc exp run -S {where}{shown or '=...'})")


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the last one silently."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then an override is meant
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if line != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (first at line {line})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = PARAMS_FILE, *, profile: str | None = None) -> Params:
    """Load and validate `params.yaml`; `TIPSEN_PROFILE` overrides the file's `profile:`."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; --params needs a params file (YAML)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 YAML file ({exc.reason} at byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_params(raw, source=str(path), profile=profile)


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")


def run(args) -> int:
    """Print the resolved profile."""
    import json

    data = load_params(args.params, profile=args.profile).model_dump(mode="json")
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return 0
