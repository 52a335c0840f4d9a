"""Write service/requirements.lock: every package the Bento's Python environment installs, pinned exactly.

The closure of service/requirements.txt plus bentoml, resolved against this environment's installed metadata
(the same versions as requirements.lock, which `make lock` writes first). bentofile.yaml installs this file, so a
container built next month has the same packages as today's.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service" / "requirements.txt"
OUT = ROOT / "service" / "requirements.lock"
ALSO = ["bentoml"]  # what `bentoml build` adds to the image by itself
ENV = {**default_environment(), "python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}


def closure(roots: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require, extras included."""
    found: dict[str, str] = {}
    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = md.distribution(req.name)
        found[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**ENV, "extra": e}) for e in ("", *extras)):
                todo.append((sub, frozenset(sub.extras)))
    return found


def main() -> int:
    roots = [re.split(r"\s+#", line)[0].strip() for line in SERVICE.read_text(encoding="utf-8").splitlines()]
    pins = closure([r for r in roots if r and not r.startswith("#")] + ALSO)
    lines = ["# The Bento's Python environment, pinned: service/requirements.txt and bentoml with everything they need.",
             "# Made by `make lock` (scripts/bento-lock.py) from the locked development environment; do not edit."]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(pins)} packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
