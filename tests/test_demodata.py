"""The synthetic KS-KEIT-V1 export: deterministic, in the raw layout, and as messy as a wild crawl."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_for_byte_deterministic(demo_raw, tmp_path):
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "tipsen.cli", "demo-data", str(out)], check=True, capture_output=True)
    assert _digest(out) == _digest(demo_raw)


def test_layout_and_mess(demo_raw, registry):
    items = [json.loads(line) for line in (demo_raw / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"id", "keyword", "image", "text", "source", "collected_at"} <= set(items[0])
    assert len({i["id"] for i in items}) == len(items)
    # keywords are given as slugs, English names and Korean names, plus one unknown keyword
    resolved = [registry.resolve(i["keyword"]) for i in items]
    assert sum(r is None for r in resolved) == 1
    assert {i["keyword"] for i in items} & {"김장", "Gimjang", "gimjang"} == {"김장", "Gimjang", "gimjang"}
    assert len({r.slug for r in resolved if r}) == 30
    assert any(not i["text"].strip() for i in items)
    modes, sizes, broken = set(), set(), 0
    for item in items:
        path = demo_raw / item["image"]
        if not path.exists():
            continue
        try:
            with Image.open(path) as im:
                im.load()
                modes.add(im.mode)
                sizes.add(im.size)
                if im.getexif().get(0x0112, 1) != 1:
                    modes.add("exif-rotated")
        except OSError:
            broken += 1
    assert {"RGB", "L", "CMYK", "RGBA", "P", "I;16", "exif-rotated"} <= modes
    assert broken == 2  # the truncated file and the non-image with a .jpg name
    assert min(min(s) for s in sizes) < 64 and max(max(s) / min(s) for s in sizes) > 5
    hashes = [hashlib.sha256((demo_raw / i["image"]).read_bytes()).hexdigest()
              for i in items if (demo_raw / i["image"]).exists()]
    assert len(hashes) > len(set(hashes))  # exact duplicates exist
