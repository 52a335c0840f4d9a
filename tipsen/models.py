"""Model references -> loaded components.

A reference is a Hugging Face id, a local directory, or `tiny:<name>`. A tiny reference is built once,
offline and deterministically, into a local directory with `save_pretrained`; from then on it loads through
exactly the same loader as any other local directory, so no code path exists only for tiny models.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from tipsen.errors import ConfigError
from tipsen.io import publish_dir

log = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()  # diffusers/transformers loading is not thread-safe (meta-tensor init)
TINY_VERSION = "v1"  # bump when a tiny architecture changes, so cached builds are rebuilt
TINY_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("TIPSEN_HOME", Path.home() / ".cache" / "tipsen"))


# ---------------------------------------------------------------- devices


def resolve_device(pref: str = "auto") -> str:
    """`models.device`: auto takes CUDA, then MPS, then the CPU; a device named outright must be there, or this is
    a one-line ConfigError saying why (never a silent fall back to the CPU, where SDXL takes minutes a picture)."""
    import torch

    if pref == "cuda":
        with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA is unusable only as a warning
            warnings.simplefilter("always")
            usable = torch.cuda.is_available()
        if not usable:
            why = ("this torch build has no CUDA" if torch.version.cuda is None else
                   next((" ".join(str(w.message).split())[:300] for w in caught if "CUDA" in str(w.message)),
                        f"no NVIDIA GPU or driver was found (torch {torch.__version__} is built for CUDA "
                        f"{torch.version.cuda}; the driver must support it)"))
            raise ConfigError(f"models.device: cuda, but CUDA is not usable here: {why}; use device: auto to run "
                              "on the CPU instead (slow)")
        return "cuda"
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("models.device: mps, but Apple's Metal backend is not available here; use device: auto")
    if pref != "auto":
        return pref
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(pref: str, device: str):
    """`models.dtype`: auto is bf16 on a CUDA GPU that computes in it (Ampere and later), fp16 on an older one, and
    fp32 elsewhere (bf16 matrix products are slow on CPUs)."""
    import torch

    if pref == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    return getattr(torch, pref)


# ---------------------------------------------------------------- tiny builders


def _clip_tokenizer(out: Path):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # Without model_max_length the SDXL pipeline overflows in encode_prompt.
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def _clip_text_config(tok, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64, scaling_factor=0.13025,
    )


def _unet_blocks() -> dict[str, Any]:
    return dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=1,
    )


def _sd_scheduler_config() -> dict[str, Any]:
    # The published SD/SDXL noise schedule.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def build_tiny_sdxl(out: Path) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(TINY_SEED)
    tok = _clip_tokenizer(out / "_tok")
    tok2 = _clip_tokenizer(out / "_tok2")
    text_encoder = CLIPTextModel(_clip_text_config(tok))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tok2))
    unet = UNet2DConditionModel(
        **_unet_blocks(), transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        cross_attention_dim=64,  # text encoder 1 hidden 32 + text encoder 2 hidden 32
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + text encoder 2 projection 32
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=EulerDiscreteScheduler(**_sd_scheduler_config(), interpolation_type="linear"),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")
    shutil.rmtree(out / "_tok2")


def build_tiny_sd(out: Path) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(TINY_SEED)
    tok = _clip_tokenizer(out / "_tok")
    unet = UNet2DConditionModel(**_unet_blocks(), cross_attention_dim=32)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_text_config(tok)), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(**_sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def build_tiny_clip(out: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # The layout of open_clip's hub repos, so the same `local-dir:` loader reads it.
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}, indent=2), encoding="utf-8")
    torch.manual_seed(TINY_SEED)
    model = open_clip.create_model(f"local-dir:{out}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")


def build_tiny_dino(out: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(TINY_SEED)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=64, patch_size=16)
    ViTModel(cfg).save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_tiny_llm(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # A byte-level BPE with no merges: every byte is a token, as in Llama 3's tokenizer before merges.
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>", additional_special_tokens=LLAMA3_SPECIALS[2:4])
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    torch.manual_seed(TINY_SEED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.8,
                                               top_p=0.9)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "sdxl": build_tiny_sdxl, "sd": build_tiny_sd, "clip": build_tiny_clip, "dino": build_tiny_dino,
    "llm": build_tiny_llm,
}


def tiny_path(name: str) -> Path:
    """Build a tiny model once (atomically, under a lock) and return its local directory."""
    from filelock import FileLock

    if name not in TINY_BUILDERS:
        raise ConfigError(f"model reference 'tiny:{name}': unknown tiny model; allowed: "
                          + ", ".join(f"tiny:{n}" for n in TINY_BUILDERS))
    root = cache_dir() / "tiny"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}-{TINY_VERSION}"
    with FileLock(str(final) + ".lock"):
        if not final.exists():
            log.info("building tiny:%s into %s", name, final)
            with publish_dir(final) as tmp:
                TINY_BUILDERS[name](tmp)
    return final


# ---------------------------------------------------------------- hub ids and local copies

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # ORG/NAME, as the Hub spells repository ids
# The files each loader reads from a hub repository: safetensors weights without a variant (the loaders pass no
# `variant`), configs and tokenizers; never pickles (*.bin, *.ckpt, *.pt), other frameworks' weights or a
# repository's single-file checkpoints beside the pipeline's folders.
PIPELINE_FILES = {"include": ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"],
                  "exclude": ["*.fp16.safetensors", "*/*/*"]}
LLM_FILES = {"include": ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"],
             "exclude": ["*/*", "*.fp16.safetensors"]}
_LOCAL: dict[str, Path] = {}  # hub id -> the local copy it loads from (a Bento's packed model)


def hub_id(ref: str) -> str | None:
    """`ref` when loading it would fetch a hub repository: not tiny:, not hf-hub: (open_clip), not a local path."""
    if ref.startswith(("tiny:", "hf-hub:")) or not HUB_ID.match(ref) or Path(ref).expanduser().exists():
        return None
    return ref


def packed(params) -> dict[str, dict[str, list[str]]]:
    """The hub repositories a Bento of `params` packs (service.pack), each with the files its loader reads."""
    m, pack = params.models, params.service.pack
    wanted = [(m.base, PIPELINE_FILES)] if "base" in pack else []
    if "llm" in pack and params.assistant.backend == "transformers":
        wanted.append((m.llm, LLM_FILES))
    return {ref: files for ref, files in wanted if hub_id(ref)}


def use_local_copy(ref: str, path: str | Path) -> None:
    """Load the hub id `ref` from `path` from now on. Its name stays `ref` wherever it is recorded or compared."""
    _LOCAL[ref] = Path(path)


def local_snapshot(repo_id: str, *, revision: str, files: dict[str, list[str]], cache_dir: str | None) -> Path:
    """The complete local copy of a hub snapshot packed beforehand, or a one-line ConfigError. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    where = cache_dir or "the Hugging Face cache"
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=files["include"], ignore_patterns=files["exclude"]))
    except IncompleteSnapshotError as exc:  # its message names the missing files, then gives advice
        missing = str(exc).partition(" is incomplete: ")[2].partition(". ")[0] or "files are missing"
        raise ConfigError(f"model {repo_id!r}: the packed copy in {where} is incomplete ({missing}); nothing is "
                          "downloaded at serve time") from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"model {repo_id!r} (revision {revision}): no packed copy in {where}; nothing is "
                          "downloaded at serve time") from None


