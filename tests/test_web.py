"""The web page in a real browser: Debian's headless Chromium driven by Playwright, against the real service on
127.0.0.1 (tiny models, auth on: each page is given the key once, as a helper would type it).

Without /usr/bin/chromium these tests are skipped with a loud reason (`make test` installs it); never faked.
axe-core 4.14 (MPL-2.0, unmodified) is vendored as tests/assets/axe.min.js for the accessibility audit.
"""
from __future__ import annotations

import base64
import io
import os
import secrets
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tipsen.testing import (SERVICE_CORRUPT, SERVICE_PARAMS, SERVICE_SLUGS, Server, a1111_png_info, random_bank,
                            write_params)
from tipsen.testing import SERVICE_SIZE as SIZE

ROOT = Path(__file__).resolve().parent.parent
KEY = f"tk-{secrets.token_hex(12)}"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
AXE = Path(__file__).resolve().parent / "assets" / "axe.min.js"
SCREENSHOT = ROOT / "docs" / "screenshot.png"  # the README's picture: rewritten only when TIPSEN_UPDATE_SCREENSHOT=1
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="BROWSER TESTS NOT RUN: chromium is missing; install Debian's 'chromium' package (make test does)")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    bank = random_bank(tmp / "bank", [*SERVICE_SLUGS, "charye"], corrupt=SERVICE_CORRUPT)  # charye: a homonym
    srv = Server(tmp, params=write_params(tmp / "params.yaml", SERVICE_PARAMS), bank=bank, key=KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=ARGS,
            headless=True, viewport={"width": 900, "height": 1200}, accept_downloads=True)
        yield context
        context.close()


