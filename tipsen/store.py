"""The bank store: every adapter of the bank in per-layer stacked tensors, drawn per row, swapped while serving.

Loading a bank through diffusers' `load_lora_weights` wraps each of SDXL's 560 attention projections in peft layers
once per adapter: seconds per adapter, minutes for a bank of 30. The store instead reads each verified file once and
writes its matrices into one stack per layer, `A` [adapters, rank, in] and `B` [adapters, out, rank] (B already
multiplied by the adapter's alpha/rank, both in the pipeline's dtype and on its device). A forward hook on each
covered linear layer adds, for every row of a batch, the sum of its adapters' updates `s_k B_k A_k x`: the row's
adapters are concatenated along the rank, so any mix of zero, one or several adapters per row costs two batched
matrix products per layer.

What the store cannot hold (a convolution LoRA, DoRA, LoRA biases, a layer pattern of ranks or alphas) goes through
peft's path as before (`tipsen.lora_batch`), and each adapter's path is reported.

**Versions.** A `Version` is an immutable snapshot: the stacks, the adapters it holds and why the others are not
there. `BankStore.prepare(bank)` builds the next version beside the serving one (new and changed files are read and
verified; unchanged adapters are copied over from the serving stacks without touching their files) and
`BankStore.swap(version)` makes it current. A batch captures the version it starts with (`BankStore.batch`), so a
swap never changes the weights under a running batch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import threading
import time
from contextlib import contextmanager, nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tipsen.lora_batch import add_rows, components, expected_warnings_quiet, per_sample

if TYPE_CHECKING:
    from tipsen.bank import Bank, BankEntry

log = logging.getLogger(__name__)

STORE, PEFT = "store", "peft"  # an adapter's path
_PREFIXES = ("unet", "text_encoder", "text_encoder_2")


class PeftOnly(Exception):
    """The adapter holds something the store does not draw; it goes through peft's path. The message says what."""


class Unavailable(Exception):
    """The adapter cannot be used at all; the message is the reason reported for it."""


@dataclass(frozen=True)
class Loaded:
    """One adapter as a version holds it."""

    slug: str
    sha256: str
    path: str  # STORE or PEFT
    loaded_at: float  # when its file was read (time.time()); kept across swaps while the file is unchanged
    why_peft: str | None = None  # what kept it out of the store
    peft_name: str | None = None  # its peft adapter name (PEFT only): the slug and the version it came in with
    modules: int = 0
    nbytes: int = 0  # resident bytes in the stacks (STORE)


@dataclass
class _Stack:
    a: object  # torch.Tensor [n, rank, in]
    b: object  # torch.Tensor [n, out, rank], alpha/rank folded in
    slot: dict[str, int]  # slug -> row of the stack


@dataclass
class Version:
    number: int = 0
    adapters: dict[str, Loaded] = field(default_factory=dict)  # usable adapters
    reasons: dict[str, str | None] = field(default_factory=dict)  # every bank slug -> None, or why it is unusable
    entries: dict = field(default_factory=dict)  # slug -> BankEntry (the index's record)
    stacks: dict[str, _Stack] = field(default_factory=dict)  # module name -> stack
    refused: dict[str, str] = field(default_factory=dict)  # index entries refused by the index itself
    bank_error: str | None = None
    loaded_s: float = 0.0

    @property
    def available(self) -> list[str]:
        return sorted(self.adapters)

    def nbytes(self) -> int:
        return sum(s.a.nbytes + s.b.nbytes for s in self.stacks.values())


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def map_safetensors(path: Path) -> tuple[dict[str, str], dict, str]:
    """A safetensors file mapped once: its `__metadata__`, its tensors as views of the mapping (no copy) and the
    sha256 of its bytes. Raises Unavailable for a file that is missing, unreadable or not safetensors.

    The mapping is private (copy-on-write) and the bank's files are published by rename, never rewritten in place,
    so the bytes hashed are the bytes the views read."""
    import mmap
    import warnings

    import torch

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO or a device never blocks the reader
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Unavailable(f"not a regular file: {path.name}")
            size = info.st_size
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else b""
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise Unavailable(f"file missing: {path.name}") from None
    except OSError as exc:
        raise Unavailable(f"cannot be read ({exc.strerror})") from None
    sha = hashlib.sha256(mm).hexdigest()
    try:
        n = int.from_bytes(mm[:8], "little")
        if size < 8 or n <= 1 or n > size - 8:
            raise ValueError("its header length is wrong")
        header = json.loads(bytes(mm[8:8 + n]))
        meta, tensors = header.pop("__metadata__", None) or {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.frombuffer on a mapping
            for key, spec in header.items():
                dtype = getattr(torch, _DTYPES.get(spec["dtype"], ""), None)
                if dtype is None:
                    raise ValueError(f"{key}: dtype {spec['dtype']} is not a float")
                start, end = spec["data_offsets"]
                count = math.prod(spec["shape"])
                if not 0 <= start <= end <= size - 8 - n or end - start != count * dtype.itemsize:
                    raise ValueError(f"{key}: its data offsets are wrong")
                tensors[key] = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start) \
                    .reshape(spec["shape"]) if count else torch.zeros(spec["shape"], dtype=dtype)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise Unavailable(f"not a readable safetensors file ({exc})") from None
    return meta, tensors, sha


