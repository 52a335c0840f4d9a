"""The paper's Table II evaluation, plus diversity, DINO, CLIP-T, bootstrap CIs and paired comparisons.

Per keyword and method: generate `images_per_keyword` images from the template prompt with seeds shared by
every method, embed them once with CLIP, and score them against the keyword's held-out real images with one
matrix product. Generated images and embeddings are cached on disk, so a rerun or a new method costs only
what is new. The math is in tipsen.metrics.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from tipsen import metrics, paths
from tipsen.config import SEED_MAX, EvalMethod, Params, load_params
from tipsen.errors import ConfigError
from tipsen.io import publish_dir, sha256_file, sha256_json, write_bytes_atomic, write_json_atomic
from tipsen.live import open_live
from tipsen.registry import Registry

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the generation or embedding recipe changes (2: no safety checker), so caches are not reused
# A safety checker (SD 1.x) turns a flagged picture black, and a black picture would still count in CLIP-I:
# the evaluation draws without it, and says so in its results.
SAFETY_CHECKER = "off: a flagged picture would be black and still count in CLIP-I"
SCORES = ("clip_align", "dino_align", "clip_t", "diversity")  # a per-keyword row's numbers
GRID_CELL = 128  # px per grid cell: readable labels even for 64 px demo images
TINY_NOTE = ("DEMO NUMBERS: produced by random tiny models ({refs}); they say nothing about image quality. "
             "Only a run on real model references reproduces the paper's table.")


def derive_seed(seed: int, slug: str, index: int) -> int:
    """The seed of a keyword's index-th image: the same for every method, independent of batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{slug}/{index}".encode()).digest()[:8], "big") % (SEED_MAX + 1)


def method_id(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "method"


# ---------------------------------------------------------------- inputs


def real_images(curated: Path, slug: str, count: int) -> tuple[list[Path], str]:
    """Up to `count` real images of a keyword: the held-out split, or every kept image if that is short."""
    meta = curated / slug / "metadata.jsonl"
    if not meta.is_file():
        return [], "missing"
    rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: r["file_name"])
    heldout = [r for r in rows if r.get("split") == "heldout"]
    source = "heldout"
    if len(heldout) < count:
        log.info("%s: %d held-out images < eval.real_images %d; using all %d kept images (training saw some)",
                 slug, len(heldout), count, len(rows))
        heldout, source = rows, "all"
    paths = [curated / slug / Path(r["file_name"]).name for r in heldout[:count]]  # a name, never a path
    return [p for p in paths if p.is_file()], source


def _curated_digest(curated: Path) -> str:
    """Changes whenever any keyword's curated texts change (the assistant's template details come from them)."""
    return sha256_json(sorted((p.parent.name, sha256_file(p)) for p in curated.glob("*/metadata.jsonl")))


# ---------------------------------------------------------------- embeddings


