"""`dvc plots show` draws its charts offline: real dvc in a temporary project, the page opened in Chromium with
every network request refused. DVC's own page loads Vega from a CDN and stays blank; the project's template
(.dvc/plots/template.html, made by scripts/plots-template.py) carries the scripts itself."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / ".dvc" / "plots" / "template.html"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="BROWSER TESTS NOT RUN: chromium is missing; install Debian's 'chromium' package (make test does)")]


def test_the_project_uses_its_offline_template():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config["plots"]["html_template"] == "plots/template.html"  # relative to .dvc/
    page = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags have nowhere to go
    assert "<script src" not in page and "cdn.jsdelivr" not in page
    for name in ("vega 5.", "vega-lite 5.", "vega-embed 6."):
        assert f"/* {name}" in page and "Redistribution and use in source and binary forms" in page  # licences


def _plots_page(tmp: Path, template: Path | None) -> Path:
    """A DVC project with one training curve; `dvc plots show` with the given template (None: DVC's own)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = lambda *a: subprocess.run([sys.executable, "-m", "dvc", *a], cwd=tmp, env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True)
    tmp.mkdir()
    dvc("init", "--no-scm", "-q")
    if template is not None:
        dvc("config", "plots.html_template", str(template))
    (tmp / "loss.csv").write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1):.4f}\n" for i in range(20)))
    (tmp / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    dvc("plots", "show")
    return tmp / "dvc_plots" / "index.html"


def _draw(page_file: Path) -> tuple[int, list[str]]:
    """Open the page offline: the number of charts drawn, and the network requests it tried."""
    from playwright.sync_api import sync_playwright

    tried: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(offline=True)  # no network at all
            page = context.new_page()
            page.on("request", lambda request: tried.append(request.url) if request.url.startswith("http") else None)
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            try:
                page.wait_for_selector(".vega-embed canvas, .vega-embed svg", timeout=15_000)
            except Exception:  # noqa: BLE001 - nothing drawn: counted below
                pass
            drawn = page.locator(".vega-embed canvas, .vega-embed svg").count()
        finally:
            browser.close()
    return drawn, tried


def test_plots_draw_offline_with_the_template_and_not_without(tmp_path):
    drawn, tried = _draw(_plots_page(tmp_path / "ours", TEMPLATE))
    assert drawn >= 1 and tried == []
    drawn, tried = _draw(_plots_page(tmp_path / "stock", None))  # DVC's page: its scripts are on a CDN
    assert drawn == 0 and any("cdn.jsdelivr.net" in url for url in tried)
