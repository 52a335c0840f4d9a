"""The LoRA bank: `models/bank.json` indexes the trained adapters, addressed by slug only.

Layout: each adapter lives at `<bank dir>/loras/<slug>/pytorch_lora_weights.safetensors` with a
`train_summary.json` beside it. The index records each file's sha256; readers verify it before loading.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tipsen import paths
from tipsen.config import load_params
from tipsen.errors import ConfigError
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


def build_bank(loras: Path, out: Path, *, keywords: list[str], registry: Registry, base_model: str) -> dict:
    """Index every trained adapter of `keywords` under `loras/` into `out`, atomically."""
    loras, out = Path(loras), Path(out)
    entries, missing = [], []
    for slug in keywords:
        kw = registry[slug]
        weights = loras / slug / WEIGHTS_NAME
        if not weights.is_file():
            missing.append(slug)
            continue
        meta = adapter_metadata(weights)
        summary_file = loras / slug / SUMMARY_NAME
        summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
        entries.append({
            "slug": slug, "keyword": kw.keyword, "class_token": kw.class_token, "ko": kw.ko,
            "aliases": list(kw.aliases), "category": kw.category,
            "path": weights.resolve().relative_to(out.parent.resolve()).as_posix(),
            "sha256": sha256_file(weights), "rank": int(meta.get("rank", 0)) or None,
            "alpha": float(meta["alpha"]) if "alpha" in meta else None,
            "base_model": meta.get("base_model", base_model), "summary": summary,
        })
    if missing:
        log.warning("no trained adapter for: %s", ", ".join(missing))
    bank = {"format": BANK_FORMAT, "base_model": base_model, "adapters": entries, "missing": missing}
    write_json_atomic(out, bank)
    return bank


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


class Bank:
    """A read-only view of bank.json. Paths come from the index, never from a user string."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"bank: {self.path} not found; run 'tipsen bank build' (or 'dvc repro')") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"bank: {self.path} is not valid JSON ({exc.msg})") from None
        if raw.get("format") != BANK_FORMAT:
            raise ConfigError(f"bank: {self.path}: format {raw.get('format')!r} is not supported; expected {BANK_FORMAT}")
        self.base_model = raw.get("base_model")
        root = self.path.parent.resolve()
        self.entries: dict[str, BankEntry] = {}
        for e in raw.get("adapters", []):
            file = (root / e["path"]).resolve()
            if root not in file.parents:  # an index may not point outside its own directory
                raise ConfigError(f"bank: adapter {e.get('slug')!r} points outside {root}")
            self.entries[e["slug"]] = BankEntry(
                slug=e["slug"], keyword=e["keyword"], class_token=e["class_token"], ko=e["ko"], path=file,
                sha256=e["sha256"], rank=e.get("rank"), aliases=e.get("aliases", []), info=e)

    def __iter__(self):
        return iter(self.entries.values())

    def __contains__(self, slug: str) -> bool:
        return slug in self.entries

    def verify(self, slug: str) -> str | None:
        """None if the adapter file exists and matches its checksum, else the reason it is unavailable."""
        entry = self.entries[slug]
        if not entry.path.is_file():
            return f"file missing: {entry.path.name}"
        if sha256_file(entry.path) != entry.sha256:
            return "checksum mismatch"
        return None


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["build", "show"])
    parser.add_argument("--loras", default=str(paths.LORAS), help=f"directory of trained adapters (default: {paths.LORAS})")
    parser.add_argument("--out", default=str(paths.BANK), help=f"bank index (default: {paths.BANK})")


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    out = Path(args.out)
    if args.action == "build":
        bank = build_bank(Path(args.loras), out, keywords=params.keywords, registry=Registry.load(),
                          base_model=params.models.base)
        print(json.dumps({"bank": str(out), "adapters": len(bank["adapters"]), "missing": bank["missing"]}))
        return 0
    bank = Bank(out)
    for entry in bank:
        print(f"{entry.slug}\t{entry.keyword} {entry.class_token}\t{entry.ko}\t{bank.verify(entry.slug) or 'ok'}")
    return 0
