"""Curation on the demo export: every rejection reason on real files, dedup across keywords, RGB conversion,
the metadata the trainer reads, the report and metrics, determinism, raw immutability and the CLI's errors."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tipsen import imaging
from tipsen.errors import ConfigError
from tipsen.curate import curate, heldout_ids, quality

RES = 64
SMALL = ["yakgwa", "cheomseongdae", "sebae", "dalgona"]
BROKEN_JSON, NOT_AN_OBJECT = '{"id": "x-broken", "keyword": ', '["not", "an", "object"]'
FIELDS = {"file_name", "slug", "split", "text", "original_text", "prompt", "original_size", "crop_top_left",
          "scores", "source_id", "source"}


def with_curate(params, **update):
    return params.model_copy(update={"curate": params.curate.model_copy(update=update)})


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def items_of(raw: Path) -> list[dict]:
    out = []
    for line in (raw / "items.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def by_image(raw: Path) -> dict[str, str]:
    ids: dict[str, str] = {}
    for it in items_of(raw):
        ids.setdefault(it["image"], it["id"])
    return ids


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for m in sorted(out.glob("*/metadata.jsonl"))
            for line in m.read_text(encoding="utf-8").splitlines()]


def outcome(out: Path) -> dict[str, tuple[str, str, str]]:
    """id -> (keyword group, "kept" or the reason, detail)."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    res = {r["source_id"]: (r["slug"], "kept", "") for r in rows_of(out)}
    for slug, g in [*report["keywords"].items(), ("_unassigned", report["unassigned"])]:
        for r in g["rejected_items"]:
            key = f"{r['id']} (duplicate_id)" if r["reason"] == "duplicate_id" else r["id"]
            assert key not in res, f"{key} is accounted for twice"
            res[key] = (slug, r["reason"], r["detail"])
    return res