def lora_updates(pipe_cls, tensors: dict, header: dict[str, str]) -> dict[str, tuple]:
    """{module name: (A [r, in], B [out, r], alpha/r)} of a LoRA file's tensors, in diffusers' layout (read
    directly) or another one such as kohya's (converted by diffusers' own `lora_state_dict`), with the scale peft
    would give each layer.

    Raises PeftOnly for what only peft draws (biases, DoRA, per-layer patterns) and Unavailable for what is no
    LoRA at all."""
    meta = json.loads(header.get("lora_adapter_metadata") or "{}")
    for key in ("alpha_pattern", "rank_pattern"):
        if any(meta.get(f"{p}.{key}") for p in _PREFIXES):
            raise PeftOnly(f"a per-layer {key.split('_')[0]} pattern")
    for key in ("use_dora", "lora_bias"):
        if any(meta.get(f"{p}.{key}") for p in _PREFIXES):
            raise PeftOnly("DoRA" if key == "use_dora" else "LoRA biases")
    direct = _diffusers_layout(tensors, meta)
    if direct is not None:
        return direct
    try:
        with expected_warnings_quiet():
            state, alphas = pipe_cls.lora_state_dict(dict(tensors), use_safetensors=True)
    except (ValueError, KeyError, TypeError) as exc:  # diffusers cannot read it as a LoRA of this pipeline
        raise Unavailable(f"not a LoRA this pipeline reads ({(str(exc).splitlines() or [type(exc).__name__])[0]})")
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    downs = [k for k in state if k.endswith("down.weight")]
    default_alpha = state[downs[0]].shape[0] if downs else None  # diffusers' default without metadata: the rank
    for down in downs:  # each layer's alpha/rank folded into its up matrix, before the keys are converted
        rank = state[down].shape[0]
        alpha = (alphas or {}).get(f"{down}.alpha")  # a kohya file: each layer's own
        alpha = float(alpha if alpha is not None else meta.get(f"{down.split('.')[0]}.lora_alpha") or default_alpha)
        up = down.removesuffix("down.weight") + "up.weight"
        if up in state:
            state[up] = state[up] * (alpha / rank)
    peft_state = {}
    for prefix in _PREFIXES:
        part = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.split(".")[0] == prefix}
        convert = convert_unet_state_dict_to_peft if prefix == "unet" else convert_state_dict_to_peft
        peft_state.update({f"{prefix}.{k}": v for k, v in (convert(part) if part else {}).items()})
    if other := sorted({k.split(".")[0] for k in state} - set(_PREFIXES)):
        raise Unavailable(f"layers of {', '.join(other)}, which this pipeline does not have")
    parts: dict[str, dict[str, object]] = {}
    for key, value in peft_state.items():
        kind = next((k for k in ("lora_A.weight", "lora_B.weight") if key.endswith("." + k)), None)
        if kind is None:
            raise PeftOnly(f"{key.rsplit('.', 1)[-1]} tensors beside the LoRA matrices (e.g. {key})")
        parts.setdefault(key[:-len(kind) - 1], {})[kind[5]] = value
    if not parts:
        raise Unavailable("no LoRA layers in the file")
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise Unavailable(f"{module}: only one of its two LoRA matrices")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise PeftOnly(f"{module}: a {a.ndim}-d LoRA (a convolution)")
        out[module] = (a, b, 1.0)  # alpha/rank is already in b
    return out