class Encoder:
    """CLIP or DINO image embeddings (and CLIP text embeddings), cached on disk per image file and per text.

    The model is loaded only on a cache miss, so a fully cached rerun loads nothing.
    """

    def __init__(self, kind: str, ref: str, *, device: str, cache: Path, batch_size: int):
        from tipsen.models import resolve_ref

        self.kind, self.ref, self.device, self.batch_size, self.model = kind, ref, device, batch_size, None
        self.cache = cache / f"{kind}-{sha256_json([CACHE_VERSION, resolve_ref(ref)])[:16]}"

    def _load(self):
        from tipsen import models

        if self.model is None:
            if self.kind == "clip":
                self.model, self.preprocess, self.tokenizer = models.load_clip(self.ref, device=self.device)
            else:
                self.model, self.processor = models.load_vision(self.ref, device=self.device)
        return next(self.model.parameters()).device

    def _forward(self, items: list) -> np.ndarray:
        import torch

        device = self._load()
        with torch.inference_mode():
            if self.kind == "clip" and isinstance(items[0], str):
                out = self.model.encode_text(self.tokenizer(items).to(device))
            elif self.kind == "clip":
                out = self.model.encode_image(torch.stack([self.preprocess(im) for im in items]).to(device))
            else:  # the CLS token, as the DreamBooth paper's DINO metric uses
                out = self.model(**self.processor(images=items, return_tensors="pt").to(device)).last_hidden_state[:, 0]
        return out.float().cpu().numpy()

    def _cached(self, keys: list[str], load) -> np.ndarray:
        files = [self.cache / k[:2] / f"{k}.npy" for k in keys]
        todo = [i for i, f in enumerate(files) if not f.is_file()]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            for i, emb in zip(chunk, self._forward([load(i) for i in chunk])):
                buf = io.BytesIO()
                np.save(buf, emb.astype(np.float32), allow_pickle=False)
                write_bytes_atomic(files[i], buf.getvalue())
        return np.stack([np.load(f, allow_pickle=False) for f in files])

    def images(self, paths: list[Path]) -> np.ndarray:
        return self._cached([sha256_file(p) for p in paths], lambda i: Image.open(paths[i]).convert("RGB"))

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._cached([sha256_json(["text", t]) for t in texts], lambda i: texts[i])


# ---------------------------------------------------------------- generation


@dataclass
class Run:
    """One method's state: its generated image files per keyword, or why it failed."""

    spec: EvalMethod
    images: dict[str, list[Path]] = field(default_factory=dict)
    generated: int = 0
    error: str | None = None


def image_spec(params: Params, m: EvalMethod, slug: str, seed: int, adapter: str | None, extra: dict) -> dict:
    """Everything an image depends on; its hash names the cache file, so a changed setting never hits."""
    from tipsen.models import resolve_device

    s = m.sampling(params.generate)
    return {
        "v": CACHE_VERSION, "base": m.base, "pipeline_class": params.models.pipeline_class,
        "device": resolve_device(params.models.device), "dtype": params.models.dtype,
        "lora": m.lora, "adapter": adapter, "lora_scale": s["lora_scale"] if m.lora else None,
        "assist": extra.get("assist") if m.assist else None, "steps": s["steps"], "guidance": s["guidance"],
        "width": s["width"], "height": s["height"], "negative": params.generate.negative_prompt,
        "keyword": slug, "seed": seed, "vae": params.models.vae if m.base == params.models.base else None,
    }


def plan(run: Run, *, params: Params, slugs: list[str], cache: Path, adapters: dict[str, str],
         extra: dict) -> list[tuple[str, int, Path, dict]]:
    """Fill `run.images` with the cache files of every image; return (slug, seed, file, spec) of those missing."""
    m, ev, todo = run.spec, params.eval, []
    for slug in slugs:
        seeds = [derive_seed(ev.seed, slug, i) for i in range(ev.images_per_keyword)]
        specs = [image_spec(params, m, slug, s, adapters.get(slug) if m.lora else None, extra) for s in seeds]
        run.images[slug] = [cache / "images" / k[:2] / f"{k}.png" for k in map(sha256_json, specs)]
        todo += [(slug, s, f, spec) for s, f, spec in zip(seeds, run.images[slug], specs) if not f.is_file()]
    return todo


def protocol_plans(run: Run, todo: list[tuple[str, int, Path, dict]], generator, *, params: Params,
                   registry: Registry, assistant=None) -> list:
    """The protocol's exact plans: the paper's template prompt (or its refinement, made in one batched call with
    the image's own seed, as the service would), the keyword's adapter or none, and the derived seed."""
    from tipsen.generate import Plan
    from tipsen.registry import Route

    m = run.spec
    s = m.sampling(params.generate)
    width, height = generator.size(s["width"], s["height"])
    template = [registry[slug].prompt for slug, *_ in todo]
    refined = assistant.refine_batch(template, keywords=[t[0] for t in todo], seeds=[t[1] for t in todo]) \
        if m.assist else [None] * len(todo)
    return [Plan(prompt=r.prompt if r else words, seed=seed, steps=s["steps"], guidance=s["guidance"], width=width,
                 height=height, adapters=(generator.adapter_for(slug, field=f"{m.name}: LoRA"),) if m.lora else (),
                 lora_scale=s["lora_scale"] if m.lora else 0.0, negative_prompt=params.generate.negative_prompt,
                 input=words, route=Route(slug, slug, "explicit"), assist=m.assist,
                 refined=r.model_dump() if r else None)
            for (slug, seed, _, _), words, r in zip(todo, template, refined)]