def subset(raw: Path, dst: Path, slugs: list[str], registry) -> Path:
    """A smaller export: the given keywords' items, and the unknown keyword."""
    keep = [it for it in items_of(raw) if getattr(registry.resolve(it["keyword"]), "slug", None) in [*slugs, None]]
    for it in keep:
        if (raw / it["image"]).exists():
            (dst / it["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(raw / it["image"], dst / it["image"])
    (dst / "items.jsonl").write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in keep), "utf-8")
    return dst


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def add_mess(raw: Path) -> dict[str, str]:
    """Append what the demo export lacks to a copy of it; returns {id: expected reason}."""
    lines, expected = [], {}
    extra = raw / "images" / "extra"
    extra.mkdir()

    def add(id_, keyword, name, data, reason, image=None):
        if data is not None:
            (extra / name).write_bytes(data)
        image = image or f"images/extra/{name}"
        lines.append(json.dumps({"id": id_, "keyword": keyword, "image": image, "text": "추가"}))
        expected[id_] = reason

    # Tiny files that decode to more than max_pixels (1e6 here): Pillow's warning range, then its error range.
    add("x-bomb-warn", "hanok", "bomb-warn.png", png(Image.new("L", (1100, 1000))), "decompression_bomb")
    add("x-bomb-error", "hanok", "bomb-error.png", png(Image.new("L", (1600, 1600))), "decompression_bomb")
    add("x-too-large", "hanok", "too-large.png", b"\x89PNG\r\n\x1a\n" + os.urandom(1_100_000), "file_too_large")
    data = bytearray((raw / "images/hanok/002.png").read_bytes())
    idat = data.find(b"IDAT")
    data[idat + 40:idat + 240] = bytes(b ^ 0x5A for b in data[idat + 40:idat + 240])
    add("x-corrupt", "hanok", "corrupt.png", bytes(data), "corrupt")
    add("x-escape", "hanok", None, None, "bad_path", image="../outside.png")
    add("x-absolute", "hanok", None, None, "bad_path", image="/etc/hostname")
    (extra / "link.png").symlink_to("/etc/hostname")
    add("x-symlink", "hanok", "link.png", None, "bad_path")
    add("ks-00000", "hanok", "dup-id.png", png(Image.new("RGB", (100, 100))), "duplicate_id")
    # A near-duplicate across keywords: a yakgwa image, brightened, re-saved and filed under hanbok.
    src = Image.open(raw / "images/yakgwa/002.png").convert("RGB")
    bright = np.clip(np.asarray(src, dtype=np.int16) + 6, 0, 255).astype(np.uint8)
    add("x-near-cross", "hanbok", "near-cross.png", png(Image.fromarray(bright)), "near_duplicate")
    lines += [BROKEN_JSON, NOT_AN_OBJECT]
    lines.append(json.dumps({"id": "x-nokeyword", "image": "images/hanok/000.png"}))
    flipped = Image.open(raw / "images/yaksik/002.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    add("x-alias", "약밥", "alias.png", png(flipped), "resolved")
    with open(raw / "items.jsonl", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return expected


@pytest.fixture(scope="module")
def messy(demo_raw, demo_params, tmp_path_factory):
    """The whole demo export plus extra mess, curated once with every usable item kept."""
    root = tmp_path_factory.mktemp("curate")
    raw = root / "raw"
    shutil.copytree(demo_raw, raw, symlinks=True)
    expected = add_mess(raw)
    before = tree(raw)
    params = with_curate(demo_params, per_keyword=1000, max_pixels=1_000_000, max_file_bytes=1_000_000)
    report = curate(params, raw, root / "curated", metrics=root / "metrics", progress=False)
    return {"raw": raw, "out": root / "curated", "metrics": root / "metrics", "report": report,
            "expected": expected, "before": before, "params": params}


@pytest.fixture(scope="module")
def small(demo_raw, tmp_path_factory, registry):
    """Four keywords (one of them the demo's short keyword), with their share of the export-wide mess."""
    return subset(demo_raw, tmp_path_factory.mktemp("small"), SMALL, registry)


@pytest.fixture()
def small_params(demo_params):
    return demo_params.model_copy(update={"keywords": SMALL})


def test_every_rejection_reason_on_real_files(messy):
    res, raw = outcome(messy["out"]), messy["raw"]
    ids = by_image(raw)
    for id_, reason in messy["expected"].items():
        if id_ == "ks-00000":  # the repeated id; its first occurrence is an ordinary item
            assert res["ks-00000 (duplicate_id)"][:2] == ("hanok", "duplicate_id")
        elif id_ == "x-near-cross":
            pair = [res[id_], res[ids["images/yakgwa/002.png"]]]
            assert sorted(p[1] for p in pair) == ["kept", "near_duplicate"], pair
        elif reason == "resolved":
            assert res[id_][0] == "yaksik"  # through the Korean alias 약밥
        else:
            assert res[id_][1] == reason, (id_, res[id_])
    planted = {"small": "too_small", "extreme_aspect": "extreme_aspect", "blurry": "blurry"}
    for image, id_ in ids.items():
        kind = Path(image).stem.rsplit("-", 1)[0]
        if kind in planted:
            assert res[id_][1] == planted[kind], (image, res[id_])
    assert res[ids["images/misc/truncated.jpg"]][1] == "truncated"
    assert res[ids["images/misc/not-an-image.jpg"]][1] == "not_an_image"
    assert res[ids["images/misc/missing.png"]][1] == "missing_file"
    assert res[ids["images/misc/unknown-keyword.png"]][:2] == ("_unassigned", "unknown_keyword")
    report = messy["report"]
    assert report.unassigned.reasons == {"bad_record": 3, "unknown_keyword": 1}
    lines = (raw / "items.jsonl").read_text("utf-8").splitlines()
    broken = {f"line {n}" for n, line in enumerate(lines, 1) if line in (BROKEN_JSON, NOT_AN_OBJECT)}
    assert len(broken) == 2
    assert {r.id for r in report.unassigned.rejected_items if r.reason == "bad_record"} == broken | {"x-nokeyword"}
    assert set(report.totals.reasons) == {
        "bad_path", "bad_record", "blurry", "corrupt", "decompression_bomb", "duplicate_id", "exact_duplicate",
        "extreme_aspect", "file_too_large", "missing_file", "near_duplicate", "not_an_image", "too_small",
        "truncated", "unknown_keyword"}


def test_duplicates_within_and_across_keywords(messy):
    res, raw = outcome(messy["out"]), messy["raw"]
    ids = by_image(raw)

    def one_kept(a: str, b: str, reason: str) -> None:
        (ga, ra, da), (gb, rb, db) = res[a], res[b]
        assert sorted([ra, rb]) == sorted(["kept", reason]), (a, res[a], b, res[b])
        assert (da if ra == reason else db).endswith(b if ra == reason else a)  # names the copy that was kept

    one_kept(ids["images/misc/cross-keyword-copy.png"], ids["images/yakgwa/000.png"], "exact_duplicate")
    assert res[ids["images/misc/cross-keyword-copy.png"]][0] == "ganggangsullae"  # filed under another keyword
    dups = [(image, f"{Path(image).parent}/001.jpg") for image in ids if Path(image).stem == "dup-1"]
    assert len(dups) == 5
    for copy, original in dups:
        one_kept(ids[copy], ids[original], "exact_duplicate")
    # The demo's near copies (brightened, re-encoded JPEG): the hash must find most of them.
    nears = [(ids[i], ids[f"{Path(i).parent}/000.png"]) for i in ids if Path(i).stem == "near-0"]
    found = [p for p in nears if "near_duplicate" in (res[p[0]][1], res[p[1]][1])]
    assert len(found) >= 3, [(p, res[p[0]], res[p[1]]) for p in nears]
    for a, b in found:
        one_kept(a, b, "near_duplicate")
    # Every near-duplicate points at a kept item within the Hamming threshold, whatever its keyword.
    kept = {i for i, r in res.items() if r[1] == "kept"}
    for id_, (_, reason, detail) in res.items():
        if reason == "near_duplicate":
            bits, other = int(detail.split()[2]), detail.split()[-1]
            assert other in kept and bits <= messy["params"].curate.phash_hamming


def test_hash_index_matches_brute_force():
    rng = random.Random(0)
    for threshold, bits in ((0, 64), (6, 64), (8, 256), (70, 64)):
        index, stored = imaging.HashIndex(threshold, bits=bits), []
        for n in range(400):
            if stored and rng.random() < 0.5:  # a near copy of an earlier hash
                h = rng.choice(stored)
                for _ in range(rng.randint(0, threshold + 3)):
                    h ^= 1 << rng.randrange(bits)
            else:
                h = rng.getrandbits(bits)
            hit = index.find(h)
            brute = next(((f"k{i}", (h ^ s).bit_count()) for i, s in enumerate(stored)
                          if (h ^ s).bit_count() <= threshold), None)
            assert hit == brute
            if hit is None:
                index.add(h, f"k{len(stored)}")
                stored.append(h)


def _reference(arr: np.ndarray, row: dict) -> np.ndarray:
    """An independent resize + crop of a reference RGB array, placed where the metadata says."""
    img = Image.fromarray(arr.astype(np.uint8))
    w, h = img.size
    size = (RES, int(RES * h / w)) if w <= h else (int(RES * w / h), RES)
    top, left = row["crop_top_left"]
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS).crop((left, top, left + RES, top + RES)), float)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean())


