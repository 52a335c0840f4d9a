"""Write .dvc/plots/template.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined, so that
`dvc plots show` draws its charts offline (DVC's own page loads them from a CDN).

    npm pack vega@5.33.0 vega-lite@5.23.0 vega-embed@6.29.0   # in an empty folder, then
    python scripts/plots-template.py FOLDER

The scripts are the packages' unmodified `build/*.min.js`, each after its package's licence (BSD-3-Clause).
"""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

PACKAGES = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
OUT = Path(__file__).resolve().parent.parent / ".dvc" / "plots" / "template.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>tipsen: DVC plots</title>
    <!-- {names}: unmodified builds from npm, inlined so that this page needs no network. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def read(folder: Path, name: str, member: str) -> tuple[str, str, str]:
    """(version, licence, script) of one package from its `npm pack` tarball in `folder`."""
    (tgz,) = folder.glob(f"{name}-[0-9]*.tgz")
    with tarfile.open(tgz) as tar:
        get = lambda path: tar.extractfile(f"package/{path}").read().decode("utf-8")  # noqa: E731
        version = json.loads(get("package.json"))["version"]
        return version, get("LICENSE"), get(member)


def main(folder: str) -> None:
    scripts, names = [], []
    for name, member in PACKAGES.items():
        version, licence, code = read(Path(folder), name, member)
        if "</script" in code or "*/" in licence:
            raise SystemExit(f"{name} {version}: cannot be inlined safely")
        names.append(f"{name} {version}")
        scripts.append(f"    <script>\n/* {name} {version} (npm), licence:\n{licence}*/\n{code}\n    </script>")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE.format(names=", ".join(names), scripts="\n".join(scripts)), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB): {', '.join(names)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