def generate_missing(run: Run, todo: list[tuple[str, int, Path, dict]], generator, *, params: Params,
                     registry: Registry, assistant=None) -> None:
    """Generate the missing images through the batched runtime (mixed-keyword batches) and cache them."""
    plans, size = protocol_plans(run, todo, generator, params=params, registry=registry, assistant=assistant), \
        params.eval.batch_size
    for start in range(0, len(plans), size):
        chunk = range(start, min(start + size, len(plans)))
        for i, result in zip(chunk, generator.render([plans[i] for i in chunk])):
            info = PngInfo()
            info.add_text("tipsen", json.dumps({**todo[i][3], "prompt": plans[i].prompt}))  # provenance
            buf = io.BytesIO()
            result.images[0].convert("RGB").save(buf, "PNG", pnginfo=info)
            write_bytes_atomic(todo[i][2], buf.getvalue())
            run.generated += 1
    log.info("%s: generated %d images", run.spec.name, len(todo))


def unfiltered(pipe) -> None:
    """The pipeline without its safety checker, if it has one (SAFETY_CHECKER)."""
    if getattr(pipe, "safety_checker", None) is not None:
        log.info("%s: safety checker off for the evaluation", type(pipe).__name__)
        pipe.safety_checker = None


def produce(runs: list[Run], *, params: Params, slugs: list[str], registry: Registry, curated: Path, cache: Path,
            bank: Path, adapters: dict[str, str]) -> None:
    """Plan every method against the cache, then load each base model that has work once, and generate."""
    from diffusers.training_utils import free_memory

    from tipsen.generate import Generator

    assist_cfg = {"assistant": params.assistant.model_dump(mode="json"), "llm": params.models.llm,
                  "curated": _curated_digest(curated)} if any(r.spec.assist for r in runs) else {}
    todos = {id(r): plan(r, params=params, slugs=slugs, cache=cache, adapters=adapters, extra={"assist": assist_cfg})
             for r in runs if r.error is None}
    pending = [r for r in runs if r.error is None and todos[id(r)]]
    assistant = None
    if any(r.spec.assist for r in pending):
        from tipsen.assistant import Assistant

        try:
            assistant = Assistant.from_params(params, registry=registry, curated=curated)
        except Exception as exc:  # noqa: BLE001 -- recorded per method; the others still run
            log.exception("assistant failed to load")
            for r in (r for r in pending if r.spec.assist):
                r.error = f"assistant: {type(exc).__name__}: {exc}"
    for base in dict.fromkeys(r.spec.base for r in pending if r.error is None):
        group = [r for r in pending if r.spec.base == base and r.error is None]
        try:  # base-only methods load no adapter at all
            generator = Generator(params, base=base, bank=bank if any(r.spec.lora for r in group) else None,
                                  registry=registry)
        except Exception as exc:  # noqa: BLE001
            log.exception("base model %s failed to load", base)
            for r in group:
                r.error = f"load {base}: {type(exc).__name__}: {exc}"
            continue
        unfiltered(generator.pipe)
        for r in group:
            try:
                generate_missing(r, todos[id(r)], generator, params=params, registry=registry, assistant=assistant)
            except Exception as exc:  # noqa: BLE001
                log.exception("method %s failed", r.spec.name)
                r.error = f"{type(exc).__name__}: {exc}"
        del generator
        free_memory()  # before the next base model is loaded
    if assistant is not None:
        assistant.close()


