"""The web page (``/ui``) in a real browser, against the real service over HTTP.

Debian's Chromium (``/usr/bin/chromium``) is driven through its own
``chromedriver`` by Selenium; ``bentoml serve`` runs once for the module (the
``serve`` fixture) with the committed models. Every test ends with a
screenshot of the page and a check of the browser's console: no JavaScript
error, no failed request except the ones a test provokes on purpose.
Screenshots go to ``$UI_SCREENSHOT_DIR`` when it is set, else to a folder under
pytest's temporary directory (its path is printed).

``make test`` installs Chromium first when it can (``make browser``, which
needs root); without it these tests skip and say so.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
MISSING_BROWSER = (
    f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): run `make browser` as root, "
    "or `apt-get install chromium chromium-driver`"
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
MAX_BODY = 1024 * 1024  # small, so that the too-large upload stays cheap
SERVER_ENV = {
    "SERVING_DEVICE": "cpu",
    "SERVING_THREADS": "1",
    "SERVING_MAX_BODY_BYTES": str(MAX_BODY),
}
WAIT_S = 20.0

# A 7 as a person traces it on the 280-pixel pad, in canvas pixels: the top bar
# from left to right, then the stem down to the lower left, then a short crossbar.
SEVEN_STROKES = (
    ((70, 60), (210, 60)),
    ((210, 60), (185, 120), (160, 180), (135, 235)),
    ((130, 150), (200, 150)),
)


@pytest.fixture(scope="module")
def server(model_store, serve):
    return serve("service.service:ServingService", SERVER_ENV)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(MISSING_BROWSER)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("UI_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("ui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {path}")
    return path


@pytest.fixture
def page(browser, server, screenshots, request) -> Iterator[Any]:
    """The page freshly loaded (its first grid of generated digits shown)."""
    browser.get(server.url + "/ui")
    wait_for(lambda: len(browser.find_elements("css selector", "#gen-grid img")) > 0)
    browser.get_log("browser")  # from here on, every console entry belongs to this test
    yield browser
    browser.save_screenshot(str(screenshots / f"{request.node.name}.png"))


def wait_for(condition: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := condition():
                return value
        except Exception:  # stale or missing elements while the page updates
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout:.0f} s: {condition}")
        time.sleep(0.05)


def text_of(driver: Any, selector: str) -> str:
    return driver.find_element("css selector", selector).text


def console_problems(driver: Any, allowed_statuses: tuple[int, ...] = ()) -> list[dict]:
    """Console entries at error level, less failed requests with an expected status."""
    problems = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        statuses = [int(s) for s in re.findall(r"status of (\d{3})", entry["message"])]
        if entry.get("source") == "network" and statuses and statuses[0] in allowed_statuses:
            continue
        problems.append(entry)
    return problems


def save_panel(driver: Any, screenshots: Path, panel: str, name: str) -> None:
    element = driver.find_element("id", panel)
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
    time.sleep(0.4)  # the bars' width transitions (0.2 s) end before the picture is taken
    element.screenshot(str(screenshots / f"{name}.png"))


def probabilities(driver: Any) -> list[float]:
    """The bar chart's values as shown (in %), one per digit."""
    rows = driver.find_elements("css selector", "#probabilities li .value")
    return [float(row.text.rstrip(" %")) for row in rows]


def check_classified(driver: Any, digit: int) -> None:
    wait_for(lambda: text_of(driver, "#digit") == str(digit))
    shown = probabilities(driver)
    assert len(shown) == 10
    assert int(np.argmax(shown)) == digit
    assert sum(shown) == pytest.approx(100, abs=0.6)
    top = driver.find_element("css selector", "#probabilities li.top")
    assert top.text.startswith(str(digit))
    # The bar widths follow the numbers: the top bar is the widest.
    widths = driver.execute_script(
        "return [...document.querySelectorAll('#probabilities .fill')]"
        ".map((bar) => bar.getBoundingClientRect().width)"
    )
    assert int(np.argmax(widths)) == digit
    # The image the model saw: 28×28, shown.
    seen = wait_for(
        lambda: driver.execute_script(
            "const img = document.getElementById('model-input');"
            "return !img.hidden && img.complete && img.naturalWidth ? "
            "[img.naturalWidth, img.naturalHeight] : null"
        )
    )
    assert seen == [28, 28]