def test_modes_and_orientation_become_correct_rgb(messy):
    raw, out = messy["raw"], messy["out"]
    src = {id_: raw / image for image, id_ in by_image(raw).items()}
    res = outcome(out)
    seen = set()
    for row in rows_of(out):
        path = src[row["source_id"]]
        kind = path.stem.rsplit("-", 1)[0]
        got = Image.open(out / row["slug"] / row["file_name"])
        assert (got.mode, got.size, got.format) == ("RGB", (RES, RES), "PNG")
        got = np.asarray(got, float)
        stored = Image.open(path)
        if kind == "exif_rotated":
            arr = np.asarray(stored.convert("RGB"))
            upright = np.rot90(arr, k=-1)  # EXIF orientation 6: the viewer turns it 90 degrees clockwise
            assert row["original_size"] == list(upright.shape[:2]) == [200, 240]
            ok, wrong = _mse(got, _reference(upright, row)), _mse(got, _reference(np.rot90(arr, k=1), row))
            assert ok < 150 and ok * 4 < wrong, (ok, wrong)
        elif kind == "rgba":
            rgba = np.asarray(stored, float)
            alpha = rgba[..., 3:] / 255
            ok = _mse(got, _reference(rgba[..., :3] * alpha + 255 * (1 - alpha), row))  # onto white
            dropped = _mse(got, _reference(rgba[..., :3], row))
            assert ok < 60 and ok * 4 < dropped, (ok, dropped)
        elif kind == "sixteen_bit":
            assert stored.mode == "I;16"
            grey = np.asarray(stored, float) / 257
            assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
            assert _mse(got, _reference(np.repeat(np.rint(grey)[..., None], 3, axis=2), row)) < 30
        elif kind == "cmyk":
            assert stored.mode == "CMYK"
            cmyk = np.asarray(stored, float)
            rgb = np.clip(255 - cmyk[..., :3] - cmyk[..., 3:], 0, 255)
            assert _mse(got, _reference(rgb, row)) < 60 and got.std(axis=2).mean() > 5  # colour, not grey
        elif kind == "palette":
            assert stored.mode == "P"
            pal = np.array(stored.getpalette(), float).reshape(-1, 3)
            assert _mse(got, _reference(pal[np.asarray(stored)], row)) < 30
        elif kind == "grayscale":
            assert np.array_equal(got[..., 0], got[..., 2])
        else:
            continue
        seen.add(kind)
    assert seen == {"exif_rotated", "rgba", "sixteen_bit", "cmyk", "palette", "grayscale"}
    # Mode items that were not kept lost to a duplicate, never to a decoding problem.
    for id_, path in src.items():
        if path.stem.rsplit("-", 1)[0] in seen:
            assert res[id_][1] in ("kept", "near_duplicate"), (path, res[id_])