def resolve_ref(ref: str) -> str:
    """A tiny reference becomes its local directory, and so does a hub id with a local copy; any other local path
    or hub id passes through unchanged."""
    if not ref or not isinstance(ref, str):
        raise ConfigError(f"model reference {ref!r}: expected a hub id, a local directory or tiny:<name>")
    if ref.startswith("tiny:"):
        return str(tiny_path(ref.removeprefix("tiny:")))
    if ref in _LOCAL:
        return str(_LOCAL[ref])
    return ref


# ---------------------------------------------------------------- loaders


def load_pipeline(ref: str, *, pipeline_class: str = "auto", device: str = "auto", dtype: str = "auto",
                  **components):
    """Load a text-to-image diffusers pipeline from safetensors only; `components` (e.g. `unet=`) are used as
    given instead of being loaded."""
    import diffusers

    device = resolve_device(device)
    path = resolve_ref(ref)
    cls = diffusers.AutoPipelineForText2Image if pipeline_class == "auto" else getattr(diffusers, pipeline_class)
    with _LOAD_LOCK:
        pipe = cls.from_pretrained(path, dtype=resolve_dtype(dtype, device), use_safetensors=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_base(params, *, base: str | None = None, device: str | None = None, dtype: str | None = None, **components):
    """The profile's pipeline (`models.*`), or another `base` with the profile's settings. `models.vae` replaces
    the VAE of the profile's own base model only (an fp16-safe SDXL VAE is SDXL's, not SD 1.x's)."""
    m = params.models
    ref, device = base or m.base, resolve_device(device or m.device)
    dtype = dtype or m.dtype
    if m.vae and ref == m.base and "vae" not in components:
        from diffusers import AutoencoderKL

        with _LOAD_LOCK:
            components["vae"] = AutoencoderKL.from_pretrained(resolve_ref(m.vae), dtype=resolve_dtype(dtype, device),
                                                              use_safetensors=True)
    return load_pipeline(ref, pipeline_class=m.pipeline_class, device=device, dtype=dtype, **components)


def load_clip(ref: str, *, device: str = "auto"):
    """An open_clip model, its eval transform and tokenizer, from safetensors only.

    `tiny:clip`, a local directory in open_clip's hub layout (`open_clip_config.json` +
    `open_clip_model.safetensors`), or `hf-hub:ORG/REPO`, of which only those two files are fetched.
    """
    import open_clip

    device = resolve_device(device)
    path = resolve_ref(ref)
    if path.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path.removeprefix("hf-hub:"),
                                 allow_patterns=["open_clip_config.json", "open_clip_model.safetensors"])
    local = Path(path)
    if not (local / "open_clip_config.json").is_file() or not (local / "open_clip_model.safetensors").is_file():
        raise ConfigError(f"CLIP reference {ref!r}: expected tiny:clip, hf-hub:ORG/REPO or a directory with "
                          "open_clip_config.json and open_clip_model.safetensors")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{local}", device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{local}")


