"""Image helpers for curation: safe decoding to upright RGB, perceptual hash, sharpness, square crops, a dedup index.

Everything here is numpy + Pillow and torch-free, so curation's worker processes start fast.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoders we accept. EPS is left out on purpose: Pillow hands it to Ghostscript.
Image.init()  # register every plugin, so `formats=` can name them
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)
ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class Rejected(Exception):
    """An item that fails a check; `reason` is the report's name for it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Checks:
    max_pixels: int
    max_file_bytes: int
    min_short_side: int
    max_aspect: float


@contextmanager
def pixel_cap(max_pixels: int):
    """Pillow's decompression-bomb cap set to ours, with its warning raised as an error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, with the size checked before anything is decoded."""
    try:
        if not path.is_file():
            raise Rejected("missing_file", "not found" if not path.exists() else "not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise Rejected("file_too_large", f"{size} bytes > max_file_bytes {max_bytes}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may grow between stat and read
    except OSError as exc:  # permission denied, I/O error, ...
        raise Rejected("unreadable", exc.strerror or str(exc)) from None
    if len(data) > max_bytes:
        raise Rejected("file_too_large", f"more than max_file_bytes {max_bytes}")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled to 8, alpha composited onto white, CMYK/palette/grey converted."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, checks: Checks, *, draft: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Validated, upright RGB image and its oriented original (height, width); `draft` lets JPEG decode at
    a reduced scale that keeps both sides >= draft."""
    try:
        with pixel_cap(checks.max_pixels), Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size
            if w * h > checks.max_pixels:
                raise Rejected("decompression_bomb", f"{w}x{h} pixels > max_pixels {checks.max_pixels}")
            if im.getexif().get(ORIENTATION) in TRANSPOSED:
                w, h = h, w
            if max(w, h) > checks.max_aspect * min(w, h):
                raise Rejected("extreme_aspect", f"{w}x{h}, aspect {max(w, h) / min(w, h):.2f} > {checks.max_aspect}")
            if min(w, h) < checks.min_short_side:
                raise Rejected("too_small", f"{w}x{h}, short side < min_short_side {checks.min_short_side}")
            if draft:
                im.draft(None, (draft, draft))
            im.load()
            img = to_rgb(ImageOps.exif_transpose(im))
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise Rejected("not_an_image", f"not a {'/'.join(FORMATS)} file") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is this item's, not the run's
        reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise Rejected(reason, f"{type(exc).__name__}: {exc}"[:300]) from None
    return img, (h, w)


def resize_short(img: Image.Image, size: int, resample=Image.Resampling.LANCZOS, *,
                 like: tuple[int, int] | None = None) -> Image.Image:
    """Short side -> size, long side truncated, as torchvision's Resize(int) computes it (from the (w, h)
    `like`, when `img` is a reduced decode of an image that size)."""
    w, h = like or img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == img.size else img.resize(new, resample)


def square_crop(img: Image.Image, size: int, mode: str = "center", *,
                like: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to `size` and crop a square; returns the crop and its (top, left) in the resized
    image, the `crop_top_left` SDXL conditions on. "smart" slides the window to the most detailed part."""
    img = resize_short(img, size, like=like)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    if mode == "smart" and (w > size or h > size):
        g = np.asarray(img.convert("L"), dtype=np.float32)
        grad = np.abs(np.diff(g, axis=0, append=g[-1:])) + np.abs(np.diff(g, axis=1, append=g[:, -1:]))
        sums = np.convolve(grad.sum(1) if h > w else grad.sum(0), np.ones(size), mode="valid")  # per offset
        dist = np.abs(np.arange(len(sums)) - (top if h > w else left))
        best = int(np.lexsort((dist, -sums))[0])  # ties go to the offset nearest the centre
        top, left = (best, 0) if h > w else (0, best)
    return img.crop((left, top, left + size, top + size)), (top, left)


def sharpness(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: low for blurry images."""
    g = gray.astype(np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def phash(img: Image.Image, size: int = 8) -> int:
    """size*size-bit perceptual hash: the lowest size x size DCT frequencies of a (4 size)^2 grey image,
    thresholded at their median (size 8 is the classic 64-bit pHash)."""
    n = 4 * size
    dct = np.cos(np.pi / n * np.arange(n)[:, None] * (np.arange(n)[None, :] + 0.5))
    g = np.asarray(img.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (dct @ g @ dct.T)[:size, :size].ravel()
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HashIndex:
    """Near-duplicate lookup by multi-index hashing: split the 64 bits into t+1 chunks; two hashes within
    Hamming distance t agree exactly on at least one chunk (pigeonhole), so only bucket-mates are compared."""

    def __init__(self, threshold: int, bits: int = 64):
        self.t, self.bits = threshold, bits
        m = min(threshold + 1, bits)
        bounds = [round(i * bits / m) for i in range(m + 1)]
        self.spans = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(bounds, bounds[1:])]
        self.tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self.spans]
        self.hashes: list[int] = []
        self.keys: list[str] = []

    def find(self, h: int) -> tuple[str, int] | None:
        """The earliest-added key within the threshold, and its distance."""
        if self.t >= self.bits:
            return (self.keys[0], (h ^ self.hashes[0]).bit_count()) if self.keys else None
        cands = sorted({i for (lo, mask), tab in zip(self.spans, self.tables) for i in tab.get((h >> lo) & mask, ())})
        for i in cands:
            d = (h ^ self.hashes[i]).bit_count()
            if d <= self.t:
                return self.keys[i], d
        return None

    def add(self, h: int, key: str) -> None:
        i = len(self.hashes)
        self.hashes.append(h)
        self.keys.append(key)
        for (lo, mask), table in zip(self.spans, self.tables):
            table[(h >> lo) & mask].append(i)


def inspect(path: str, *, checks: Checks, work: int, thumb: int, hash_size: int) -> dict:
    """Worker: one file's checks and features, or its rejection. Sharpness is measured with the short side
    capped at `work`, so detail too fine to survive the resize to training size doesn't count."""
    try:
        data = read_bytes(Path(path), checks.max_file_bytes)
        img, size = decode(data, checks, draft=max(work, thumb))
    except Rejected as r:
        return {"reason": r.reason, "detail": r.detail}
    if min(img.size) > work:
        img = resize_short(img, work)
    out = {"reason": None, "size": size, "sha256": sha256_bytes(data), "phash": phash(img, hash_size),
           "sharpness": sharpness(np.asarray(img.convert("L")))}
    if thumb:  # the short-side resize open_clip's preprocess starts with, done here in parallel
        out["thumb"] = np.asarray(resize_short(img, thumb, Image.Resampling.BICUBIC))
    return out


def render(job: tuple[str, str, str, tuple[int, int]], *, checks: Checks, size: int, crop: str) -> tuple[int, int]:
    """Worker: write one kept image as a size x size RGB PNG; returns its crop_top_left."""
    src, dst, sha, (h, w) = job
    data = read_bytes(Path(src), checks.max_file_bytes)
    if sha256_bytes(data) != sha:
        raise RuntimeError(f"{src} changed while it was being curated")
    img, _ = decode(data, checks, draft=size)
    out, top_left = square_crop(img, size, crop, like=(w, h))
    out.save(dst, "PNG")
    return top_left