@pytest.fixture()
def screenshot(tmp_path) -> Path:
    """Where the screenshot goes: the test's own folder, or docs/ when TIPSEN_UPDATE_SCREENSHOT=1 asks for it."""
    return SCREENSHOT if os.environ.get("TIPSEN_UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"


@pytest.fixture()
def page(browser, server):
    """A fresh tab (fresh sessionStorage): the page asks for the key, which is entered once."""
    page = browser.new_page()
    refused: list[str] = []  # the page runs under the service's CSP: nothing of its own may be refused
    page.on("console", lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "key"
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    page.wait_for_selector("#chips button")
    assert page.is_hidden("#key-form")
    assert page.evaluate("sessionStorage.getItem('tipsen-key')") == KEY
    yield page
    page.close()
    assert not refused, refused


def image_of(page) -> Image.Image:
    src = page.get_attribute("#picture", "src")
    assert src.startswith("data:image/png;base64,")
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def audit(page) -> list[dict]:
    """axe-core's serious and critical violations of WCAG 2.0-2.2 A/AA on the current page."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))  # from the test, not a <script> tag: the page's CSP allows none
    result = page.evaluate("axe.run(document, {runOnly: {type: 'tag', values: "
                           "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa']}})")
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["html"][:120] for n in v["nodes"]]}
            for v in result["violations"] if v["impact"] in ("serious", "critical")]


def test_gimjang_day_to_a_png_with_details_and_screenshot(page, screenshot):
    page.type("#prompt", "김장하는 날")
    page.wait_for_selector('#chips button[data-slug="gimjang"][aria-pressed="true"]')
    assert page.inner_text("#route") == "김장 (Gimjang)으로 그릴게요."
    assert page.get_attribute('#chips button[data-slug="yakgwa"]', "aria-pressed") == "false"
    assert page.get_attribute('#chips button[data-slug="hanbok"]', "aria-disabled") == "true"  # corrupt adapter

    page.click("#make")
    assert page.is_visible("#progress") and "기다려 주세요" in page.inner_text("#progress-text")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.is_hidden("#progress")
    image = image_of(page)
    assert image.size == (SIZE, SIZE) and image.format == "PNG"  # generate.width/height of the served params
    # the alt text is in the page's language: the topic and the senior's own words
    assert page.get_attribute("#picture", "alt") == "김장 그림: 김장하는 날"
    assert page.evaluate("document.activeElement.id") == "result-title"

    page.click("#result summary")
    assert page.inner_text("#refined").startswith("A realistic photo of Gimjang Tradition")
    assert page.inner_text("#used-keyword") == "김장 (Gimjang)"
    seed = page.inner_text("#used-seed")
    screenshot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] == 900

    first = page.get_attribute("#picture", "src")
    page.click("#again")  # a different seed: a different picture
    page.wait_for_function("(seed) => document.getElementById('used-seed').textContent !== seed", arg=str(seed),
                           timeout=120_000)
    assert page.get_attribute("#picture", "src") != first

    page.click("#another")
    assert page.is_hidden("#result") and page.input_value("#prompt") == ""
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_chip_inserts_keyword_and_english_toggle(page):
    page.click('#chips button[data-slug="yakgwa"]')
    assert page.input_value("#prompt") == "약과"
    page.wait_for_selector('#chips button[data-slug="yakgwa"][aria-pressed="true"]')
    page.click("#lang")
    assert page.get_attribute("html", "lang") == "en"
    assert page.inner_text('label[for="prompt"]') == "Write the scene you want to recall"
    assert page.inner_text("#make") == "Make the picture"
    assert page.inner_text("#route") == "I'll draw it as Yakgwa (약과)."
    assert page.inner_text("#privacy").startswith("What you write and the pictures made from it are not kept")
    page.click("#lang")
    assert page.inner_text('label[for="prompt"]') == "떠올리고 싶은 장면을 적어 주세요"
    assert page.inner_text("#privacy") == "적어 주신 글과 만든 그림은 보여 드린 뒤 어디에도 남기지 않아요."


def test_keyboard_only_reaches_the_box_submits_and_saves(page, tmp_path):
    page.reload()  # the key is remembered for the tab: no key form, focus starts at the top of the page
    page.wait_for_selector("#chips button")
    assert page.is_hidden("#key-form")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "lang"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.type("설날 아침 떡국")
    page.keyboard.press("Tab")  # the picture's shape: one radio group, one stop, square already chosen
    assert page.evaluate("[document.activeElement.name, document.activeElement.value]") == ["shape", "square"]
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "make"
    page.keyboard.press("Enter")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "save"
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    saved = tmp_path / "saved.png"
    download.value.save_as(saved)
    assert download.value.suggested_filename == f"tipsen-{page.text_content('#used-seed')}.png"
    with Image.open(saved) as image:  # the saved picture says how it was made, as AUTOMATIC1111 reads it
        assert image.size == (SIZE, SIZE)
        pairs = a1111_png_info(image.text["parameters"])[2]
    assert pairs["Seed"] == page.text_content("#used-seed") and pairs["Version"].startswith("tipsen ")


def generate_bodies(page) -> list:
    """The bodies the page posts to /generate from now on, as they are sent."""
    sent: list = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/generate") else None)
    return sent


def test_the_shape_choice_draws_sdxls_sizes_scaled_to_the_model(page):
    """Three big choices (SDXL's 1024x1024, 1216x832 and 832x1216, scaled to the model's native size)."""
    shapes = page.evaluate("fetch('/keywords', {headers: {Authorization: 'Bearer ' + "
                           "sessionStorage.getItem('tipsen-key')}}).then((r) => r.json()).then((b) => b.shapes)")
    assert shapes["square"] == [SIZE, SIZE]  # tiny:sdxl's native size
    (w, h) = shapes["landscape"]
    assert shapes["portrait"] == [h, w] and w > h and w % 8 == h % 8 == 0 and w <= SIZE  # generate.max_size
    assert abs(w / h - 1216 / 832) < 0.25  # SDXL's wide bucket, to the nearest 8 px
    sent = generate_bodies(page)
    page.reload()
    page.wait_for_selector("#shapes:not([hidden])")
    assert page.inner_text("#shapes legend") == "그림 모양"
    page.fill("#prompt", "김장하는 날")
    page.check('input[name="shape"][value="landscape"]')
    page.click("#make")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert (sent[-1]["width"], sent[-1]["height"]) == tuple(shapes["landscape"])
    width, height = page.evaluate("[document.getElementById('picture').naturalWidth, "
                                  "document.getElementById('picture').naturalHeight]")
    assert [width, height] == shapes["landscape"]  # drawn wide


def test_an_unsure_route_asks_and_the_chip_confirms(page):
    """차례 is a rite or a turn: the page asks, the senior confirms with the chip, and it is drawn as asked."""
    sent = generate_bodies(page)
    page.fill("#prompt", "차례")
    page.wait_for_function("() => document.getElementById('route').textContent.includes('그릴까요')")
    assert page.inner_text("#route") == "차례를 그릴까요? 그렇다면 아래 '차례'를 눌러 주세요."
    assert page.get_attribute('#chips button[data-slug="charye"]', "aria-pressed") == "false"
    page.click('#chips button[data-slug="charye"]')
    assert page.get_attribute('#chips button[data-slug="charye"]', "aria-pressed") == "true"
    assert page.input_value("#prompt") == "차례"  # confirmed, not typed again
    assert page.inner_text("#route") == "차례 (Chuseok Charye)로 그릴게요."
    page.click("#make")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert sent[-1] == {"prompt": "차례", "keywords": ["charye"], "width": SIZE, "height": SIZE}  # square
    assert page.text_content("#used-keyword") == "차례 (Chuseok Charye)"


def test_on_a_desktop_screen_the_picture_and_its_save_button_are_in_view(page):
    page.set_viewport_size({"width": 1280, "height": 800})
    page.fill("#prompt", "송편 빚던 추석")
    page.click("#make")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    for part in ("#result-title", "#picture", "#save"):
        box = page.locator(part).bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 800, (part, box)
    assert page.locator("#picture").bounding_box()["height"] >= 300  # large, not a thumbnail
    page.click("#lang")  # the alt text follows the language
    assert page.get_attribute("#picture", "alt") == "Picture of Songpyeon: 송편 빚던 추석"


def pressed(page) -> list[str]:
    return page.eval_on_selector_all('#chips button[aria-pressed="true"]', "cs => cs.map((c) => c.dataset.slug)")


def test_chips_add_and_remove_keywords(page):
    """A chip adds its keyword to the routed ones or takes it out; all are drawn together and the choice is sent."""
    sent = generate_bodies(page)
    page.fill("#prompt", "김장하는 날 약과도 먹었어요")
    page.wait_for_function("() => document.getElementById('route').textContent.includes('함께')")
    assert pressed(page) == ["gimjang", "yakgwa"]
    page.click('#chips button[data-slug="yakgwa"]')  # out
    assert pressed(page) == ["gimjang"] and page.inner_text("#route") == "김장 (Gimjang)으로 그릴게요."
    page.click('#chips button[data-slug="songpyeon"]')  # in, after the routed one
    assert page.inner_text("#route") == "김장 (Gimjang)으로 그릴게요. 송편도 함께 그려요."
    page.click('#chips button[data-slug="yakgwa"]')  # a third: more than one picture draws
    assert page.inner_text("#route") == "주제는 2가지까지 고를 수 있어요." and "yakgwa" not in pressed(page)
    page.click('#chips button[data-slug="gimjang"]')
    assert pressed(page) == ["songpyeon"] and page.inner_text("#route") == "송편 (Songpyeon)으로 그릴게요."
    page.click("#make")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert sent[-1] == {"prompt": "김장하는 날 약과도 먹었어요", "keywords": ["songpyeon"], "width": SIZE, "height": SIZE}
    assert page.text_content("#used-keyword") == "송편 (Songpyeon)"


def test_a_second_keyword_is_named_in_the_hint(page):
    page.fill("#prompt", "김장하는 날 약과도 먹었어요")
    page.wait_for_function("() => document.getElementById('route').textContent.includes('함께')")
    assert page.inner_text("#route") == "김장 (Gimjang)으로 그릴게요. 약과도 함께 그려요."


def test_korean_with_no_topic_is_a_korean_sentence(page):
    """Simulated in the browser: the page always asks for the assistant, so the service itself never answers it."""
    page.route("**/generate", lambda route: route.fulfill(status=400, content_type="application/json",
                                                          body='{"error": "prompt: no topic was recognised in x"}'))
    page.fill("#prompt", "바닷가에서 조개를 줍던 여름")
    page.click("#make")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert page.inner_text("#error") == "어떤 주제인지 알아듣지 못했어요. 아래 주제 가운데 하나를 눌러 주세요."


def test_empty_prompt_is_a_korean_sentence(page):
    sent = generate_bodies(page)
    page.fill("#prompt", "   ")
    page.click("#make")
    assert page.inner_text("#error") == "떠올리고 싶은 장면을 먼저 적어 주세요."
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert sent == []


# The server's overload and failures are simulated in the browser (Playwright answers /generate itself): really
# filling the queue or breaking the server takes minutes of CPU; the service's own 429/503/504 are tested in
# test_service.py.
@pytest.mark.parametrize("status,expected", [
    (429, "지금은 그림을 그리는 분이 많아요. 잠시 후에 다시 눌러 주세요."),
    (503, "지금은 그림을 그리는 분이 많아요. 잠시 후에 다시 눌러 주세요."),
    (504, "그림이 너무 오래 걸리고 있어요. 잠시 후에 다시 눌러 주세요."),
    (500, "그림을 만들지 못했어요. 잠시 후에 다시 해 주세요."),
])
def test_busy_timeout_and_failure_are_korean_sentences(page, status, expected):
    page.route("**/generate", lambda route: route.fulfill(
        status=status, content_type="application/json", body='{"error": "busy: the queue is full"}'))
    page.fill("#prompt", "김장하는 날")
    page.click("#make")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    text = page.inner_text("#error")
    assert text == expected
    assert str(status) not in text and "{" not in text and "busy" not in text
    assert page.get_attribute("#error", "role") == "alert" and page.is_hidden("#progress")


def test_accessibility_audit_has_no_serious_violations(page):
    assert audit(page) == []
    page.fill("#prompt", "송편")
    page.click("#make")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    page.click("#result summary")
    assert audit(page) == []
    page.click("#lang")
    assert audit(page) == []
    sizes = page.evaluate("""[...document.querySelectorAll('button, a.button, textarea, summary')]
        .filter(e => e.offsetParent !== null).map(e => [e.id || e.textContent, e.getBoundingClientRect().height,
                                                      parseFloat(getComputedStyle(e).fontSize)])""")
    assert all(h >= 44 for _, h, _ in sizes), sizes  # WCAG 2.2 target size, and our 44 px rule
    assert float(page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")) >= 20