def test_metadata_the_trainer_reads(messy, registry):
    from tipsen.train_data import load_examples

    raw, out, c = messy["raw"], messy["out"], messy["params"].curate
    items: dict[str, dict] = {}
    for it in items_of(raw):
        items.setdefault(it["id"], it)  # the repeated id was rejected; its first occurrence counts
    for slug, g in messy["report"].keywords.items():
        if not g.kept:
            continue
        rows = [json.loads(line) for line in (out / slug / "metadata.jsonl").read_text("utf-8").splitlines()]
        assert [r["file_name"] for r in rows] == [f"{i:03d}.png" for i in range(len(rows))]
        assert sorted(p.name for p in (out / slug).iterdir()) == sorted([r["file_name"] for r in rows] +
                                                                       ["metadata.jsonl"])
        combined = [r["scores"]["combined"] for r in rows]
        assert combined == sorted(combined, reverse=True)  # file order is rank order
        heldout = [r["source_id"] for r in rows if r["split"] == "heldout"]
        assert set(heldout) == heldout_ids([r["source_id"] for r in rows], c.heldout_fraction)
        assert len(heldout) == (max(1, round(len(rows) * c.heldout_fraction)) if len(rows) >= 2 else 0)
        for r in rows:
            assert FIELDS <= set(r) and r["slug"] == slug and r["split"] in ("train", "heldout")
            item = items[r["source_id"]]
            assert registry.resolve(item["keyword"]).slug == slug
            assert r["prompt"] == registry[slug].prompt == f"A photo of {registry[slug].keyword} " \
                                                           f"{registry[slug].class_token}"
            assert r["original_text"] == item["text"]
            assert r["text"] == (" ".join(item["text"].split()) or registry[slug].description)
            with Image.open(raw / item["image"]) as src:
                w, h = ImageOps.exif_transpose(src).size
            assert r["original_size"] == [h, w]
            nh, nw = (int(RES * h / w), RES) if w <= h else (RES, int(RES * w / h))
            assert r["crop_top_left"] == [round((nh - RES) / 2), round((nw - RES) / 2)]  # centre crop
            s = r["scores"]
            assert s["sharpness"] >= c.min_sharpness and -1 <= s["relevance"] <= 1
            assert s["combined"] == pytest.approx(c.relevance_weight * s["relevance"] + c.quality_weight *
                                                  quality(s["sharpness"]), abs=1e-5)
        examples = load_examples(out, slug, resolution=RES)
        assert len(examples) == len(rows) - len(heldout) >= 1
    texts = {r["source_id"]: r for r in rows_of(out)}
    empty = [i for i, it in items.items() if "notext" in it["image"] and i in texts]
    assert empty and all(texts[i]["text"] == registry[texts[i]["slug"]].description for i in empty)
    assert any("—" in r["text"] and any("\uac00" <= ch <= "\ud7a3" for ch in r["text"]) for r in texts.values())