# ---------------------------------------------------------------- scoring


def _r(x) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def score(runs: list[Run], *, params: Params, slugs: list[str], registry: Registry,
          real: dict[str, list[Path]], cache: Path) -> tuple[list[dict], dict]:
    """Per-keyword rows for every method that produced images, and the DINO status."""
    m, ev = params.models, params.eval
    ok = [r for r in runs if r.error is None]
    clip = Encoder("clip", m.clip, device=m.device, cache=cache / "embeddings", batch_size=ev.batch_size)
    real_clip = {s: clip.images(real[s]) for s in slugs}
    text = dict(zip(slugs, clip.texts([registry[s].prompt for s in slugs])))
    rows = []
    for run in ok:
        for s in slugs:
            gen = clip.images(run.images[s])  # embedded once, used by all three CLIP metrics
            rows.append({"keyword": s, "method": run.spec.name, "label": f"{s} | {run.spec.name}",
                         "clip_align": metrics.alignment(gen, real_clip[s]), "dino_align": None,
                         "clip_t": float(metrics.cosine_matrix(gen, text[s][None]).mean()),
                         "diversity": metrics.diversity(gen)})
    if not m.dino:
        log.info("DINO alignment skipped: models.dino is null")
        return rows, {"status": "skipped", "reason": "models.dino is null"}
    try:
        dino = Encoder("dino", m.dino, device=m.device, cache=cache / "embeddings", batch_size=ev.batch_size)
        real_dino = {s: dino.images(real[s]) for s in slugs}
        gen_dino = [dino.images(run.images[s]) for run in ok for s in slugs]  # same order as rows
    except Exception as exc:  # noqa: BLE001 -- DINO is optional: skipped with the reason, never fatal
        log.warning("DINO alignment skipped: %s: %s", type(exc).__name__, exc)
        return rows, {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    for row, gen in zip(rows, gen_dino):
        row["dino_align"] = metrics.alignment(gen, real_dino[row["keyword"]])
    return rows, {"status": "ok", "model": m.dino}


def comparison_pairs(specs: list[EvalMethod]) -> list[tuple[int, int]]:
    """(a, b) index pairs: every method vs the first; +LoRA vs its base; +assistant vs +LoRA."""
    pairs = [(i, 0) for i in range(1, len(specs))]
    for i, a in enumerate(specs):
        for j, b in enumerate(specs):
            same = a.base == b.base and i != j
            if same and a.lora and not a.assist and not b.lora and not b.assist:
                pairs.append((i, j))
            if same and a.lora and a.assist and b.lora and not b.assist:
                pairs.append((i, j))
    return list(dict.fromkeys(pairs))


def summarize(runs: list[Run], rows: list[dict], *, params: Params, slugs: list[str]) -> tuple[dict, dict]:
    """Per-method summaries and paired comparisons, over keywords."""
    ev = params.eval
    boot = dict(samples=ev.bootstrap, seed=ev.seed)
    per = {r.spec.name: {k: np.array([x[k] for x in rows if x["method"] == r.spec.name], dtype=float)
                         for k in ("clip_align", "dino_align", "clip_t", "diversity")} for r in runs}
    ids: dict[str, str] = {}
    for r in runs:  # JSON keys for dvc; distinct even where two names slugify alike
        key = method_id(r.spec.name)
        ids[r.spec.name] = key if key not in ids.values() else f"{key}_{len(ids) + 1}"
    methods = {}
    for r in runs:
        entry = {"name": r.spec.name, **r.spec.model_dump(exclude={"name"})}
        if r.error is not None:
            # "reason", not "error": dvc metrics show takes an "error" key for a file it failed to read
            methods[ids[r.spec.name]] = {**entry, "status": "failed", "reason": r.error}
            continue
        v = per[r.spec.name]
        mean, std = metrics.mean_std(v["clip_align"])
        ci = metrics.bootstrap_ci(v["clip_align"], **boot)
        methods[ids[r.spec.name]] = {
            **entry, "status": "ok", "clip_align_mean": _r(mean), "clip_align_std": _r(std),
            "ci95": [_r(c) for c in ci] if ci else None, "diversity_mean": _r(v["diversity"].mean()),
            "dino_align_mean": _r(v["dino_align"].mean()), "clip_t_mean": _r(v["clip_t"].mean()),
            "keywords": len(slugs)}
    comparisons = {}
    specs = [r.spec for r in runs]
    for i, j in comparison_pairs(specs):
        if runs[i].error is None and runs[j].error is None:
            a, b = specs[i].name, specs[j].name
            cmp = metrics.paired(per[a]["clip_align"], per[b]["clip_align"], **boot)
            comparisons[f"{ids[a]}_vs_{ids[b]}"] = {
                "a": a, "b": b, "metric": "clip_align", **cmp,
                "mean_diff": _r(cmp["mean_diff"]), "ci95": [_r(c) for c in cmp["ci95"]] if cmp["ci95"] else None}
    return methods, comparisons


# ---------------------------------------------------------------- reports


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_table(result: dict, path: Path) -> None:
    """The Markdown table, laid out like the paper's Table II, with what produced it."""
    mdl, img, boot = result["models"], result["images"], result["bootstrap"]
    real = img["real_per_keyword"].values()
    lines = ["# Image alignment (layout of the paper's Table II)", ""]
    if result["note"]:
        lines += [f"> **{result['note']}**", ""]
    lines += [f"- profile: `{result['profile']}`; CLIP: `{mdl['clip']}`; DINO: `{mdl['dino']}`; "
              f"bases: {', '.join(f'`{b}`' for b in mdl['bases'])}",
              f"- {len(result['keywords'])} keywords; {img['generated_per_keyword']} generated images per keyword "
              f"and method; {min(real, default=0)}-{max(real, default=0)} real images per keyword "
              f"({', '.join(sorted(set(img['real_source'].values())))} split)", "",
              "| Method | Image-align (mean ± std) | 95% CI of mean | Diversity | DINO-align | CLIP-T |",
              "|---|---|---|---|---|---|"]
    for m in result["methods"].values():
        if m["status"] != "ok":
            lines.append(f"| {m['name']} | failed: {m['reason'].splitlines()[0][:120]} | | | | |")
            continue
        ci = f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]" if m["ci95"] else "n/a"
        lines.append(f"| {m['name']} | {m['clip_align_mean']:.4f} ± {m['clip_align_std']:.4f} | {ci} | "
                     f"{_fmt(m['diversity_mean'])} | {_fmt(m['dino_align_mean'])} | {_fmt(m['clip_t_mean'])} |")
    lines += ["", f"std: population std over keywords (numpy ddof=0). CI: percentile bootstrap of the mean over "
              f"keywords ({boot['samples']} resamples, seed {boot['seed']}). Diversity: mean pairwise cosine "
              "distance among a method's images of one keyword. CLIP-T: image vs the keyword's prompt.", ""]
    if result["comparisons"]:
        lines += ["## Paired comparisons (per-keyword difference in image alignment)", "",
                  "| A vs B | mean A - B | 95% CI | A better on | CI excludes 0 |", "|---|---|---|---|---|"]
        for c in result["comparisons"].values():
            ci = f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c["ci95"] else "n/a"
            lines.append(f"| {c['a']} vs {c['b']} | {c['mean_diff']:+.4f} | {ci} | {c['wins']}/{c['n']} | "
                         f"{'yes' if c['significant'] else 'no'} |")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    keys = ["keyword", "method", "label", *SCORES]
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if _r(row[k]) is None else _r(row[k])) if k in SCORES else row[k] for k in keys})
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()


