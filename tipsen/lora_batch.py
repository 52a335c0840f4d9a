"""LoRA adapters loaded by peft, chosen per sample at run time: the path for what the bank store (tipsen.store) does
not hold, and for pipelines loaded the stock way (the GPU benchmark script).

One diffusion batch can mix adapters, each sample with its own adapter and scale. Two ways, chosen per layer:

- **Gathered** (plain LoRA on a linear layer, the bank's case): the adapters of a batch are stacked once per
  batch, each sample's A and B matrices are gathered by row, and two batched matrix products add every sample's
  own update, B_i A_i x_i times its scale, to the base output. The cost per layer is two batched products whatever
  the number of distinct adapters (the segmented-gather idea of multi-LoRA servers such as Punica and S-LoRA).
- **peft's mixed batch** (anything else: convolutions, DoRA, LoRA biases): peft's LoRA layers take
  `adapter_names` (one per sample) in `forward`; the diffusers UNet has no such argument, so forward pre-hooks pass
  it to each layer, as peft's own `_enable_peft_forward_hooks` does for transformers models. peft loops over the
  distinct adapters, one sub-batch each. It scales an adapter once per layer, not per sample, so each request's
  scale is applied by a forward hook on the adapter's `lora_B`, whose input is exactly that adapter's rows.

Either way every adapter keeps peft scale 1.0 and no request ever splits a batch because of its scale.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def expected_warnings_quiet():
    """Loading UNet-only adapters, several into one model: diffusers' "No LoRA keys associated to CLIPTextModel"
    and peft's "Already found a `peft_config`" are expected, so they are kept quiet unless tipsen logs at DEBUG
    (`tipsen ... -v`)."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    quiet = _QuietMissingKeys()
    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _layer_input(args, kwargs, table: dict):
    """A LoRA layer's input, checked against the row counts `table` knows (a batch, or twice it with guidance)."""
    x = args[0] if args else kwargs["x"]
    if x.shape[0] not in table:
        raise RuntimeError(f"LoRA layer saw batch {x.shape[0]}, expected one of {sorted(table)}")
    return x


def gatherable(layer, slugs) -> bool:
    """Whether `layer` can run the gathered path for `slugs`: plain LoRA on an unmerged linear layer."""
    import torch
    from peft.tuners.lora import Linear

    if type(layer) is not Linear or layer.merged or not isinstance(layer.get_base_layer(), torch.nn.Linear):
        return False
    for slug in slugs:
        if slug not in layer.lora_A:
            continue
        dropout = layer.lora_dropout[slug]
        plain = not (slug in getattr(layer, "lora_variant", {}) or layer.use_dora.get(slug))  # no DoRA and the like
        no_dropout = isinstance(dropout, torch.nn.Identity) or not dropout.training
        if not (plain and no_dropout and layer.lora_B[slug].bias is None):
            return False
    return True


class _Gathered:
    """A forward hook adding each row's own LoRA update to a linear layer's base output.

    Per batch (one `per_sample` block) and row count, the rows' A [n, r, in] and B*scale [n, out, r] are gathered
    once and reused at every denoising step: n * r * (in + out) values per layer, under 1 GB in bf16 over SDXL's
    560 attention projections for 8 guided images.
    Adapters of different ranks are zero-padded to the largest one, which changes nothing in the product.
    """

    def __init__(self, layer, rows: dict[int, tuple[list[str], list[float]]]):
        self.layer, self.rows, self.cache = layer, rows, {}

    def _weights(self, rows: int, device, dtype):
        import torch

        key = (rows, device, dtype)
        if key not in self.cache:
            layer = self.layer
            names, scales = self.rows[rows]
            sel = [i for i, n in enumerate(names) if n in layer.lora_A]
            if not sel:
                self.cache[key] = None
                return None
            slugs = sorted({names[i] for i in sel})
            rank = max(layer.lora_A[s].weight.shape[0] for s in slugs)

            def padded(w, dim):  # [r, in] or [out, r], zero-padded to `rank` along `dim`
                pad = [0, 0, 0, rank - w.shape[0]] if dim == 0 else [0, rank - w.shape[1]]
                return torch.nn.functional.pad(w, pad)

            a = torch.stack([padded(layer.lora_A[s].weight, 0) for s in slugs]).to(device, dtype)
            b = torch.stack([padded(layer.lora_B[s].weight, 1) for s in slugs]).to(device, dtype)
            which = torch.tensor([slugs.index(names[i]) for i in sel], device=device)
            factor = torch.tensor([scales[i] * layer.scaling[names[i]] for i in sel], device=device, dtype=dtype)
            rows_a = a[which].transpose(1, 2)  # [n, in, r]
            rows_b = (b[which] * factor.view(-1, 1, 1)).transpose(1, 2)  # [n, r, out]
            index = None if len(sel) == rows else torch.tensor(sel, device=device)
            self.cache[key] = (index, rows_a, rows_b)
        return self.cache[key]

    def __call__(self, module, args, kwargs, out):
        x = _layer_input(args, kwargs, self.rows)
        got = self._weights(x.shape[0], x.device, x.dtype)
        if got is None:
            return out
        return add_rows(out, x, *got)


def add_rows(out, x, index, rows_a, rows_b):
    """`out` (a layer's own output, changed in place) plus each row's update x_i A_i B_i: rows_a [n, in, r] and
    rows_b [n, r, out] for the rows in `index` (None: every row)."""
    if index is not None:
        x = x.index_select(0, index)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    if index is None:  # out += (x A) B in one fused product
        out.view(flat.shape[0], -1, out.shape[-1]).baddbmm_(flat.bmm(rows_a), rows_b)
        return out
    delta = flat.bmm(rows_a).bmm(rows_b).reshape(*x.shape[:-1], rows_b.shape[-1])
    return out.index_add_(0, index, delta.to(out.dtype))


@contextmanager
def per_sample(modules, names: list[str | None], scales: list[float], *, gather: bool = True) -> Iterator[None]:
    """Inside the block, sample i of every forward pass uses adapter names[i] (None: none) at scales[i].

    A module that sees the batch twice (classifier-free guidance: the unconditional half, then the
    conditional half) gets the names twice. `gather=False` runs every layer through peft's mixed batch.
    """
    names, scales = [n or BASE for n in names], list(scales)
    slugs = set(names) - {BASE}
    rows = {len(names): (names, scales), 2 * len(names): (names + names, scales + scales)}  # row count -> per row
    fast, layers = [], []  # gathered layers; peft's mixed batch for the rest
    for layer in lora_layers(modules):
        (fast if gather and slugs and gatherable(layer, slugs) else layers).append(layer)

    def pass_names(module, args, kwargs):
        kwargs["adapter_names"] = rows[_layer_input(args, kwargs, rows).shape[0]][0]
        return args, kwargs

    def base_only(module, args, kwargs):  # gathered layers: peft adds nothing, whatever adapter is active
        kwargs["adapter_names"] = [BASE] * _layer_input(args, kwargs, rows).shape[0]
        return args, kwargs

    # The factor for each adapter, in the order peft gathers its rows: ascending sample index.
    factors = {}
    for slug in slugs:
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

    handles = [layer.register_forward_pre_hook(base_only, with_kwargs=True) for layer in fast if layer.active_adapters]
    handles += [layer.register_forward_hook(_Gathered(layer, rows), with_kwargs=True) for layer in fast]
    handles += [layer.register_forward_pre_hook(pass_names, with_kwargs=True) for layer in layers]
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