def load_llm(ref: str, *, device: str = "auto", dtype: str = "auto"):
    """A causal LM and its tokenizer (with chat template), from safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    path = resolve_ref(ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), use_safetensors=True)
    return model.to(device).eval(), tokenizer


def load_vision(ref: str, *, device: str = "auto"):
    """A transformers vision backbone (DINO, DINOv2) and its image processor, from safetensors only."""
    from transformers import AutoImageProcessor, AutoModel

    device = resolve_device(device)
    path = resolve_ref(ref)
    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True)
    return model.to(device).eval(), processor


# ---------------------------------------------------------------- fetching a profile's models

CLIP_FILES = {"include": ["open_clip_config.json", "open_clip_model.safetensors"], "exclude": []}
TRANSFORMERS_FILES = {"include": ["*.json", "*.safetensors", "*.txt"], "exclude": ["*/*"]}  # DINO
VAE_FILES = {"include": ["config.json", "*.safetensors"], "exclude": ["*/*", "*.fp16.safetensors"]}


def references(params) -> list[tuple[str, str, dict[str, list[str]]]]:
    """Every model the profile names that comes from the Hub: (params field, repository id, the files its loader
    reads). tiny: references and local folders are left out; each repository is listed once."""
    m, wanted = params.models, []
    wanted.append(("models.base", m.base, PIPELINE_FILES))
    wanted += [(f"eval.methods[{i}].base", e.base, PIPELINE_FILES) for i, e in enumerate(params.eval.methods)]
    wanted.append(("models.clip", m.clip.removeprefix("hf-hub:") if m.clip.startswith("hf-hub:") else "",
                   CLIP_FILES))
    if m.dino:
        wanted.append(("models.dino", m.dino, TRANSFORMERS_FILES))
    if params.assistant.backend == "transformers":
        wanted.append(("models.llm", m.llm, LLM_FILES))
    if m.vae:
        wanted.append(("models.vae", m.vae, VAE_FILES))
    seen, out = set(), []
    for field, ref, files in wanted:
        repo = ref if ref and hub_id(ref) else None
        if repo and repo.lower() not in seen:
            seen.add(repo.lower())
            out.append((field, repo, files))
    return out


def fetch(params, *, progress: bool = True) -> list[dict]:
    """Download every Hub model of the profile (safetensors, configs and tokenizers only) into the Hugging Face
    cache, where the loaders read them; report each one's revision, files and size. A gated repository without
    access, or a repository that cannot be had, is a one-line ConfigError naming the field."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()
    report = []
    for field, repo, files in references(params):
        try:
            path = Path(snapshot_download(repo, allow_patterns=files["include"],
                                          ignore_patterns=files["exclude"] or None))
        except GatedRepoError:
            raise ConfigError(f"{field}: {repo} is gated; accept its licence on its Hub page with your account, "
                              "then set HF_TOKEN to a token of that account") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"{field}: {repo} is not on the Hub (or is private: set HF_TOKEN)") from None
        except LocalEntryNotFoundError:
            raise ConfigError(f"{field}: {repo} is not in the local cache and the Hub cannot be reached (is "
                              "HF_HUB_OFFLINE set?)") from None
        weights = sorted(p for p in path.rglob("*") if p.is_file())
        report.append({"field": field, "repo": repo, "revision": path.name, "files": len(weights),
                       "bytes": sum(p.stat().st_size for p in weights), "path": str(path)})
        log.info("%s: %s at %s, %d files, %.1f MB", field, repo, path.name[:12], len(weights),
                 report[-1]["bytes"] / 1e6)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("refs", nargs="+", help="'fetch': download every Hub model the profile names (the base, each "
                                                "evaluation method's base, CLIP, DINO, the LLM, a VAE); or model "
                                                "references to build (tiny:*) and resolve, e.g. tiny:sdxl tiny:clip")
    parser.add_argument("--no-progress", action="store_true", help="fetch: no download bars")


def run(args) -> int:
    """`fetch`: download the profile's models and print one JSON line per repository. Otherwise build tiny models
    (if needed) and print where each reference resolves."""
    if args.refs == ["fetch"]:
        from tipsen.config import load_params

        for row in fetch(load_params(args.params, profile=args.profile), progress=not args.no_progress):
            print(json.dumps(row))
        return 0
    for ref in args.refs:
        print(f"{ref}\t{resolve_ref(ref)}")
    return 0