def write_grid(runs: list[Run], *, slugs: list[str], real: dict[str, list[Path]], source: dict[str, str],
               registry: Registry, path: Path) -> None:
    """Fig. 4's layout: rows are keywords, columns are a real image and then each method's first image."""
    font = ImageFont.load_default(size=12)
    real_name = "Real (held-out)" if set(source.values()) == {"heldout"} else "Real (curated)"
    cols = [(real_name, real, None)] + [(r.spec.name, r.images, r.error) for r in runs]
    c = GRID_CELL
    grid = Image.new("RGB", (c * (len(cols) + 1), c // 2 + c * len(slugs)), "white")
    draw = ImageDraw.Draw(grid)

    def label(x: int, y: int, text: str, height: int) -> None:
        lines = [""]
        for token in re.split(r"(?<=[ +_])", _ascii(text)):  # greedy wrap at spaces and '+', by pixel width
            if lines[-1] and font.getlength(lines[-1] + token) > c - 8:
                lines.append("")
            lines[-1] += token
        for k, line in enumerate(lines[: height // 15]):
            draw.text((x + 4, y + 4 + 15 * k), line.strip(), fill="black", font=font)

    for j, (name, _, _) in enumerate(cols):
        label(c * (j + 1), 0, name, c // 2)
    for i, slug in enumerate(slugs):
        y = c // 2 + c * i
        kw = registry[slug]
        label(0, y, f"{kw.keyword} {kw.class_token}", c)
        for j, (_, images, error) in enumerate(cols):
            x = c * (j + 1)
            if error is None and images.get(slug):
                grid.paste(Image.open(images[slug][0]).convert("RGB").resize((c - 4, c - 4)), (x + 2, y + 2))
            else:
                draw.rectangle((x + 2, y + 2, x + c - 3, y + c - 3), fill="#dddddd")
                label(x, y + c // 3, "failed" if error else "no image", c)
    buf = io.BytesIO()
    grid.save(buf, "PNG")
    write_bytes_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- the stage


def default_cache() -> Path:
    from tipsen.models import cache_dir

    return cache_dir() / "cache" / "eval"


def select_keywords(params: Params, keywords: list[str] | None, *, curated: Path, registry: Registry
                    ) -> tuple[list[str], dict[str, list[Path]], dict[str, str], dict[str, str]]:
    """The keywords with real images, their image files, their split source, and why others were skipped."""
    slugs = keywords or params.eval.keywords or params.keywords
    for slug in slugs:
        registry.get(slug, field="keywords")
    if not curated.is_dir():
        raise ConfigError(f"--curated {curated}: not found; run 'tipsen curate' (or 'dvc repro curate') first")
    real, source, skipped = {}, {}, {}
    for slug in dict.fromkeys(slugs):
        files, src = real_images(curated, slug, params.eval.real_images)
        if files:
            real[slug], source[slug] = files, src
        else:
            skipped[slug] = f"no curated images under {curated / slug}"
            log.warning("%s: skipped: %s", slug, skipped[slug])
    if not real:
        raise ConfigError(f"--curated {curated}: no images for any of the {len(slugs)} keywords; run 'tipsen curate'")
    return list(real), real, source, skipped


def _adapters(runs: list[Run], bank: Path, slugs: list[str], skipped: dict[str, str]) -> dict[str, str]:
    """The adapter sha256 per keyword; keywords without a valid adapter are dropped for every method."""
    from tipsen.bank import Bank

    if not any(r.spec.lora for r in runs):
        return {}
    try:
        index = Bank(bank)
    except ConfigError as exc:
        for r in runs:
            r.error = str(exc) if r.spec.lora else r.error
        return {}
    out = {}
    for slug in list(slugs):
        reason = index.reason(slug)
        if reason:
            skipped[slug] = f"LoRA: {reason}"  # dropped everywhere, so paired comparisons share keywords
            log.warning("%s: skipped: %s", slug, skipped[slug])
            slugs.remove(slug)
        else:
            out[slug] = index.entries[slug].sha256
    return out


def evaluate(params: Params, *, curated: Path = Path("data/curated"), bank: Path | None = None,
             metrics_dir: Path = Path("metrics"), reports_dir: Path = Path("reports"), cache_dir: Path | None = None,
             keywords: list[str] | None = None) -> dict:
    """Run the evaluation and write its dvclive log metrics/eval/ (`write_live`: the headline and the per-keyword
    plot), and in `reports_dir` eval.json (everything), per_keyword.csv, eval_table.md and eval_grid.png; return the
    full result."""
    ev, registry = params.eval, Registry.load()
    if not ev.methods:
        raise ConfigError("eval.methods: empty; declare at least one method (name, base, lora, assist, ...)")
    curated, cache = Path(curated), Path(cache_dir) if cache_dir else default_cache()
    bank = Path(bank or paths.BANK)
    slugs, real, source, skipped = select_keywords(params, keywords, curated=curated, registry=registry)
    runs = [Run(m) for m in ev.methods]
    adapters = _adapters(runs, bank, slugs, skipped)
    if not slugs:
        raise ConfigError(f"keywords: none has both curated images and a LoRA adapter in {bank}")
    produce(runs, params=params, slugs=slugs, registry=registry, curated=curated, cache=cache, bank=bank,
            adapters=adapters)
    rows, dino = score(runs, params=params, slugs=slugs, registry=registry, real=real, cache=cache)
    methods, comparisons = summarize(runs, rows, params=params, slugs=slugs)
    bases = list(dict.fromkeys(m.base for m in ev.methods))
    refs = [params.models.clip, params.models.dino or "", *bases]
    if any(m.assist for m in ev.methods) and params.assistant.backend == "transformers":
        refs.append(params.models.llm)
    tiny = sorted({r for r in refs if r.startswith("tiny:")})
    result = {
        "profile": params.profile,
        "note": TINY_NOTE.format(refs=", ".join(tiny)) if tiny else "",
        "models": {"clip": params.models.clip, "dino": params.models.dino, "bases": bases,
                   "llm": params.models.llm, "assistant_backend": params.assistant.backend,
                   "vae": params.models.vae, "safety_checker": SAFETY_CHECKER},
        "keywords": slugs, "skipped_keywords": skipped,
        "images": {"generated_per_keyword": ev.images_per_keyword,
                   "real_per_keyword": {s: len(real[s]) for s in slugs}, "real_source": {s: source[s] for s in slugs}},
        "std": "population std over keywords (numpy ddof=0)",
        "bootstrap": {"samples": ev.bootstrap, "seed": ev.seed, "level": 0.95},
        "dino": dino, "methods": methods, "comparisons": comparisons,
    }
    write_json_atomic(Path(reports_dir) / "eval.json", result)
    write_csv(rows, Path(reports_dir) / "per_keyword.csv")
    write_live(result, rows, Path(metrics_dir) / "eval")
    write_table(result, Path(reports_dir) / "eval_table.md")
    write_grid(runs, slugs=slugs[: ev.grid_keywords], real=real, source=source, registry=registry,
               path=Path(reports_dir) / "eval_grid.png")
    failed = [m["name"] for m in methods.values() if m["status"] != "ok"]
    log.info("evaluated %d methods on %d keywords (%d generated, %d failed: %s)", len(runs), len(slugs),
             sum(r.generated for r in runs), len(failed), ", ".join(failed) or "none")
    return result


def headline(result: dict) -> dict:
    """metrics/eval/metrics.json: what `dvc metrics show` and `dvc exp show` put in columns, one short column per
    number: each method's CLIP image alignment over keywords (`<method>.mean`, `<method>.std`), or its failed status.
    The rest (models, images, CIs, DINO, CLIP-T, diversity, comparisons) is in reports/eval.json and the CSV."""
    return {key: ({"mean": m["clip_align_mean"], "std": m["clip_align_std"]} if m["status"] == "ok"
                  else {"status": m["status"]}) for key, m in result["methods"].items()}


def write_live(result: dict, rows: list[dict], folder: Path) -> None:
    """The evaluation's dvclive log, published whole: the headline as its summary and every keyword's scores as
    the custom plot `per_keyword` (a horizontal bar per keyword and method, `dvc plots show`)."""
    with publish_dir(folder) as tmp:
        live = open_live(tmp, what="the evaluation log (--metrics)")
        for key, values in headline(result).items():
            for name, value in values.items():
                live.log_metric(f"{key}/{name}", value, plot=False)
        live.log_plot("per_keyword", [{k: _r(v) if k in SCORES else v for k, v in row.items()} for row in rows],
                      x="clip_align", y="label", template="bar_horizontal", title="CLIP image alignment per keyword")
        live.end()


def keyword_alignment(params: Params, slug: str, *, bank: Path, curated: Path, images: int | None = None,
                      seed: int | None = None, cache_dir: Path | None = None) -> float:
    """CLIP image alignment of one keyword's adapter (SDXL+LoRA at the generate settings) on its held-out images.

    The retraining gate calls this for a candidate bank and the current bank: same seeds, same real images.
    """
    registry = Registry.load()
    registry.get(slug, field="keyword")
    params = params.override("eval", {"images_per_keyword": images or params.eval.images_per_keyword,
                                      "seed": params.eval.seed if seed is None else seed})
    ev = params.eval
    run = Run(EvalMethod(name="SDXL+LoRA", base=params.models.base, lora=True))  # at the generate settings
    files, _ = real_images(Path(curated), slug, ev.real_images)
    if not files:
        raise ConfigError(f"curated: no curated images for {slug!r} under {curated}")
    slugs, skipped, cache = [slug], {}, Path(cache_dir) if cache_dir else default_cache()
    adapters = _adapters([run], Path(bank), slugs, skipped)
    if run.error or not slugs:
        raise ConfigError(f"bank: {run.error or skipped[slug]}")
    produce([run], params=params, slugs=slugs, registry=registry, curated=Path(curated), cache=cache,
            bank=Path(bank), adapters=adapters)
    if run.error:
        raise RuntimeError(f"keyword_alignment {slug}: {run.error}")
    clip = Encoder("clip", params.models.clip, device=params.models.device, cache=cache / "embeddings",
                   batch_size=ev.batch_size)
    return metrics.alignment(clip.images(run.images[slug]), clip.images(files))


def add_arguments(parser) -> None:
    parser.add_argument("--curated", default="data/curated", help="curated dataset (real images: held-out split)")
    parser.add_argument("--bank", default=None, help=f"LoRA bank index (default: {paths.BANK})")
    parser.add_argument("--metrics", default="metrics",
                        help="metrics root; the dvclive log (headline and per-keyword plot) goes to METRICS/eval/")
    parser.add_argument("--reports", default="reports",
                        help="directory for eval.json (everything), per_keyword.csv, eval_table.md and eval_grid.png")
    parser.add_argument("--keywords", default=None, help="comma-separated slugs (default: eval.keywords or keywords)")
    parser.add_argument("--cache", default=None, help="image/embedding cache (default: $TIPSEN_HOME/cache/eval)")


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    params.log()
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()] if args.keywords else None
    result = evaluate(params, curated=Path(args.curated), bank=Path(args.bank) if args.bank else None,
                      metrics_dir=Path(args.metrics), reports_dir=Path(args.reports),
                      cache_dir=Path(args.cache) if args.cache else None, keywords=keywords)
    for m in result["methods"].values():
        ok = m["status"] == "ok"
        print(f"{m['name']}\t" + (f"{m['clip_align_mean']:.4f} ± {m['clip_align_std']:.4f}" if ok else
                                  f"failed: {m['reason']}"))
    if result["note"]:
        print(result["note"])
    return 0 if any(m["status"] == "ok" for m in result["methods"].values()) else 1
