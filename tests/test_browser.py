"""A real browser on a real JupyterLab: %load_ext, a %%qwen_generate cell and the %qwen_ui panel.

JupyterLab runs on loopback; headless Chromium (Debian's package) is driven by Playwright. A screenshot is
saved to ``test-artifacts/jupyterlab.png``. Skipped when Chromium, JupyterLab or Playwright is missing,
unless ``QWENNB_REQUIRE_BROWSER=1`` (CI sets it), in which case it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _missing() -> str | None:
    if CHROMIUM is None:
        return "Debian's chromium is not installed"
    for mod in ("playwright", "jupyterlab", "ipykernel"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed"
    return None


missing = _missing()
if missing and os.environ.get("QWENNB_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"the browser test is required here but {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext qwennb"),
        nbformat.v4.new_code_cell(
            "%%qwen_generate --steps 3 --size 128x128 --seed 1 --no-save\na red fox in the snow"
        ),
        nbformat.v4.new_code_cell("%qwen_ui"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.write_text(nbformat.writes(nb))
    from PIL import Image

    Image.new("RGB", (96, 64), (30, 90, 200)).save(path.parent / "input.png")  # for the panel's upload


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    _notebook(root / "qwen.ipynb")
    port, token = _free_port(), "qwennb-test"
    env = dict(os.environ, QWENNB_MODEL="tiny", QWENNB_AUTOLOAD="1", JUPYTER_PLATFORM_DIRS="1")
    env.pop("HF_HUB_OFFLINE", None)
    env["HF_HUB_OFFLINE"] = "1"
    log = open(root / "lab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.open_browser=False",
            "--allow-root",
            "--LabApp.news_url=",
            "--LabServerApp.extra_labextensions_path=[]",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                json.load(r)
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("JupyterLab did not start: " + (root / "lab.log").read_text()[-2000:])
    if proc.poll() is not None:
        pytest.fail("JupyterLab exited: " + (root / "lab.log").read_text()[-2000:])
    yield base, token, root
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_notebook_in_jupyterlab_shows_image_timing_plot_and_panel(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    base, token, root = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        try:
            page.goto(f"{base}/lab/tree/qwen.ipynb?token={token}", timeout=60_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
            # The kernel is ready when the status bar reads "... | Idle".
            page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
            started = "() => [...document.querySelectorAll('.jp-InputPrompt')].some(e => /\\[[0-9*]+\\]/.test(e.textContent))"
            for attempt in range(3):  # a click that lands while the page is still settling can be lost
                page.locator(".jp-Notebook").first.click()
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_text("Run All Cells", exact=True).click()
                try:
                    page.wait_for_function(started, timeout=30_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 2:
                        raise
            # %load_ext banner, then the generated image with its timing plot.
            expect(page.get_by_text("loaded tiny").first).to_be_visible(timeout=90_000)
            expect(page.locator(".qwennb-result img").first).to_be_visible(timeout=90_000)
            expect(page.locator("img.qwennb-timing").first).to_be_visible(timeout=30_000)
            # The widget panel: type a prompt, press Generate, get an image and a timing plot.
            panel = page.locator(".qwennb-panel").first
            expect(panel).to_be_visible(timeout=60_000)
            # Nothing generated yet: no image is shown (an empty one is a broken-image icon).
            expect(panel.locator(".qwennb-image")).to_be_attached(timeout=30_000)
            expect(panel.locator("img:visible")).to_have_count(0)
            panel.locator("textarea").first.fill("a lighthouse at dusk")
            panel.get_by_role("button", name="Generate").click()
            expect(panel.get_by_text("seed").last).to_be_visible(timeout=60_000)
            imgs = panel.locator("img.qwennb-image, img.qwennb-timing-plot")
            expect(imgs).to_have_count(2, timeout=60_000)
            page.wait_for_function(
                "els => els.every(e => e.naturalWidth > 0)", arg=imgs.element_handles(), timeout=60_000
            )
            expect(panel.get_by_role("button", name="Generate")).to_be_enabled(timeout=60_000)
            # The status line is whole: not cut at the panel's edge, not squeezing the progress bar.
            status = panel.locator(".qwennb-status").first
            m = status.evaluate(
                "e => { const c = e.querySelector('.widget-html-content') || e;"
                " return {scroll: c.scrollWidth, client: c.clientWidth, right: e.getBoundingClientRect().right,"
                " panel: e.closest('.qwennb-panel').getBoundingClientRect().right,"
                " text: c.getBoundingClientRect().width}; }"
            )
            assert m["scroll"] <= m["client"] + 1 and m["right"] <= m["panel"] + 4 and m["text"] > 300, m
            bar = panel.locator(".qwennb-progress-bar").first
            assert bar.bounding_box()["width"] >= 200
            # A new run hides the last run's plot while it goes (watched every 10 ms from the page).
            page.evaluate(
                "() => { window.__plotHidden = false; window.__watch = setInterval(() => {"
                " const e = document.querySelector('.qwennb-panel .qwennb-timing-plot');"
                " if (e && getComputedStyle(e).display === 'none') window.__plotHidden = true; }, 10); }"
            )
            panel.get_by_role("button", name="Generate").click()
            page.wait_for_function("() => window.__plotHidden", timeout=60_000)
            expect(panel.get_by_role("button", name="Generate")).to_be_enabled(timeout=60_000)
            expect(panel.locator("img.qwennb-timing-plot")).to_be_visible(timeout=60_000)
            # The image input: the last result, then an uploaded file; a stroke painted on the canvas reaches
            # Python as a mask of the input's size, and Generate inpaints with it.
            panel.get_by_role("button", name="Use last result").click()
            expect(panel.get_by_text("(last result, seed")).to_be_visible(timeout=30_000)
            expect(panel.locator("img.qwennb-input-thumb")).to_be_visible(timeout=30_000)
            with page.expect_file_chooser() as chooser:  # the upload button opens the file dialog
                panel.locator(".widget-upload").first.click()
            chooser.value.set_files(str(root / "input.png"))
            expect(panel.get_by_text("input image 96x64 (upload input.png)")).to_be_visible(timeout=30_000)
            canvas = panel.locator("canvas.qwennb-mask-canvas").first
            expect(canvas).to_be_visible(timeout=30_000)
            page.wait_for_function("c => c.width === 96 && c.height === 64", arg=canvas.element_handle())
            box = canvas.bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] * 0.2, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=8)
            page.mouse.up()
            info = panel.locator(".qwennb-mask-info").first
            expect(info).to_have_text(re.compile(r"^mask 96x64, [1-9][0-9]?% painted"), timeout=30_000)
            painted = int(re.search(r"(\d+)% painted", info.inner_text()).group(1))
            # Erase the stroke's left half: less is painted, but not nothing.
            panel.get_by_role("button", name="erase").click()  # jslinked: the canvas erases from now on
            page.mouse.move(box["x"] + box["width"] * 0.1, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=8)
            page.mouse.up()
            page.wait_for_function(
                "([e, n]) => { const m = /(\\d+)% painted/.exec(e.textContent);"
                " return m && +m[1] > 0 && +m[1] < n; }",
                arg=[info.element_handle(), painted],
                timeout=30_000,
            )
            panel.get_by_role("button", name="Generate").click()
            expect(panel.locator(".qwennb-status").first).to_contain_text(
                re.compile(r"^inpaint at strength 0\.6 · seed \d+ .* 96×64"), timeout=60_000
            )
            expect(panel.get_by_role("button", name="Generate")).to_be_enabled(timeout=60_000)
        finally:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"), full_page=True)
            browser.close()
    assert (ARTIFACTS / "jupyterlab.png").stat().st_size > 10_000