def trace(driver: Any, strokes: tuple, steps: int = 8, kind: str = "mouse") -> None:
    """Trace strokes on the pad with pointer events (press, moves, release per stroke),
    from a mouse, a pen or a finger (``kind``)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    pad = driver.find_element("id", "pad")
    scale = pad.size["width"] / 280  # canvas pixels → CSS pixels
    left, top = pad.location["x"], pad.location["y"]
    actions = ActionBuilder(driver, mouse=PointerInput(kind, kind), duration=10)
    for stroke in strokes:
        points = [np.asarray(point, dtype=float) for point in stroke]
        path = [points[0]]
        for start, end in itertools.pairwise(points):
            path += [start + (end - start) * k / steps for k in range(1, steps + 1)]
        x, y = path[0] * scale
        actions.pointer_action.move_to_location(int(left + x), int(top + y))
        actions.pointer_action.pointer_down()
        for point in path[1:]:
            x, y = point * scale
            actions.pointer_action.move_to_location(int(left + x), int(top + y))
        actions.pointer_action.pointer_up()
    actions.perform()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_drawn_seven_is_classified_as_seven(page, screenshots):
    trace(page, SEVEN_STROKES)
    check_classified(page, 7)
    save_panel(page, screenshots, "classify", "panel-classify")
    page.find_element("id", "clear").click()
    wait_for(lambda: text_of(page, "#digit") == "–")
    values = page.find_elements("css selector", "#probabilities .value")
    assert [value.text for value in values] == ["–"] * 10
    assert console_problems(page) == []


@pytest.mark.parametrize("kind", ["touch", "pen"])
def test_a_seven_drawn_with_a_finger_or_a_pen_is_classified_as_seven(page, kind):
    page.execute_script(
        "window.seenPointers = new Set();"
        "byId('pad').addEventListener('pointerdown', (e) => seenPointers.add(e.pointerType));"
    )
    trace(page, SEVEN_STROKES, kind=kind)
    check_classified(page, 7)
    assert page.execute_script("return [...seenPointers]") == [kind]
    assert console_problems(page) == []


def test_an_uploaded_and_a_dropped_mnist_png_are_classified(
    page, screenshots, mnist_test_digits, tmp_path
):
    images, labels = mnist_test_digits
    # Two test digits of different classes: one through the file input, one dropped.
    first = 0
    second = int(np.flatnonzero(labels != labels[first])[0])
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(images[first]))
    page.find_element("id", "upload").send_keys(str(path))
    check_classified(page, int(labels[first]))

    encoded = base64.b64encode(png_bytes(images[second])).decode()
    page.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: data, bubbles: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
        """,
        encoded,
    )
    check_classified(page, int(labels[second]))
    assert console_problems(page) == []


def test_typed_reviews_get_the_right_labels(page, screenshots):
    from selenium.webdriver.common.keys import Keys

    review = page.find_element("id", "review")
    for text, label in (
        ("What a wonderful, moving film. I loved every minute of it!", "positive"),
        ("A dull, tedious mess that goes nowhere.", "negative"),
    ):
        review.send_keys(Keys.CONTROL, "a")
        review.send_keys(Keys.DELETE)
        review.send_keys(text)
        wait_for(lambda label=label: text_of(page, "#sentiment-label") == label)
        score = float(text_of(page, "#sentiment-score"))
        assert (score >= 0.5) == (label == "positive")
        bar = page.find_element("id", "sentiment-bar")
        meter = bar.find_element("xpath", "..")
        # The bar is the score (after its short transition).
        wait_for(lambda b=bar, m=meter, s=score: abs(b.size["width"] - s * m.size["width"]) <= 2)
    # The examples are one click each.
    page.find_element("css selector", ".example").click()
    wait_for(lambda: text_of(page, "#sentiment-label") == "positive")
    save_panel(page, screenshots, "sentiment", "panel-sentiment")
    assert console_problems(page) == []


def test_generated_digits_are_the_digit_asked_for(page, server, screenshots):
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "gen-digit")).select_by_visible_text("3")
    for field, value in (("gen-n", "8"), ("gen-seed", "7")):
        box = page.find_element("id", field)
        box.clear()
        box.send_keys(value)
    page.find_element("id", "gen-run").click()
    wait_for(lambda: "seed 7" in text_of(page, "#gen-note"))
    check_generated(page, server, digit=3, count=8)
    assert "digit=3" in page.current_url and "n=8" in page.current_url
    assert "seed=7" in page.current_url
    save_panel(page, screenshots, "generate", "panel-generate")

    # The download is the grid as a PNG.
    link = page.find_element("id", "gen-download")
    assert link.is_displayed() and link.get_attribute("download").endswith("-seed7.png")
    head = page.execute_async_script(
        "const done = arguments[0];"
        "fetch(document.getElementById('gen-download').href)"
        ".then((r) => r.arrayBuffer()).then((b) => done([...new Uint8Array(b).slice(0, 8)]));"
    )
    assert bytes(head) == b"\x89PNG\r\n\x1a\n"

    # A new seed changes the digits and the URL; the shared URL gives the same result.
    before = [
        img.get_attribute("src") for img in page.find_elements("css selector", "#gen-grid img")
    ]
    page.find_element("id", "gen-new-seed").click()
    # The new seed is random: it may start with a 7, so seed 7 is matched whole.
    wait_for(
        lambda: (
            not re.search(r"seed=7(?!\d)", page.current_url)
            and not re.search(r"seed 7(?!\d)", text_of(page, "#gen-note"))
        )
    )
    wait_for(
        lambda: (
            [i.get_attribute("src") for i in page.find_elements("css selector", "#gen-grid img")]
            != before
        )
    )
    shared = page.current_url
    seed = re.search(r"seed=(\d+)", shared).group(1)
    wait_for(lambda: f"seed {seed}" in text_of(page, "#gen-note"))
    now = [img.get_attribute("src") for img in page.find_elements("css selector", "#gen-grid img")]
    page.get(shared)
    wait_for(lambda: f"seed {seed}" in text_of(page, "#gen-note"))
    assert [
        i.get_attribute("src") for i in page.find_elements("css selector", "#gen-grid img")
    ] == now
    assert console_problems(page) == []


