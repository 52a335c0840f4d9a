"""`tipsen curate`: a raw KS-KEIT export -> KS-KEIT-V1.2, the top N clean, relevant pairs per keyword.

Reads `items.jsonl`, checks and scores every image in a process pool (tipsen.imaging), scores CLIP relevance
in batches, drops exact and near duplicates across the whole export, keeps the top N per keyword, and
publishes `<out>/<slug>/{NNN.png, metadata.jsonl}` (Hugging Face imagefolder) and `<out>/report.json`.

Rejection reasons, in the order they are checked: bad_record, unknown_keyword, duplicate_id, bad_path,
missing_file, unreadable, file_too_large, not_an_image, decompression_bomb, extreme_aspect, too_small,
truncated, corrupt, blurry, irrelevant, exact_duplicate, near_duplicate, not_in_top_n.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import unicodedata
from contextlib import contextmanager
from functools import partial
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field

from tipsen import imaging, paths
from tipsen.config import CurateParams, Params, load_params
from tipsen.errors import ConfigError
from tipsen.io import publish_dir, sha256_file, sweep_stale, write_json_atomic, write_text_atomic
from tipsen.registry import Registry

log = logging.getLogger(__name__)
UNASSIGNED = "_unassigned"  # report group for items with no usable keyword


class Rejection(BaseModel):
    id: str
    reason: str
    detail: str = ""


class Group(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    in_: int = Field(0, alias="in")
    kept: int = 0
    train: int = 0
    heldout: int = 0
    rejected: int = 0
    short: bool = False  # kept fewer than per_keyword
    reasons: dict[str, int] = {}
    rejected_items: list[Rejection] = []


class CurateReport(BaseModel):
    per_keyword: int
    items_sha256: str
    totals: Group
    short_keywords: list[str]
    keywords: dict[str, Group]
    unassigned: Group

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def normalize_text(text: str, fallback: str) -> str:
    text = " ".join(unicodedata.normalize("NFC", text).split())  # NFC keeps Hangul composed
    return text or fallback


def _image_path(raw: Path, rel: object) -> Path:
    """An export-relative image path, confined to the export."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        raise imaging.Rejected("bad_path", f"image {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not (raw / pure).resolve().is_relative_to(raw.resolve()):
        raise imaging.Rejected("bad_path", f"image {rel!r} is outside the export")
    return raw / pure


def _record_problem(item: object) -> str:
    if not isinstance(item, dict):
        return "not a JSON object"
    for key in ("id", "keyword"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            return f"{key} must be a non-empty string"
    return "" if isinstance(item.get("text") or "", str) else "text must be a string"


def read_export(raw: Path, registry: Registry) -> tuple[list[dict], list[tuple[str, Rejection]]]:
    """Parsed items (with `slug` and `path`) and the (group, rejection) of every line that can't be used."""
    items_file = raw / "items.jsonl"
    try:
        if not raw.is_dir():
            raise ConfigError(f"--raw {raw}: not a directory")
        if not items_file.is_file():
            raise ConfigError(f"--raw {raw}: no items.jsonl; expected an export as written by `tipsen demo-data`")
        lines = items_file.read_bytes().splitlines()
    except PermissionError:
        raise ConfigError(f"--raw {raw}: permission denied reading {items_file}") from None
    items, rejected, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            problem = _record_problem(item)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            item, problem = None, f"not JSON: {exc}"
        if problem:
            rid = item["id"] if isinstance(item, dict) and isinstance(item.get("id"), str) else f"line {n}"
            rejected.append((UNASSIGNED, Rejection(id=rid or f"line {n}", reason="bad_record", detail=problem[:200])))
            continue
        kw = registry.resolve(item["keyword"])
        group = kw.slug if kw else UNASSIGNED
        try:
            if kw is None:
                raise imaging.Rejected("unknown_keyword", f"keyword {item['keyword']!r} is not in the registry")
            if item["id"] in seen:
                raise imaging.Rejected("duplicate_id", f"id repeated on line {n}")
            item.update(slug=kw.slug, path=_image_path(raw, item.get("image")), text=item.get("text") or "")
        except imaging.Rejected as r:
            rejected.append((group, Rejection(id=item["id"], reason=r.reason, detail=r.detail)))
            continue
        seen.add(item["id"])
        items.append(item)
    if not items and not rejected:
        raise ConfigError(f"--raw {raw}: items.jsonl has no items")
    return items, rejected


class Relevance:
    """Batched CLIP cosine between images and each keyword's template prompt."""

    def __init__(self, ref: str, device: str, prompts: dict[str, str]):
        import torch

        from tipsen.models import load_clip

        self.torch = torch
        self.model, self.preprocess, tokenizer = load_clip(ref, device=device)
        self.device = next(self.model.parameters()).device
        size = self.model.visual.image_size
        self.size = min(size) if isinstance(size, (tuple, list)) else int(size)
        with torch.inference_mode():
            text = self.model.encode_text(tokenizer(list(prompts.values())).to(self.device)).float()
        self.text = dict(zip(prompts, torch.nn.functional.normalize(text, dim=-1)))

    def __call__(self, thumbs: list, slugs: list[str]) -> list[float]:
        from PIL import Image

        torch = self.torch
        batch = torch.stack([self.preprocess(Image.fromarray(t)) for t in thumbs]).to(self.device)
        with torch.inference_mode():
            image = torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1)
        return (image * torch.stack([self.text[s] for s in slugs])).sum(-1).cpu().tolist()


@contextmanager
def _mapper(workers: int):
    """An ordered map over a process pool, or inline for one worker. Workers fork from a clean fork server
    that has imported only tipsen.imaging: quick to start, and never a fork of a process running torch."""
    if workers <= 1:
        yield map
        return
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["tipsen.imaging"])
    with ctx.Pool(workers) as pool:
        yield partial(pool.imap, chunksize=4)


