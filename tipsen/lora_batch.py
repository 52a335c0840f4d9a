"""The LoRA bank in memory: every adapter resident as a named peft adapter, chosen per sample at run time.

One diffusion batch can mix adapters. peft's LoRA layers take `adapter_names` (one per sample) in `forward`;
the diffusers UNet has no such argument, so forward pre-hooks pass it to every LoRA layer, as peft's own
`_enable_peft_forward_hooks` does for transformers models. peft scales each adapter once per layer, not per
sample, so each request's LoRA scale is applied by a forward hook on the adapter's `lora_B`, whose input is
exactly the rows of that adapter's samples. Every adapter therefore keeps peft scale 1.0 and no request ever
splits a batch because of its scale.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

from tipsen.bank import Bank

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # where diffusers puts LoRA layers in SD / SDXL


def components(pipe) -> list:
    return [m for m in (getattr(pipe, name, None) for name in COMPONENTS) if m is not None]


def lora_layers(modules) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for module in modules for m in module.modules() if isinstance(m, LoraLayer)]


class _QuietMissingKeys(logging.Filter):
    """diffusers warns for every text encoder an adapter has no keys for: expected here, 2 lines per adapter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No LoRA keys associated to" not in record.getMessage()


def load_adapters(pipe, bank: Bank, known: set[str]) -> dict[str, str | None]:
    """Load every verified adapter of `bank` under its slug; {slug: None if loaded, else why not}."""
    quiet = _QuietMissingKeys()
    diffusers_log = logging.getLogger("diffusers.loaders.lora_base")
    diffusers_log.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # many adapters is the point
            status = {entry.slug: _load_one(pipe, bank, entry, known) for entry in bank}
    finally:
        diffusers_log.removeFilter(quiet)
    for layer in lora_layers(components(pipe)):
        # No adapter is ever active: a LoRA applies only through per-sample names or fusion, so a layer
        # that a fused adapter does not cover cannot pick up whichever adapter diffusers activated last.
        layer.set_adapter([], inference_mode=True)
    return status


def _load_one(pipe, bank: Bank, entry, known: set[str]) -> str | None:
    if entry.slug not in known:
        reason = "not in the keyword registry"
    elif entry.path.suffix != ".safetensors":  # never hand a pickle to a loader
        reason = f"not a safetensors file: {entry.path.name}"
    else:
        reason = bank.verify(entry.slug)
    if reason is None:
        try:
            # weight_name ends in .safetensors and use_safetensors=True: diffusers has no pickle fallback.
            pipe.load_lora_weights(str(entry.path.parent), weight_name=entry.path.name, adapter_name=entry.slug,
                                   use_safetensors=True, low_cpu_mem_usage=True)  # no random init before loading
        except Exception as exc:  # one bad adapter must not take the bank down; the reason is reported
            reason = f"load failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            _drop(pipe, entry.slug)
    if reason:
        log.warning("adapter %s unavailable: %s", entry.slug, reason)
    return reason


def _drop(pipe, slug: str) -> None:
    """Remove whatever part of a failed adapter was injected (harmless if left: only named adapters run)."""
    try:
        pipe.delete_adapters(slug)
    except Exception as exc:  # recorded; the adapter is already marked unavailable
        log.warning("could not remove the partly loaded adapter %s: %s", slug, exc)


@contextmanager
def per_sample(modules, names: list[str | None], scales: list[float]) -> Iterator[None]:
    """Inside the block, sample i of every forward pass uses adapter names[i] (None: none) at scales[i].

    A module that sees the batch twice (classifier-free guidance: the unconditional half, then the
    conditional half) gets the names twice.
    """
    layers = lora_layers(modules)
    names = [n or BASE for n in names]
    by_rows = {len(names): names, 2 * len(names): names + names}

    def pass_names(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        if x.shape[0] not in by_rows:
            raise RuntimeError(f"LoRA layer saw batch {x.shape[0]}, expected {len(names)} or {2 * len(names)}")
        kwargs["adapter_names"] = by_rows[x.shape[0]]
        return args, kwargs

    # The factor for each adapter, in the order peft gathers its rows: ascending sample index.
    factors = {}
    for slug in set(names) - {BASE}:
        row = [s for n, s in zip(names, scales) if n == slug]
        factors[slug] = {len(row): row, 2 * len(row): row + row}
    cache: dict = {}

    def make_scale(slug):
        def scale_rows(module, inputs, out):
            key = (slug, out.shape[0], out.device, out.dtype)
            if key not in cache:
                import torch

                cache[key] = torch.tensor(factors[slug][out.shape[0]], device=out.device, dtype=out.dtype)
            return out * cache[key].view(-1, *([1] * (out.ndim - 1)))
        return scale_rows

    handles = [layer.register_forward_pre_hook(pass_names, with_kwargs=True) for layer in layers]
    handles += [layer.lora_B[slug].register_forward_hook(make_scale(slug))
                for layer in layers for slug in factors if slug in layer.lora_B]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fuse(modules, slug: str, scale: float) -> None:
    """Merge one adapter into the base weights at `scale` (for single-keyword workloads).

    Each fuse/unfuse cycle rounds the base weights once more (visibly so in bf16): switching keywords
    often belongs to the unfused per-sample path.
    """
    for layer in lora_layers(modules):
        if slug in layer.lora_A:
            layer.set_scale(slug, scale)
            layer.merge(adapter_names=[slug])


def unfuse(modules) -> None:
    """Undo `fuse`; merged adapters return to peft scale 1.0 (each request's scale is applied per sample)."""
    for layer in lora_layers(modules):
        merged = list(layer.merged_adapters)
        if merged:
            layer.unmerge()
            for slug in merged:
                layer.set_scale(slug, 1.0)
