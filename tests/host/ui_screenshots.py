"""Screenshots of the extension's tab as the real host renders it (not a test; run by hand).

    python tests/host/ui_screenshots.py [--url http://127.0.0.1:7860] [--out docs/screenshots]

Needs Playwright (`pip install playwright` in any venv) and a Chromium binary (Debian: `apt-get
install chromium`; found on PATH or given with --chromium). Read-only: it types into the Create tab's
text boxes to show the live token count but never clicks Create or Train.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

TAB_ID = "tab_textual_inversion_ext"  # the host wraps on_ui_tabs' Blocks in a tab with id tab_<id>


def shoot(url: str, out: Path, chromium: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # Not "networkidle": gradio 4 (Forge) keeps a heartbeat request open, so the network never idles.
        page.goto(url, wait_until="load", timeout=120_000)
        page.wait_for_selector("gradio-app", state="attached", timeout=120_000)
        page.locator("#tabs > .tab-nav button").first.wait_for(state="visible", timeout=120_000)
        page.locator("#tabs > .tab-nav button", has_text="Textual Inversion").click()
        tab = page.locator(f"#{TAB_ID}")
        tab.wait_for(state="visible")

        page.locator("#tiext_create_name textarea").fill("my-bmw")
        page.locator("#tiext_create_init_text textarea").fill("a blue vintage bmw")
        # gradio 3.41 puts the elem_id on both the block and its inner HTML: take the first match
        page.locator("#tiext_create_init_text_info", has_text="4 tokens").first.wait_for()
        page.locator("#tiext_create_name_info", has_text="Name: 3 tokens").first.wait_for()
        saved.append(_save(tab, out / "create-tab.png"))

        page.locator(f"#{TAB_ID} .tab-nav button", has_text="Preprocess images").click()
        page.locator("#tiext_preprocess_button").first.wait_for(state="visible")
        saved.append(_save(tab, out / "preprocess-tab.png"))

        page.locator(f"#{TAB_ID} .tab-nav button", has_text="Train").click()
        page.locator("#tiext_train_button").first.wait_for(state="visible")
        page.wait_for_timeout(3000)  # two polls: status line and (if a job has run) the loss chart
        saved.append(_save(tab, out / "train-tab.png"))
        browser.close()
    return saved


def _save(locator, path: Path) -> Path:
    locator.screenshot(path=str(path))
    try:  # keep the PNGs small: a 256-colour palette is plenty for a UI
        from PIL import Image

        Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    except ImportError:
        pass
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        parser.error("no Chromium found; install it or pass --chromium")
    for path in shoot(args.url, args.out, args.chromium):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