_SUFFIXES = {".lora.down.weight": "A", ".lora.up.weight": "B", ".lora_A.weight": "A", ".lora_B.weight": "B"}


def _diffusers_layout(tensors: dict, meta: dict) -> dict[str, tuple] | None:
    """The updates of a file in diffusers' own layout (tipsen's: `unet.<module>.lora.down.weight` / `.up.weight`,
    or peft's lora_A / lora_B), without converting it; None for any other layout."""
    parts: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        suffix = next((x for x in _SUFFIXES if key.endswith(x)), None)
        if suffix is None or key.split(".")[0] not in _PREFIXES or ".processor." in key:
            return None
        parts.setdefault(key[:-len(suffix)], {})[_SUFFIXES[suffix]] = value
    if not parts or any(set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].ndim != 2 for ab in parts.values()):
        return None
    first = next(iter(parts.values()))["A"].shape[0]  # diffusers' default without metadata: alpha = the first rank
    out = {}
    for module, ab in parts.items():
        rank = ab["A"].shape[0]
        alpha = float(meta.get(f"{module.split('.')[0]}.lora_alpha") or first)
        out[module] = (ab["A"], ab["B"], alpha / rank)
    return out


class BankStore:
    """The bank's adapters for one pipeline. `prepare` builds versions, `swap` serves one, `batch` draws rows."""

    def __init__(self, pipe, *, known: set[str], base: str | None = None):
        import torch

        self.pipe, self.known, self.base = pipe, set(known), base
        self.modules = components(pipe)
        self.linears: dict[str, torch.nn.Linear] = {}
        for prefix in _PREFIXES:
            component = getattr(pipe, prefix, None)
            for name, module in (component.named_modules() if component is not None else ()):
                if isinstance(module, torch.nn.Linear):
                    self.linears[f"{prefix}.{name.replace('.base_layer', '')}"] = module
        self.version = Version()
        self._hooked: dict = {}  # module name -> its hook's handle
        self._active: tuple | None = None  # (version, rows table, cache) while a batch runs
        self._lock = threading.Lock()  # one prepare at a time
        self._numbers = 0
        self.threads = max(1, min(4, os.cpu_count() or 1))  # files read and hashed at once
        self.seen: set[str] = set()  # every slug any version served (a plan may name one a reload took out)

    # ------------------------------------------------------------------ building versions

    def prepare(self, bank: Bank | None, bank_error: str | None = None) -> Version:
        """The next version for `bank` (None: no adapters), built beside the serving one.

        Raises RuntimeError if another prepare is running (the service answers 409)."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a bank reload is already running")
        try:
            return self._prepare(bank, bank_error)
        finally:
            self._lock.release()

    def _prepare(self, bank: Bank | None, bank_error: str | None) -> Version:
        t0, old = time.perf_counter(), self.version
        self._numbers += 1
        new = Version(number=self._numbers, bank_error=bank_error)
        if bank is None:
            return new
        new.entries, new.refused = dict(bank.entries), dict(bank.invalid)
        new.reasons = {}
        for slug, why in bank.invalid.items():
            if slug in self.known:
                self._refused(new, old, slug, f"refused by the index: {why}")
        updates: dict[str, dict] = {}  # slug -> module -> (A, B, scale), for adapters read now
        todo = []
        for entry in bank:
            kept = old.adapters.get(entry.slug)
            if kept and kept.sha256 == entry.sha256 and old.entries[entry.slug].path == entry.path:
                new.adapters[entry.slug] = kept  # unchanged: its tensors are copied from the serving stacks
                new.reasons[entry.slug] = None
            else:
                todo.append(entry)
        with ThreadPoolExecutor(self.threads) as pool:  # hashing and reading release the GIL
            read = list(pool.map(self._try_read, todo))
        for entry, got in zip(todo, read):
            if isinstance(got, Unavailable):
                self._refused(new, old, entry.slug, str(got))
                continue
            if isinstance(got, str):  # peft's path
                loaded = self._load_peft(entry, got, new.number)
                if loaded.peft_name is None:
                    self._refused(new, old, entry.slug, loaded.why_peft)
                    continue
                new.adapters[entry.slug] = loaded
            else:
                updates[entry.slug] = got
                new.adapters[entry.slug] = Loaded(entry.slug, entry.sha256, STORE, time.time(), modules=len(got))
            new.reasons[entry.slug] = None
        self._stack(new, old, updates)
        del updates, read  # the files' mappings go with their views
        new.loaded_s = time.perf_counter() - t0
        return new

    @staticmethod
    def _refused(new: Version, old: Version, slug: str, why: str) -> None:
        """`slug`'s new entry or file cannot be used: unavailable, unless the serving version has it, which then
        keeps serving (its reason says so)."""
        if slug in old.adapters:
            new.adapters[slug] = old.adapters[slug]
            new.entries[slug] = old.entries[slug]
            why = f"the new version was refused ({why}); the one loaded before serves"
        log.warning("adapter %s: %s", slug, why)
        new.reasons[slug] = why

    def _try_read(self, entry: BankEntry) -> dict | str | Unavailable:
        try:
            return self._read(entry)
        except Unavailable as exc:
            return exc

    def _read(self, entry: BankEntry) -> dict | str:
        """An adapter's per-module updates (views of its mapped file), verified; a str: why it goes through peft's
        path. Raises Unavailable with the reason it cannot be used."""
        import torch

        if entry.slug not in self.known:
            raise Unavailable("not in the keyword registry")
        if entry.path.suffix != ".safetensors":  # never hand a pickle to a loader
            raise Unavailable(f"not a safetensors file: {entry.path.name}")
        header, tensors, sha = map_safetensors(entry.path)
        if sha != entry.sha256:
            raise Unavailable("checksum mismatch")
        trained = header.get("tipsen.base_model")
        if self.base and trained and trained != self.base:
            raise Unavailable(f"trained on {trained!r}, not on this service's base model {self.base!r}")
        try:
            updates = lora_updates(type(self.pipe), tensors, header)
        except PeftOnly as exc:
            for key, t in tensors.items():  # the store checks its own stacks (_stack); peft's path is checked here
                if not bool(torch.isfinite(t).all()):
                    raise Unavailable(f"non-finite values in {key}") from None
            return f"peft's path: it holds {exc}"
        for module, (a, b, _) in updates.items():
            layer = self.linears.get(module)
            if layer is None:
                if _find(self.pipe, module) is None:
                    raise Unavailable(f"its layer {module} is not in this model (trained on another base model?)")
                return f"peft's path: {module} is not a linear layer"
            if (a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
                raise Unavailable(f"{module}: shape {tuple(b.shape[:1]) + tuple(a.shape[1:])} does not fit this "
                                  f"model's {layer.out_features}x{layer.in_features} (another base model?)")
        return updates

    def _load_peft(self, entry: BankEntry, why: str, number: int) -> Loaded:
        """Load an adapter the store cannot hold with diffusers/peft, under a name of its own for this version."""
        name = f"{entry.slug}__v{number}"
        try:
            with expected_warnings_quiet():
                self.pipe.load_lora_weights(str(entry.path.parent), weight_name=entry.path.name, adapter_name=name,
                                            use_safetensors=True, low_cpu_mem_usage=True)
            from tipsen.lora_batch import lora_layers

            for layer in lora_layers(self.modules):
                layer.set_adapter([], inference_mode=True)  # never active: only per-row names apply it
        except Exception as exc:  # one bad adapter must not take the bank down; the reason is reported
            self._delete_peft(name)
            reason = f"load failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            log.warning("adapter %s unavailable: %s", entry.slug, reason)
            return Loaded(entry.slug, entry.sha256, PEFT, time.time(), why_peft=reason)
        log.info("adapter %s goes through %s", entry.slug, why)
        return Loaded(entry.slug, entry.sha256, PEFT, time.time(), why_peft=why, peft_name=name)

    def _delete_peft(self, name: str) -> None:
        try:
            self.pipe.delete_adapters(name)
        except Exception as exc:  # harmless if left: only named adapters run
            log.warning("could not remove peft adapter %s: %s", name, exc)

    def _stack(self, new: Version, old: Version, updates: dict[str, dict]) -> None:
        """Build `new`'s stacks: adapters read now from `updates` (cast to the pipeline's dtype, alpha/rank folded
        into B), kept ones copied from `old`'s stacks; then every stack checked for NaNs and infinities."""
        import torch

        device, dtype = self.pipe.device, self.pipe.dtype
        new.stacks = {}
        modules: dict[str, list[str]] = {}
        for slug, loaded in new.adapters.items():
            if loaded.path != STORE:
                continue
            names = updates[slug] if slug in updates else [m for m, s in old.stacks.items() if slug in s.slot]
            for module in names:
                modules.setdefault(module, []).append(slug)

        def rank_of(slug: str, module: str) -> int:
            return updates[slug][module][0].shape[0] if slug in updates else int(old.stacks[module].a.shape[1])

        for module, slugs in modules.items():
            layer, rank = self.linears[module], max(rank_of(s, module) for s in slugs)
            kept = [s for s in slugs if s not in updates]
            fresh = sorted((s for s in slugs if s in updates),  # those of the layer's rank first: stacked at once
                           key=lambda s: updates[s][module][0].shape[0] != rank)
            stack = new.stacks[module] = _Stack(
                torch.empty(len(slugs), rank, layer.in_features, device=device, dtype=dtype),
                torch.empty(len(slugs), layer.out_features, rank, device=device, dtype=dtype),
                {s: i for i, s in enumerate(kept + fresh)})
            if kept:  # one gather per layer from the serving stack
                src, n = old.stacks[module], len(kept)
                idx, r = torch.tensor([src.slot[s] for s in kept], device=device), src.a.shape[1]
                if r == rank:
                    torch.index_select(src.a, 0, idx, out=stack.a[:n])
                    torch.index_select(src.b, 0, idx, out=stack.b[:n])
                else:  # a larger rank came in: zero-padded
                    stack.a[:n, :r], stack.a[:n, r:] = src.a[idx], 0
                    stack.b[:n, :, :r], stack.b[:n, :, r:] = src.b[idx], 0
            full = [s for s in fresh if updates[s][module][0].shape[0] == rank]
            if full:  # one cast per matrix and one stack per layer (far fewer calls than a copy per adapter)
                n, m = len(kept), len(full)
                got = [updates[s][module] for s in full]
                torch.stack([a.to(dtype) for a, _, _ in got], out=stack.a[n:n + m])
                torch.stack([(b if scale == 1.0 else b * scale).to(dtype) for _, b, scale in got],
                            out=stack.b[n:n + m])
            for i, slug in enumerate(fresh[len(full):], start=len(kept) + len(full)):  # smaller ranks: zero-padded
                ua, ub, scale = updates[slug][module]
                r = ua.shape[0]
                stack.a[i, :r], stack.a[i, r:] = ua, 0
                stack.b[i, :, :r], stack.b[i, :, r:] = (ub if scale == 1.0 else ub * scale), 0

        def finite(t) -> bool:  # a float32 sum is NaN or infinite if any value is (one pass, no temporary)
            return math.isfinite(float(t.sum(dtype=torch.float32)))

        def check(module: str) -> dict[str, str]:
            """The adapters with a NaN or an infinity in this layer's stack, after the cast (so a value beyond
            float16's range counts too): one test per stack, then per slot only when it fails."""
            stack, bad = new.stacks[module], {}
            if finite(stack.a) and finite(stack.b):
                return bad
            for slug, i in stack.slot.items():
                if not (finite(stack.a[i]) and finite(stack.b[i])):
                    bad[slug] = f"non-finite values in {module}" + (" (beyond float16's range?)"
                                                                    if dtype == torch.float16 else "")
            return bad

        failed: dict[str, str] = {}
        for module in new.stacks:
            for slug, why in check(module).items():
                failed.setdefault(slug, why)
        for slug, why in failed.items():  # its slots stay unused until the next reload
            for stack in new.stacks.values():
                stack.slot.pop(slug, None)
            del new.adapters[slug]
            updates.pop(slug, None)
            self._refused(new, old, slug, why)
        if any(slug in new.adapters for slug in failed):  # an old version serves on: its slots come from `old`
            self._stack(new, old, updates)
            return
        for slug, loaded in list(new.adapters.items()):
            if loaded.path == STORE:
                held = [(st, st.slot[slug]) for st in new.stacks.values() if slug in st.slot]
                new.adapters[slug] = Loaded(**{**loaded.__dict__, "modules": len(held),
                                               "nbytes": sum(st.a[i].nbytes + st.b[i].nbytes for st, i in held)})

    def swap(self, new: Version) -> Version:
        """Serve `new` from the next batch on; returns the version it replaces (whose peft adapters are removed).

        The caller runs it between two batches (the Generator holds its diffusion lock)."""
        for module in new.stacks:
            if module not in self._hooked:
                self._hooked[module] = self.linears[module].register_forward_hook(self._make_hook(module),
                                                                                  with_kwargs=True)
        old, self.version = self.version, new
        self.seen.update(new.adapters)
        keep = {a.peft_name for a in new.adapters.values() if a.peft_name}
        for loaded in old.adapters.values():
            if loaded.peft_name and loaded.peft_name not in keep:
                self._delete_peft(loaded.peft_name)
        return old

    def close(self) -> None:
        """Remove the store's hooks and its adapters from the pipeline (the pipeline draws the base model again)."""
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self.swap(Version(number=self._numbers + 1))

    def load(self, bank: Bank | None, bank_error: str | None = None) -> Version:
        """Prepare and serve a version at once (start-up, the CLI, the evaluation)."""
        self.swap(self.prepare(bank, bank_error=bank_error))
        return self.version

    # ------------------------------------------------------------------ drawing

    @contextmanager
    def batch(self, adapters: list[tuple[str, ...]], scales: list[tuple[float, ...]]) -> Iterator[Version]:
        """Inside the block, row i of every forward pass adds adapters[i] at scales[i] (an empty tuple: none).

        A module that sees the batch twice (classifier-free guidance) gets the rows twice. Store adapters go
        through the stacks; a peft-path adapter (at most one per row) through `tipsen.lora_batch.per_sample`."""
        version = self.version
        rows_store, peft_names, peft_scales = [], [], []
        for slugs, ss in zip(adapters, scales):
            unknown = [s for s in slugs if s not in version.adapters]
            if unknown:
                raise ValueError(f"batch: adapters {unknown} are not in bank version {version.number}")
            peft = [(version.adapters[s].peft_name, x) for s, x in zip(slugs, ss) if version.adapters[s].path == PEFT]
            if len(peft) > 1:
                raise ValueError(f"batch: a row holds {len(peft)} adapters that go through peft's path; one at most")
            rows_store.append([(s, x) for s, x in zip(slugs, ss) if version.adapters[s].path == STORE])
            peft_names.append(peft[0][0] if peft else None)
            peft_scales.append(peft[0][1] if peft else 0.0)
        n = len(adapters)
        table = {n: rows_store, 2 * n: rows_store + rows_store}
        hooks = per_sample(self.modules, peft_names, peft_scales) if any(peft_names) else nullcontext()
        if self._active is not None:
            raise RuntimeError("batch: another batch is drawing with this store")
        self._active = (version, table, {}) if any(rows_store) else None
        try:
            with hooks:
                yield version
        finally:
            self._active = None

    def _make_hook(self, module: str):
        def hook(layer, args, kwargs, out):
            active = self._active
            if active is None:
                return out
            version, table, cache = active
            stack = version.stacks.get(module)
            if stack is None:
                return out
            x = args[0] if args else kwargs["input"]
            rows = table.get(x.shape[0])
            if rows is None:
                raise RuntimeError(f"{module} saw batch {x.shape[0]}, expected one of {sorted(table)}")
            key = (module, x.shape[0], x.device, x.dtype)
            if key not in cache:
                cache[key] = _gather(stack, rows, x.device, x.dtype)
            got = cache[key]
            if got is None:
                return out
            return add_rows(out, x, *got)
        return hook

    # ------------------------------------------------------------------ fusing (single-keyword workloads)

    def fuse(self, slug: str, scale: float) -> None:
        """Add one adapter's update at `scale` to the base weights (its own path's way)."""
        loaded = self.version.adapters[slug]
        if loaded.path == PEFT:
            from tipsen.lora_batch import fuse

            fuse(self.modules, loaded.peft_name, scale)
            return
        self._fused = getattr(self, "_fused", [])
        for module, stack in self.version.stacks.items():
            if slug in stack.slot:
                self._add(module, stack, slug, scale)
                self._fused.append((module, stack, slug, scale))

    def unfuse(self) -> None:
        """Undo `fuse` (each cycle rounds the base weights once more, as peft's merge does)."""
        from tipsen.lora_batch import unfuse

        unfuse(self.modules)
        for module, stack, slug, scale in getattr(self, "_fused", []):
            self._add(module, stack, slug, -scale)
        self._fused = []

    def _add(self, module: str, stack: _Stack, slug: str, scale: float) -> None:
        import torch

        i, weight = stack.slot[slug], self.linears[module].weight
        with torch.no_grad():
            delta = stack.b[i].float() @ stack.a[i].float()
            weight.copy_((weight.float() + scale * delta).to(weight.dtype))