def test_report_accounts_for_every_item_and_metrics(messy):
    raw, out = messy["raw"], messy["out"]
    res = outcome(out)
    ids = {it["id"] for it in items_of(raw)}
    assert set(res) == ids | {"ks-00000 (duplicate_id)"} | {i for i in res if i.startswith("line ")}
    assert len([i for i in res if i.startswith("line ")]) == 2
    report = json.loads((out / "report.json").read_text("utf-8"))
    t = report["totals"]
    assert t["in"] == t["kept"] + t["rejected"] == len(items_of(raw)) + 2  # plus the 2 lines that aren't JSON objects
    assert t["kept"] == sum(g["kept"] for g in report["keywords"].values()) == len(rows_of(out))
    for g in report["keywords"].values():
        assert g["in"] == g["kept"] + g["rejected"] == g["kept"] + sum(g["reasons"].values())
        assert g["train"] + g["heldout"] == g["kept"]
    assert report["short_keywords"] == list(report["keywords"])  # per_keyword 1000: everyone is short
    metrics = json.loads((messy["metrics"] / "curate.json").read_text())
    assert (metrics["in"], metrics["kept"], metrics["keywords"]) == (t["in"], t["kept"], 30)

    def numeric(v):
        return isinstance(v, (int, float)) or isinstance(v, dict) and all(map(numeric, v.values()))
    assert numeric(metrics) and len(metrics) == 7  # dvc metrics reads only numbers: a few short columns
    csv = (messy["metrics"] / "curate_kept.csv").read_text().splitlines()
    assert csv[0] == "slug,kept" and len(csv) == 31
    assert {line.split(",")[0]: int(line.split(",")[1]) for line in csv[1:]} == \
        {slug: g["kept"] for slug, g in report["keywords"].items()}


def test_raw_export_is_never_modified(messy):
    assert tree(messy["raw"]) == messy["before"]
    assert not [p for p in messy["out"].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_deterministic_across_runs_and_workers_with_short_flag(small, small_params, tmp_path):
    before = tree(small)
    params = with_curate(small_params, per_keyword=8)
    a = curate(params, small, tmp_path / "a", progress=False)
    first = tree(tmp_path / "a")
    b = curate(with_curate(params, workers=1), small, tmp_path / "a", progress=False)  # replaces the output
    assert tree(tmp_path / "a") == first and a == b
    assert tree(small) == before
    assert a.short_keywords == ["dalgona"] and a.keywords["dalgona"].short
    assert [a.keywords[s].kept for s in ("yakgwa", "cheomseongdae", "sebae")] == [8, 8, 8]
    assert a.keywords["yakgwa"].reasons["not_in_top_n"] >= 1
    assert a.keywords["dalgona"].kept == 7 and a.keywords["dalgona"].heldout == 1


def test_relevance_threshold_rejects_the_low_scores(small, small_params, tmp_path):
    curate(with_curate(small_params, per_keyword=1000), small, tmp_path / "a", progress=False)
    first = outcome(tmp_path / "a")
    scores = {r["source_id"]: r["scores"]["relevance"] for r in rows_of(tmp_path / "a")}
    ranked = sorted(scores.values())
    cut = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    curate(with_curate(small_params, per_keyword=1000, min_relevance=cut), small, tmp_path / "b", progress=False)
    second = outcome(tmp_path / "b")
    low = {i for i, s in scores.items() if s < cut}
    irrelevant = {i for i, r in second.items() if r[1] == "irrelevant"}
    kept = {i for i, r in second.items() if r[1] == "kept"}
    assert low and low <= irrelevant and not kept & low and set(scores) - low <= kept
    # The rest were duplicates before: with the relevance filter first, they are now irrelevant themselves.
    assert all(first[i][1].endswith("_duplicate") for i in irrelevant - low)
    for i in irrelevant:
        assert float(second[i][2].split()[1]) < cut
    assert all(r["scores"]["relevance"] >= cut for r in rows_of(tmp_path / "b"))


def test_to_rgb_handles_every_mode():
    white = np.array([255, 255, 255])
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [200, 128]]], dtype=np.uint8), "LA")
    assert np.asarray(imaging.to_rgb(la)).tolist() == [[[255] * 3, [0] * 3, [227] * 3]]  # 200*128/255 + 127
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(imaging.to_rgb(pal)).tolist() == [[white.tolist(), [40, 50, 60]]]
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    assert np.asarray(imaging.to_rgb(i16))[0, :, 0].tolist() == [0, 100, 255]
    assert np.asarray(imaging.to_rgb(Image.new("CMYK", (1, 1), (0, 255, 0, 0))))[0, 0].tolist() == [255, 0, 255]
    assert imaging.to_rgb(Image.new("1", (3, 3), 1)).mode == "RGB"