def check_generated(driver: Any, server, *, digit: int, count: int) -> None:
    images = driver.find_elements("css selector", "#gen-grid img")
    assert len(images) == count
    pngs = [base64.b64decode(img.get_attribute("src").split(",", 1)[1]) for img in images]
    assert all(img.get_attribute("data-digit") == str(digit) for img in images)
    status, results = server.post_files("/classify_batch", "images", pngs, "image/png")
    assert status == 200
    assert [result["digit"] for result in results] == [digit] * count


def test_api_errors_are_shown_as_messages(page, screenshots, tmp_path):
    from selenium.webdriver.common.keys import Keys

    # Not an image.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.find_element("id", "upload").send_keys(str(notes))
    error = wait_for(lambda: text_of(page, "#classify-error"))
    assert "not a PNG, JPEG, GIF, BMP or WebP image" in error and "HTTP 400" in error
    assert text_of(page, "#digit") == "–"

    # Too large for the service's body limit: noise does not compress.
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(noise))
    assert big.stat().st_size > MAX_BODY
    page.find_element("id", "upload").send_keys(str(big))
    wait_for(lambda: "HTTP 413" in text_of(page, "#classify-error"))
    assert "larger than the limit" in text_of(page, "#classify-error")
    save_panel(page, screenshots, "classify", "error-classify")

    # The error goes away with the next good answer, on a pad cleared of the rejected image.
    trace(page, SEVEN_STROKES)
    check_classified(page, 7)
    assert not page.find_element("id", "classify-error").is_displayed()

    # Empty text.
    review = page.find_element("id", "review")
    review.send_keys("fine")
    wait_for(lambda: text_of(page, "#sentiment-label") in ("positive", "negative"))
    review.send_keys(Keys.BACKSPACE * 4)
    wait_for(lambda: "HTTP 400" in text_of(page, "#sentiment-error"))
    assert text_of(page, "#sentiment-label") == "–"

    # An n out of range.
    box = page.find_element("id", "gen-n")
    box.clear()
    box.send_keys("0")
    page.find_element("id", "gen-run").click()
    wait_for(lambda: "HTTP 400" in text_of(page, "#generate-error"))
    assert page.find_elements("css selector", "#gen-grid img") == []
    # Only the provoked answers appear in the console, as failed requests.
    assert console_problems(page, allowed_statuses=(400, 413)) == []


def test_keyboard_alone_draws_and_classifies(page):
    from selenium.webdriver.common.keys import Keys

    pad = page.find_element("id", "pad")
    pad.click()  # focus; a click is also a dot, cleared next
    pad.send_keys(Keys.ESCAPE)
    # A 1: pen down at the top centre, four steps down, Enter.
    pad.send_keys(Keys.ARROW_UP * 4, " ", Keys.ARROW_DOWN * 8, " ", Keys.ENTER)
    check_classified(page, 1)
    active = page.switch_to.active_element
    assert active.get_attribute("id") == "pad"
    assert console_problems(page) == []


# --- with API keys on ------------------------------------------------------------------

PAGE_KEY = "page-test-key"


@pytest.fixture(scope="module")
def keyed_server(model_store, serve, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"page infer {PAGE_KEY}\n")
    return serve(
        "service.service:ServingService", {**SERVER_ENV, "SERVING_API_KEYS_FILE": str(keys)}
    )


def test_the_page_asks_for_a_key_once_and_keeps_it_for_the_tab(browser, keyed_server, screenshots):
    """The first request is refused (401): the page asks for a key, sends it from then
    on, and keeps it in the tab's sessionStorage only (a reload does not ask again)."""
    browser.get(keyed_server.url + "/ui")
    alert = wait_for(lambda: browser.switch_to.alert)
    assert "API key" in alert.text
    alert.send_keys(PAGE_KEY)
    alert.accept()
    wait_for(lambda: len(browser.find_elements("css selector", "#gen-grid img")) > 0)
    assert browser.execute_script("return sessionStorage.getItem('serving-api-key')") == PAGE_KEY
    assert browser.execute_script("return localStorage.length") == 0
    browser.refresh()
    wait_for(lambda: len(browser.find_elements("css selector", "#gen-grid img")) > 0)
    text = browser.find_element("id", "review")
    text.send_keys("A gripping, beautifully acted film.")
    wait_for(lambda: "positive" in text_of(browser, "#sentiment-label"))
    browser.save_screenshot(str(screenshots / "keys-required.png"))
    assert console_problems(browser, allowed_statuses=(401,)) == []