def _progress(it, total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", disable=None if progress else True, mininterval=1.0)


def quality(sharp: float) -> float:
    return min(1.0, math.log10(1.0 + sharp) / 4.0)  # decades of Laplacian variance; 10^4 saturates


def heldout_ids(ids: list[str], fraction: float) -> set[str]:
    """A deterministic `fraction` of ids (at least one when there are two or more), chosen by their hash."""
    n = len(ids)
    k = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, int(n * fraction + 0.5)))
    return set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:k])


def curate(cfg: Params, raw: Path, out: Path, *, metrics: Path | None = None, progress: bool = True) -> CurateReport:
    """Curate the export at `raw` into `out` (replaced atomically); `metrics`: where to write the DVC metrics."""
    c, raw, out = cfg.curate, Path(raw), Path(out)
    if out.resolve().is_relative_to(raw.resolve()) or raw.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out}: must be outside --raw {raw} and not contain it (raw is never modified)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    sweep_stale(out)  # what a killed curation of this same output left; only its own
    registry = Registry.load()
    items, rejected = read_export(raw, registry)
    cfg.log()  # after the export checks, so that a user error prints only its one line
    log.info("curate: %d items in %s", len(items) + len(rejected), raw)
    present = {i["slug"] for i in items} | {g for g, _ in rejected}
    slugs = [k.slug for k in registry if k.slug in cfg.keywords or k.slug in present]
    checks = imaging.Checks(c.max_pixels, c.max_file_bytes, c.min_short_side, c.max_aspect)

    def reject(item: dict, reason: str, detail: str = "") -> None:
        rejected.append((item["slug"], Rejection(id=item["id"], reason=reason, detail=detail)))

    with _mapper(min(c.workers, max(1, len(items)))) as pmap:
        scorer = Relevance(cfg.models.clip, cfg.models.device, {s: registry[s].prompt for s in slugs}) \
            if c.relevance and items else None
        inspect = partial(imaging.inspect, checks=checks, work=2 * c.resolution, thumb=scorer.size if scorer else 0,
                          hash_size=c.phash_size)
        window = 16 * c.batch_size  # bounds the thumbnails waiting for CLIP when it is slower than decoding
        results = (r for w in range(0, len(items), window)
                   for r in pmap(inspect, [str(i["path"]) for i in items[w:w + window]]))
        found, pending = [], []
        for item, res in _progress(zip(items, results), len(items), "curate: check", progress):
            if res["reason"]:
                reject(item, res["reason"], res["detail"])
                continue
            found.append(item | res)
            if scorer:
                pending.append(found[-1])
                if len(pending) == c.batch_size:
                    _score(scorer, pending)
        if pending:
            _score(scorer, pending)
        ranked = _select(c, found, slugs, reject)
        with publish_dir(out) as tmp:
            jobs = []
            for slug, group in ranked.items():
                (tmp / slug).mkdir()
                for rank, item in enumerate(group):
                    item["file_name"] = f"{rank:03d}.png"
                    jobs.append((str(item["path"]), str(tmp / slug / item["file_name"]), item["sha256"], item["size"]))
            render = partial(imaging.render, checks=checks, size=c.resolution, crop=c.crop)
            kept = [i for g in ranked.values() for i in g]
            for item, top_left in zip(kept, _progress(pmap(render, jobs), len(jobs), "curate: write", progress)):
                item["crop_top_left"] = list(top_left)
            report = _report(c, slugs, ranked, rejected, sha256_file(raw / "items.jsonl"))
            for slug, group in ranked.items():
                held = heldout_ids([i["id"] for i in group], c.heldout_fraction)
                _write_metadata(tmp / slug / "metadata.jsonl", registry[slug], group, held)
                report.keywords[slug].train, report.keywords[slug].heldout = len(group) - len(held), len(held)
            report.totals.train = sum(g.train for g in report.keywords.values())
            report.totals.heldout = sum(g.heldout for g in report.keywords.values())
            write_json_atomic(tmp / "report.json", report.to_json())

    for slug in report.short_keywords:
        g = report.keywords[slug]
        log.warning("curate: SHORT KEYWORD %s: kept %d of per_keyword %d (%d in; rejected: %s)",
                    slug, g.kept, c.per_keyword, g.in_, g.reasons or "none")
    if metrics is not None:
        write_metrics(report, Path(metrics))
    log.info("curate: kept %d of %d items in %d keywords -> %s", report.totals.kept, report.totals.in_,
             len(report.keywords), out)
    return report


