"""The LoRA bank: `models/bank.json` indexes the trained adapters, addressed by slug only.

Layout: each adapter lives at `<bank dir>/loras/<slug>/pytorch_lora_weights.safetensors` with a
`train_summary.json` beside it. The index records each file's sha256; readers verify it before loading.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tipsen import paths
from tipsen.config import Slug, load_params
from tipsen.errors import ConfigError, first_error
from tipsen.io import sha256_file, write_json_atomic
from tipsen.registry import Registry

log = logging.getLogger(__name__)

BANK_FORMAT = 1
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SUMMARY_NAME = "train_summary.json"
META_PREFIX = "tipsen."  # safetensors metadata keys written by the trainer


def adapter_metadata(weights: Path) -> dict[str, str]:
    """The `tipsen.*` safetensors metadata of an adapter (header only; no tensors are read)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    return {k.removeprefix(META_PREFIX): v for k, v in meta.items() if k.startswith(META_PREFIX)}


def adapter_layout(weights: Path) -> tuple[str, dict[str, str]]:
    """An adapter file's layout, "diffusers" (tipsen's, `unet.…`) or "kohya" (`lora_unet_…`, an adapter trained
    elsewhere, e.g. with kohya's sd-scripts or `tipsen export`), and its whole metadata; header and key names only."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata() or {}
    return ("kohya" if keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys) else "diffusers"), header


def build_bank(loras: Path, out: Path, *, keywords: list[str], registry: Registry, base_model: str,
               allow_empty: bool = False) -> dict:
    """Index every trained adapter of `keywords` under `loras/` into `out`, atomically.

    A missing `loras` folder is an error, and so is replacing an index that has adapters with an empty one
    (a typo in --loras must not empty a served bank), unless `allow_empty`. So is an adapter file that is not
    safetensors (a pickle renamed, a broken copy) or a summary that is not JSON: it names the file."""
    from safetensors import SafetensorError

    loras, out = Path(loras), Path(out)
    if not loras.is_dir():
        raise ConfigError(f"--loras {loras}: not a folder of trained adapters")
    if not loras.resolve().is_relative_to(out.parent.resolve()):
        raise ConfigError(f"--loras {loras}: must be inside the index's folder {out.parent} (the index addresses "
                          "adapters by relative path)")
    entries, missing = [], []
    for slug in keywords:
        kw = registry[slug]
        weights = loras / slug / WEIGHTS_NAME
        if not weights.is_file():
            missing.append(slug)
            continue
        try:
            meta = adapter_metadata(weights)  # the header only: a pickle under this name is never unpickled
            layout, header = adapter_layout(weights)
        except SafetensorError as exc:
            raise ConfigError(f"--loras {loras}: {slug}/{WEIGHTS_NAME} is not a safetensors file ({exc}); "
                              "retrain the keyword or remove the file") from None
        summary_file = loras / slug / SUMMARY_NAME
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"--loras {loras}: {slug}/{SUMMARY_NAME} is not valid JSON "
                              f"({getattr(exc, 'msg', None) or exc.reason}); retrain the keyword or remove the "
                              "file") from None
        entries.append({
            "slug": slug, "keyword": kw.keyword, "class_token": kw.class_token, "ko": kw.ko,
            "aliases": list(kw.aliases), "category": kw.category,
            "path": weights.resolve().relative_to(out.parent.resolve()).as_posix(),
            "sha256": sha256_file(weights), "layout": layout,
            "rank": int(meta.get("rank") or header.get("ss_network_dim") or 0) or None,
            "alpha": float(meta.get("alpha") or header.get("ss_network_alpha") or 0) or None,
            "base_model": meta.get("base_model", base_model), "summary": summary,
        })
    if missing:
        log.warning("no trained adapter for: %s", ", ".join(missing))
    if not entries and not allow_empty and _has_adapters(out):
        raise ConfigError(f"--loras {loras}: no trained adapter for any of {len(keywords)} keywords; {out} has "
                          "adapters and is kept (pass --allow-empty to empty it)")
    bank = {"format": BANK_FORMAT, "base_model": base_model, "adapters": entries, "missing": missing}
    write_json_atomic(out, bank)
    return bank


def _has_adapters(index: Path) -> bool:
    try:
        return bool(json.loads(index.read_text(encoding="utf-8")).get("adapters"))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class BankEntry:
    slug: str
    keyword: str
    class_token: str
    ko: str
    path: Path
    sha256: str
    rank: int | None = None
    aliases: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class _Entry(BaseModel):
    """One index entry as it must be; other keys (category, summary, ...) are kept in `info` unchecked."""

    model_config = ConfigDict(extra="allow")

    slug: Slug
    keyword: str = Field(min_length=1)
    class_token: str = Field(min_length=1)
    ko: str = Field(min_length=1)
    path: str = Field(min_length=1, pattern=r"^[^\x00]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rank: int | None = Field(None, ge=1)
    aliases: list[str] = []


class Bank:
    """A read-only view of bank.json. Paths come from the index, never from a user string.

    A bad entry (a missing key, a wrong type, a path outside the index's folder) costs only its own keyword:
    it is left out of `entries` and its reason kept in `invalid`. Only an index that cannot be read at all is a
    ConfigError."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"bank: {self.path} not found; run 'tipsen bank build' (or 'dvc repro')") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"bank: {self.path} is not valid JSON ({getattr(exc, 'msg', exc.reason)})") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise ConfigError(f"bank: {self.path} cannot be read ({exc.strerror})") from None
        if not isinstance(raw, dict) or raw.get("format") != BANK_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(f"bank: {self.path}: format {got!r} is not supported; expected {BANK_FORMAT}")
        self.base_model = raw.get("base_model")
        self.entries: dict[str, BankEntry] = {}
        self.invalid: dict[str, str] = {}  # slug (or "adapters[i]" when it has none) -> why it is refused
        adapters = raw.get("adapters", [])
        for i, e in enumerate(adapters if isinstance(adapters, list) else []):
            name = e.get("slug") if isinstance(e, dict) and isinstance(e.get("slug"), str) else f"adapters[{i}]"
            entry, reason = self._check(e)
            if name in self.entries or self.invalid.get(name) == "listed twice in the index":
                self.entries.pop(name, None)  # which of the two is meant? neither is used
                reason = "listed twice in the index"
            if reason is not None:
                self.invalid[name] = reason
                log.warning("bank %s: entry %s refused: %s", self.path, name, reason)
                continue
            self.entries[name] = BankEntry(slug=entry.slug, keyword=entry.keyword, class_token=entry.class_token,
                                           ko=entry.ko, path=self._file(entry.path), sha256=entry.sha256,
                                           rank=entry.rank, aliases=entry.aliases, info=e)
        if not isinstance(adapters, list):
            self.invalid["adapters"] = f"expected a list of entries, got {type(adapters).__name__}"

    def _file(self, rel: str) -> Path:
        return (self.path.parent.resolve() / rel).resolve()

    def _check(self, e) -> tuple[_Entry | None, str | None]:
        """An index entry, validated, or why it cannot be used."""
        if not isinstance(e, dict):
            return None, f"an entry must be an object, got {type(e).__name__}"
        try:
            entry = _Entry.model_validate(e)
        except ValidationError as exc:
            return None, f"bad entry: {first_error(exc, show_input=False)}"
        root, rel = self.path.parent.resolve(), Path(entry.path)
        if rel.is_absolute() or root not in self._file(entry.path).parents:  # symlinks are resolved first
            return None, f"path {entry.path!r} points outside {root}"
        return entry, None

    def __iter__(self):
        return iter(self.entries.values())

    def __contains__(self, slug: str) -> bool:
        return slug in self.entries

    def base_models(self) -> set[str]:
        """The base models the indexed adapters were trained on; empty when the bank has none."""
        if not self.entries and not self.invalid:
            return set()
        return {self.base_model, *(e.info.get("base_model", self.base_model) for e in self.entries.values())}

    def reason(self, slug: str) -> str | None:
        """Why `slug` cannot be used (not in the index, a refused entry, or `verify`), or None."""
        if slug in self.invalid:
            return self.invalid[slug]
        return self.verify(slug) if slug in self.entries else "no adapter in the bank"

    def verify(self, slug: str) -> str | None:
        """None if the adapter file exists, matches its checksum and holds only finite numbers, else the reason it
        is unavailable (an adapter of NaNs would draw black pictures with a 200)."""
        entry = self.entries[slug]
        if not entry.path.is_file():
            return f"file missing: {entry.path.name}"
        if sha256_file(entry.path) != entry.sha256:
            return "checksum mismatch"
        if entry.path.suffix == ".safetensors":  # anything else is refused by the loader, unread
            return nonfinite(entry.path)
        return None


def require_base(index: Path, base: str, *, profile: str) -> None:
    """A ConfigError naming both when the bank at `index` was trained on another base model than the profile's.

    A missing or unreadable index, or one without adapters, passes with a warning as the service does: it then
    draws with the base model alone."""
    try:
        bases = Bank(index).base_models()
    except ConfigError as exc:
        log.warning("%s; the base model alone is served", exc)
        return
    if bases - {base}:
        trained = ", ".join(sorted(repr(b) for b in bases))
        raise ConfigError(f"{index}: the bank's base model is {trained} but profile {profile!r} serves {base!r} "
                          "(models.base); rebuild the bank on that base model, or use the bank's profile")


def nonfinite(weights: Path) -> str | None:
    """The first tensor of a safetensors file holding a NaN or an infinity, as a reason; None if all are finite."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"non-finite values in {key}"
    except (SafetensorError, OSError, ValueError) as exc:
        return f"not a readable safetensors file ({exc})"
    return None


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["build", "show"])
    parser.add_argument("--loras", default=str(paths.LORAS), help=f"directory of trained adapters (default: {paths.LORAS})")
    parser.add_argument("--out", default=str(paths.BANK), help=f"bank index (default: {paths.BANK})")
    parser.add_argument("--allow-empty", action="store_true", help="build: replace an index that has adapters with "
                        "an empty one")


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    out = Path(args.out)
    if args.action == "build":
        bank = build_bank(Path(args.loras), out, keywords=params.keywords, registry=Registry.load(),
                          base_model=params.models.base, allow_empty=args.allow_empty)
        print(json.dumps({"bank": str(out), "adapters": len(bank["adapters"]), "missing": bank["missing"]}))
        return 0
    bank = Bank(out)
    for entry in bank:
        print(f"{entry.slug}\t{entry.keyword} {entry.class_token}\t{entry.ko}\t{bank.verify(entry.slug) or 'ok'}")
    for name, reason in bank.invalid.items():
        print(f"{name}\t-\t-\trefused: {reason}")
    return 0
