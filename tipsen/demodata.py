"""A deterministic synthetic KS-KEIT-V1 export: a visually distinct motif per keyword, plus the mess of a wild crawl."""
from __future__ import annotations

import io
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tipsen.io import publish_dir
from tipsen.registry import Keyword, Registry

# Each keyword's clean items; the last keyword gets fewer, so curation has a short keyword to flag.
DEFAULT_PER_KEYWORD = 14
SHORT_KEYWORD_ITEMS = 6
MESS = ("small", "exact_dup", "near_dup", "blurry", "extreme_aspect", "grayscale", "cmyk", "rgba", "exif_rotated",
        "palette", "sixteen_bit", "empty_text")
KO_SCENES = ["어릴 적 추억", "시골 마을에서", "명절 풍경", "가족과 함께", "옛날 사진", "동네 어르신들과"]


def motif(index: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A keyword's procedural motif: its own hue and pattern, with per-image jitter."""
    hue = (index * 37) % 360 / 360.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    freq = 3 + index % 5 + rng.uniform(-0.5, 0.5)
    phase = rng.uniform(0, 2 * np.pi)
    kind = index % 6
    if kind == 0:
        field = np.sin(2 * np.pi * freq * xx + phase)  # stripes
    elif kind == 1:
        field = np.sign(np.sin(2 * np.pi * freq * xx + phase) * np.sin(2 * np.pi * freq * yy))  # checker
    elif kind == 2:
        r = np.hypot(xx - rng.uniform(0.3, 0.7), yy - rng.uniform(0.3, 0.7))
        field = np.sign(np.sin(2 * np.pi * freq * 2 * r + phase))  # rings
    elif kind == 3:
        field = np.sign(np.sin(2 * np.pi * freq * (xx + yy) + phase))  # diagonals
    elif kind == 4:
        field = np.where((np.sin(2 * np.pi * freq * xx) * np.sin(2 * np.pi * freq * yy + phase)) > 0.5, 1.0, -1.0)
    else:
        field = np.sign(np.sin(2 * np.pi * freq * xx * yy * 2 + phase))  # hyperbolic bands
    from colorsys import hsv_to_rgb

    a = np.array(hsv_to_rgb(hue, 0.8, 0.9))
    b = np.array(hsv_to_rgb((hue + 0.5) % 1.0, 0.6, 0.3 + 0.2 * (index % 3)))
    t = (field[..., None] + 1) / 2
    pixels = a * t + b * (1 - t) + rng.normal(0, 0.02, (height, width, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _mess(kind: str, img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Bytes and extension of one messy variant."""
    if kind == "small":
        return _encode(img.resize((40, 40)), "PNG"), "png"
    if kind == "blurry":
        return _encode(img.filter(ImageFilter.GaussianBlur(6)), "PNG"), "png"
    if kind == "extreme_aspect":
        return _encode(img.resize((480, 60)), "PNG"), "png"
    if kind == "grayscale":
        return _encode(img.convert("L"), "PNG"), "png"
    if kind == "cmyk":
        return _encode(img.convert("CMYK"), "JPEG", quality=92), "jpg"
    if kind == "rgba":
        rgba = img.convert("RGBA")
        alpha = Image.fromarray((rng.uniform(0, 1, (img.height, img.width)) > 0.3).astype(np.uint8) * 255)
        rgba.putalpha(alpha)
        return _encode(rgba, "PNG"), "png"
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated; viewers rotate 90 degrees clockwise
        return _encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif), "jpg"
    if kind == "palette":
        return _encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"), "png"
    if kind == "sixteen_bit":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        return _encode(Image.fromarray(arr), "PNG"), "png"  # uint16 -> mode I;16
    raise ValueError(kind)


def _text(kw: Keyword, j: int) -> str:
    if j % 3 == 2:
        return f"{kw.keyword}: {kw.description}."
    return f"{kw.ko} — {KO_SCENES[j % len(KO_SCENES)]}"


def demo_data(out: Path, *, registry: Registry, per_keyword: int = DEFAULT_PER_KEYWORD, seed: int = 0) -> dict:
    """Write the export to `out` (atomically) and return counts. Byte-for-byte deterministic."""
    out = Path(out)
    with publish_dir(out) as tmp:  # a rerun replaces the export whole, or leaves the old one
        items: list[dict] = []
        day0 = date(2015, 1, 1)

        def add(slug_or_name: str, name: str, data: bytes, text: str, source: str) -> dict:
            rel = f"images/{name}"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            item = {"id": f"ks-{len(items):05d}", "keyword": slug_or_name, "image": rel, "text": text,
                    "source": source, "collected_at": (day0 + timedelta(days=3 * len(items))).isoformat()}
            items.append(item)
            return item

        keywords = list(registry)
        for ki, kw in enumerate(keywords):
            rng = np.random.default_rng([seed, ki])
            n = SHORT_KEYWORD_ITEMS if ki == len(keywords) - 1 else per_keyword
            spellings = [kw.slug, kw.keyword, kw.ko]
            clean: list[tuple[Image.Image, bytes]] = []
            for j in range(n):
                w, h = int(rng.integers(96, 320)), int(rng.integers(96, 320))
                img = motif(ki, rng, w, h)
                data = _encode(img, "JPEG", quality=int(rng.integers(80, 96))) if j % 2 else _encode(img, "PNG")
                add(spellings[j % 3], f"{kw.slug}/{j:03d}.{'jpg' if j % 2 else 'png'}", data, _text(kw, j),
                    f"senior-news/article/{ki * 1000 + j}")
                clean.append((img, data))
            # Two messy items per keyword, cycling through every kind of mess across the keywords.
            for m in range(2):
                kind = MESS[(2 * ki + m) % len(MESS)]
                img, data = clean[m]
                src = f"senior-news/article/{ki * 1000 + 500 + m}"
                if kind == "exact_dup":
                    add(kw.ko, f"{kw.slug}/dup-{m}.{'jpg' if m % 2 else 'png'}", data, _text(kw, m), src)
                elif kind == "near_dup":
                    arr = np.clip(np.asarray(img, dtype=np.int16) + 6, 0, 255).astype(np.uint8)
                    add(kw.keyword, f"{kw.slug}/near-{m}.jpg", _encode(Image.fromarray(arr), "JPEG", quality=85),
                        _text(kw, m), src)
                elif kind == "empty_text":
                    base = motif(ki, rng, 200, 180)
                    add(kw.slug, f"{kw.slug}/notext-{m}.png", _encode(base, "PNG"), "   ", src)
                else:
                    data, ext = _mess(kind, motif(ki, rng, 240, 200), rng)
                    add(kw.slug, f"{kw.slug}/{kind}-{m}.{ext}", data, _text(kw, m + 1), src)

        # Export-wide mess: a broken file, a fake image, an unknown keyword, a missing file, a cross-keyword copy.
        first = (tmp / items[0]["image"]).read_bytes()
        add(keywords[0].slug, "misc/truncated.jpg", _encode(motif(0, np.random.default_rng(seed), 200, 200), "JPEG")[:700],
            "잘린 파일", "senior-news/article/90001")
        add(keywords[1].slug, "misc/not-an-image.jpg", b"<html><body>404 Not Found</body></html>\n",
            "이미지가 아닌 파일", "senior-news/article/90002")
        add("pyramid", "misc/unknown-keyword.png", _encode(motif(3, np.random.default_rng(seed), 128, 128), "PNG"),
            "알 수 없는 키워드", "senior-news/article/90003")
        items.append({"id": f"ks-{len(items):05d}", "keyword": keywords[2].slug, "image": "images/misc/missing.png",
                      "text": "없는 파일", "source": "senior-news/article/90004", "collected_at": "2024-01-01"})
        add(keywords[3].slug, "misc/cross-keyword-copy.png", first, "다른 키워드에 올라간 같은 사진",
            "senior-news/article/90005")

        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
    return {"items": len(items), "keywords": len(keywords), "out": str(out)}


def add_arguments(parser) -> None:
    parser.add_argument("out", help="output directory (replaced atomically)")
    parser.add_argument("--per-keyword", type=int, default=DEFAULT_PER_KEYWORD, help="clean items per keyword")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from tipsen.errors import ConfigError

    if args.per_keyword < 2:
        raise ConfigError(f"--per-keyword: must be at least 2 (got {args.per_keyword})")
    print(json.dumps(demo_data(Path(args.out), registry=Registry.load(), per_keyword=args.per_keyword,
                               seed=args.seed)))
    return 0