def _select(c: CurateParams, found: list[dict], slugs: list[str], reject) -> dict[str, list[dict]]:
    """Quality and relevance filters, then exact and near dedup across all keywords, then the top N per keyword."""
    candidates = []
    for item in found:
        rel = item.get("relevance")
        item["combined"] = c.relevance_weight * (rel or 0.0) + c.quality_weight * quality(item["sharpness"])
        if item["sharpness"] < c.min_sharpness:
            reject(item, "blurry", f"sharpness {item['sharpness']:.2f} < min_sharpness {c.min_sharpness}")
        elif rel is not None and rel < c.min_relevance:
            reject(item, "irrelevant", f"relevance {rel:.4f} < min_relevance {c.min_relevance}")
        else:
            candidates.append(item)
    # Best first, so that of each duplicate group the best-scoring copy survives, whichever keyword it is in.
    candidates.sort(key=lambda i: (-i["combined"], i["id"]))
    exact: dict[str, str] = {}
    near = imaging.HashIndex(c.phash_hamming, bits=c.phash_size ** 2)
    ranked: dict[str, list[dict]] = {s: [] for s in slugs}
    for item in candidates:
        if item["sha256"] in exact:
            reject(item, "exact_duplicate", f"same file as {exact[item['sha256']]}")
        elif hit := near.find(item["phash"]):
            reject(item, "near_duplicate", f"perceptual hash {hit[1]} bits from {hit[0]}")
        else:
            exact[item["sha256"]] = item["id"]
            near.add(item["phash"], item["id"])
            ranked[item["slug"]].append(item)
    for group in ranked.values():
        for rank, item in enumerate(group[c.per_keyword:], c.per_keyword + 1):
            reject(item, "not_in_top_n", f"rank {rank} > per_keyword {c.per_keyword}")
        del group[c.per_keyword:]
    return ranked


def _score(scorer: Relevance, batch: list[dict]) -> None:
    """Score a batch in place, dropping the thumbnails so memory stays bounded."""
    for item, score in zip(batch, scorer([i.pop("thumb") for i in batch], [i["slug"] for i in batch])):
        item["relevance"] = score
    batch.clear()