def test_unreadable_file_is_one_rejected_item(tmp_path, monkeypatch):
    f = tmp_path / "secret.png"
    f.write_bytes(png(Image.new("RGB", (80, 80))))
    f.chmod(0)
    if os.geteuid() == 0:  # root reads anything: simulate the permission error it would otherwise get
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(imaging, "open", denied, raising=False)
    with pytest.raises(imaging.Rejected) as exc:
        imaging.read_bytes(f, 1_000_000)
    assert exc.value.reason == "unreadable"


def test_unreadable_export_is_a_config_error(small, small_params, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    shutil.copytree(small, raw)
    raw.chmod(0)
    if os.geteuid() == 0:  # root reads anything: simulate the permission error it would otherwise get
        real = Path.read_bytes

        def read_bytes(p):
            if p.name == "items.jsonl":
                raise PermissionError(13, "Permission denied")
            return real(p)
        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    try:
        with pytest.raises(ConfigError, match="permission denied"):
            curate(small_params, raw, tmp_path / "out", progress=False)
    finally:
        raw.chmod(0o755)


def test_smart_crop_follows_the_detail():
    arr = np.full((64, 256, 3), 128, np.uint8)
    arr[:, 200:240] = np.random.default_rng(0).integers(0, 255, (64, 40, 3))
    crop, (top, left) = imaging.square_crop(Image.fromarray(arr), 32, "smart")
    assert top == 0 and 100 - 32 <= left <= 120 - 16 and crop.size == (32, 32)  # scaled by 1/2: detail at 100-120
    assert imaging.square_crop(Image.fromarray(arr), 32, "center")[1] == (0, 48)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "tipsen.cli", "curate", "--params", str(root / "params.yaml"),
                           "--profile", "demo", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.parametrize("case", ["missing", "empty", "inside", "flag"])
def test_cli_user_errors_are_one_line(case, tmp_path, small):
    raw = tmp_path / "raw"
    raw.mkdir()
    out, extra = tmp_path / "out", []
    if case == "empty":
        (raw / "items.jsonl").write_text("\n")
    elif case in ("inside", "flag"):
        raw = small
        out = small / "curated" if case == "inside" else out
        extra = ["--per-keyword", "0"] if case == "flag" else []
    r = _cli("--raw", str(raw), "--out", str(out), *extra, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    expected = {"missing": "no items.jsonl", "empty": "has no items", "inside": "must be outside",
                "flag": "--per-keyword"}[case]
    assert lines[0].startswith("tipsen curate: error: ") and expected in lines[0]
    assert not out.exists()


def test_cli_run_writes_dataset_and_metrics(small, tmp_path):
    r = _cli("--raw", str(small), "--out", "data/curated", "--metrics", "metrics", "--per-keyword", "3",
             "--no-relevance", "--workers", "2", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "curated 12 of" in r.stdout and "Traceback" not in r.stderr
    rows = rows_of(tmp_path / "data/curated")
    assert len(rows) == 12 and all(row["scores"]["relevance"] is None for row in rows)
    assert json.loads((tmp_path / "metrics/curate.json").read_text())["kept"] == 12
    assert (tmp_path / "metrics/curate_kept.csv").read_text().startswith("slug,kept\nyakgwa,3\n")


def test_cli_writes_only_under_the_paths_it_was_given(small, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    r = _cli("--raw", str(small), "--out", str(tmp_path / "out"), "--per-keyword", "2", "--no-relevance",
             "--no-progress", cwd=work)
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == [] and rows_of(tmp_path / "out")  # no metrics/ in the working directory