def _find(pipe, module: str):
    """The module of `pipe` that a LoRA key's module name addresses, or None."""
    prefix, _, name = module.partition(".")
    try:
        return getattr(pipe, prefix).get_submodule(name)
    except AttributeError:
        return None


def _gather(stack: _Stack, rows: list[list[tuple[str, float]]], device, dtype):
    """The rows' A [n, in, k*rank] and B*scale [n, k*rank, out] for one layer, each row's adapters side by side
    along the rank (k: the most adapters any row holds here; missing ones have scale 0), and the index of the rows
    that have any (None: all)."""
    import torch

    here = [[(stack.slot[s], x) for s, x in row if s in stack.slot] for row in rows]
    sel = [i for i, row in enumerate(here) if row]
    if not sel:
        return None
    k = max(len(here[i]) for i in sel)
    slots = torch.tensor([[j for j, _ in here[i]] + [0] * (k - len(here[i])) for i in sel], device=device)
    factor = torch.tensor([[x for _, x in here[i]] + [0.0] * (k - len(here[i])) for i in sel], device=device,
                          dtype=dtype)
    n, rank = len(sel), stack.a.shape[1]
    a = stack.a[slots].to(device, dtype)  # [n, k, r, in]
    b = stack.b[slots].to(device, dtype) * factor.view(n, k, 1, 1)  # [n, k, out, r]
    rows_a = a.reshape(n, k * rank, -1).transpose(1, 2).contiguous()  # [n, in, k*r]
    rows_b = b.permute(0, 2, 1, 3).reshape(n, -1, k * rank).transpose(1, 2).contiguous()  # [n, k*r, out]
    index = None if len(sel) == len(rows) else torch.tensor(sel, device=device)
    return index, rows_a, rows_b


def served(version: Version) -> dict[str, dict]:
    """Each usable adapter's path, sha256, when it was loaded and its resident bytes (GET /keywords, status)."""
    return {slug: {"path": a.path, "sha256": a.sha256, "why_peft": a.why_peft, "modules": a.modules,
                   "bytes": a.nbytes,
                   "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.loaded_at))}
            for slug, a in sorted(version.adapters.items())}