def _write_metadata(path: Path, kw, group: list[dict], heldout: set[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in group:
            split = "heldout" if item["id"] in heldout else "train"
            row = {"file_name": item["file_name"], "slug": kw.slug, "split": split,
                   "text": normalize_text(item["text"], kw.description), "original_text": item["text"],
                   "prompt": kw.prompt, "original_size": list(item["size"]), "crop_top_left": item["crop_top_left"],
                   "scores": {"sharpness": round(item["sharpness"], 4),
                              "relevance": None if item.get("relevance") is None else round(item["relevance"], 6),
                              "combined": round(item["combined"], 6)},
                   "source_id": item["id"], "source": item.get("source")}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _report(c: CurateParams, slugs: list[str], ranked: dict, rejected: list, items_sha: str) -> CurateReport:
    groups = {s: Group() for s in [*slugs, UNASSIGNED]}
    for slug, r in sorted(rejected, key=lambda sr: sr[1].id):
        g = groups.setdefault(slug, Group())
        g.rejected_items.append(r)
        g.reasons[r.reason] = g.reasons.get(r.reason, 0) + 1
    for slug, g in groups.items():
        g.kept = len(ranked.get(slug, []))
        g.rejected = len(g.rejected_items)
        g.in_ = g.kept + g.rejected
        g.reasons = dict(sorted(g.reasons.items()))
        g.short = slug != UNASSIGNED and g.kept < c.per_keyword
    unassigned = groups.pop(UNASSIGNED)
    totals = Group(kept=sum(g.kept for g in groups.values()), rejected=sum(g.rejected for g in groups.values()))
    totals.rejected += unassigned.rejected
    totals.in_ = totals.kept + totals.rejected
    for g in [*groups.values(), unassigned]:
        for reason, n in g.reasons.items():
            totals.reasons[reason] = totals.reasons.get(reason, 0) + n
    totals.reasons = dict(sorted(totals.reasons.items()))
    return CurateReport(per_keyword=c.per_keyword, items_sha256=items_sha, totals=totals, keywords=groups,
                        unassigned=unassigned, short_keywords=[s for s, g in groups.items() if g.short])


def write_metrics(report: CurateReport, metrics: Path) -> None:
    """`metrics/curate.json`, the totals that `dvc metrics show` lists (one short column each), and
    `metrics/curate_kept.csv`, every keyword's count (the dvc plots bar chart). The reasons and each keyword's
    detail are in the dataset's report.json."""
    t = report.totals
    write_json_atomic(metrics / "curate.json", {
        "in": t.in_, "kept": t.kept, "rejected": t.rejected, "train": t.train, "heldout": t.heldout,
        "keywords": len(report.keywords), "short_keywords": len(report.short_keywords)})
    write_text_atomic(metrics / "curate_kept.csv", "slug,kept\n" + "".join(f"{s},{g.kept}\n"
                                                                         for s, g in report.keywords.items()))


def add_arguments(parser) -> None:
    parser.add_argument("--raw", type=Path, default=paths.RAW, help=f"the raw export (default: {paths.RAW})")
    parser.add_argument("--out", type=Path, default=paths.CURATED,
                        help=f"output directory, replaced atomically (default: {paths.CURATED})")
    parser.add_argument("--metrics", type=Path, default=None,
                        help="write curate.json and curate_kept.csv (DVC metrics and plots) into this folder")
    parser.add_argument("--per-keyword", type=int, help="override curate.per_keyword")
    parser.add_argument("--workers", type=int, help="override curate.workers")
    parser.add_argument("--no-relevance", action="store_true", help="skip CLIP relevance (curate.relevance: false)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    flags = {"per_keyword": args.per_keyword, "workers": args.workers,
             "relevance": False if args.no_relevance else None}
    params = params.override("curate", {k: v for k, v in flags.items() if v is not None}, flags=True)
    report = curate(params, args.raw, args.out, metrics=args.metrics, progress=not args.no_progress)
    t = report.totals
    print(f"curated {t.kept} of {t.in_} items ({t.train} train, {t.heldout} heldout) into {args.out}; "
          f"rejected: {json.dumps(t.reasons)}"
          + (f"; SHORT: {', '.join(report.short_keywords)}" if report.short_keywords else ""))
    return 0
