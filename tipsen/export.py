"""Adapters for other tools: `tipsen export SLUG --format kohya --out FILE` (or `--all --out DIR`).

The kohya/A1111 layout (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`) is what
AUTOMATIC1111, ComfyUI, SD.Next and kohya's sd-scripts load, and what diffusers' `load_lora_weights` reads as a
non-diffusers LoRA. The key mapping is diffusers' own (`convert_unet_state_dict_to_peft`, then
`convert_state_dict_to_kohya`); each `.alpha` is the adapter's own alpha, so the scale alpha/rank survives. The
header carries the `ss_*` metadata that LoRA managers read, the trigger words, and `sshs_model_hash`, the sha256 of
the tensor bytes as sd-scripts computes it. Adapters are addressed by bank slug and verified (checksum, finite
numbers) before they are converted.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from tipsen import paths
from tipsen.bank import Bank, adapter_metadata
from tipsen.errors import ConfigError
from tipsen.io import write_bytes_atomic
from tipsen.registry import Registry

log = logging.getLogger(__name__)

FORMATS = ("kohya",)
# the width of a UNet's cross-attention input names the model family (SD 1.x: CLIP-L; 2.x: OpenCLIP-H; SDXL: both)
FAMILIES = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}


def _tensor_hash(blob: bytes) -> str:
    """sd-scripts' `sshs_model_hash`: the sha256 of a safetensors file's tensor bytes (the header left out, so
    editing metadata keeps it)."""
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def to_kohya(weights: Path, *, alpha: float | None) -> dict:
    """An adapter file in diffusers' layout, as kohya tensors; `alpha` defaults to the rank (diffusers' default)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(str(weights))
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if len(unet) != len(state):
        other = sorted({k.split(".")[0] for k in state} - {"unet"})
        raise ConfigError(f"{weights.name}: only UNet adapters are exported; it also holds {', '.join(other)}")
    tensors = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()})
    for key in tensors:
        if key.endswith(".alpha"):
            rank = tensors[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
            tensors[key] = torch.tensor(float(alpha if alpha is not None else rank))
    return {k: v.contiguous() for k, v in tensors.items()}


def kohya_metadata(tensors: dict, *, slug: str, registry: Registry, meta: dict[str, str], base_model: str) -> dict:
    """The `ss_*` header of sd-scripts' train_network.py, from the adapter's own `tipsen.*` metadata."""
    kw = registry[slug]
    downs = {k: v for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    rank = max(v.shape[0] for v in downs.values())
    alpha = next(float(v) for k, v in tensors.items() if k.endswith(".alpha"))
    cross = {v.shape[1] for k, v in downs.items() if "attn2_to_k" in k}
    trigger = f"{kw.keyword} {kw.class_token}"  # the training prompt is "A photo of [keyword] [class]"
    size = meta.get("resolution")
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": FAMILIES.get(max(cross, default=0), "unknown"), "ss_sd_model_name": base_model,
        "ss_output_name": slug, "ss_max_train_steps": meta.get("steps", ""), "ss_steps": meta.get("steps", ""),
        "ss_resolution": f"({size}, {size})" if size else "",
        "ss_tag_frequency": json.dumps({slug: {trigger: 1}}, ensure_ascii=False),
        "modelspec.trigger_phrase": trigger, "modelspec.title": f"{kw.keyword} ({kw.ko})",
        **{f"tipsen.{k}": v for k, v in meta.items()},
    }


def export_kohya(bank: Bank, slug: str, out: Path, *, registry: Registry) -> dict:
    """Write `slug`'s verified adapter to `out` in the kohya layout, atomically; returns what was written."""
    from safetensors.torch import save

    if (reason := bank.reason(slug)) is not None:
        raise ConfigError(f"slug: {slug!r} cannot be exported: {reason}")
    entry = bank.entries[slug]
    meta = adapter_metadata(entry.path)
    alpha = entry.info.get("alpha")
    tensors = to_kohya(entry.path, alpha=float(alpha) if alpha is not None else None)
    header = kohya_metadata(tensors, slug=slug, registry=registry, meta=meta,
                            base_model=entry.info.get("base_model") or bank.base_model or "")
    digest = _tensor_hash(save(tensors))
    write_bytes_atomic(out, save(tensors, metadata={**header, "sshs_model_hash": digest}))
    log.info("exported %s to %s (kohya, %d tensors)", slug, out, len(tensors))
    return {"slug": slug, "out": str(out), "format": "kohya", "tensors": len(tensors), "sha256": digest,
            "trigger": header["modelspec.trigger_phrase"]}


def add_arguments(parser) -> None:
    parser.add_argument("slug", nargs="?", help="the keyword slug of the adapter (its bank entry)")
    parser.add_argument("--all", action="store_true", help="every adapter of the bank; --out is then a folder")
    parser.add_argument("--format", default="kohya", choices=FORMATS, help="kohya: AUTOMATIC1111, ComfyUI, sd-scripts")
    parser.add_argument("--out", required=True, help="the file to write (a folder with --all: OUT/SLUG.safetensors)")
    parser.add_argument("--bank", default=str(paths.BANK), help=f"the bank index (default: {paths.BANK})")


def run(args) -> int:
    import sys

    if bool(args.slug) == bool(args.all):
        raise ConfigError("slug: name one adapter's slug, or pass --all (not both)")
    registry, bank = Registry.load(), Bank(args.bank)
    if not args.all:
        registry.get(args.slug, field="slug")
        print(json.dumps(export_kohya(bank, args.slug, Path(args.out), registry=registry), ensure_ascii=False))
        return 0
    failed = {}
    for slug in [*bank.entries, *bank.invalid]:
        try:
            print(json.dumps(export_kohya(bank, slug, Path(args.out) / f"{slug}.safetensors", registry=registry),
                             ensure_ascii=False))
        except (ConfigError, KeyError) as exc:  # one adapter costs only itself
            failed[slug] = str(exc)
            print(f"tipsen export: {slug}: {exc}", file=sys.stderr)
    return 1 if failed else 0
