"""The extension's tabs in the real Forge (gradio 4.40), driven by headless Chromium (Playwright): the tab renders,
our settings section shows in Forge's Settings, and Create → Train in the browser runs on the model Forge loaded
(`full-sd15-random`, tests/host/forge) with the loss chart moving; Forge lists the result.

Needs WEBUI_DIR at a Forge lab (tests/host/forge/README.md) and what test_ui_browser.py needs.
`TIEXT_SCREENSHOTS=docs/screenshots` refreshes the README's forge-train.png.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("playwright")

from playwright.sync_api import Page

from .conftest import checkpoint_loaded
from .test_ui_browser import (
    OUR_OPTIONS,
    TRAIN_TIMEOUT_MS,
    V1,
    cleanup,  # noqa: F401 (a fixture used by name)
    click_train,
    open_accordion,
    open_extension,
    pick,
    shoot,
    status_step,
    sub_tab,
    textarea,
    wait_value,
)

HOSTS = ("forge",)
CHECKPOINT = "full-sd15-random.safetensors"  # the SD1.5-shaped one Forge recognises (the tiny ones it does not)
MAX_STEPS, PREVIEW_EVERY = 16, 8  # ~1.5 s a step at 64 px on 2 CPU cores
SD1_LINE = "— SD1: 768 per vector (.pt)"


def test_forge_renders_the_tab_and_our_settings(page, host_api):
    host_tab = page.locator("#tabs > .tab-nav button", has_text="Textual Inversion")
    assert host_tab.count() == 1
    open_extension(page)
    labels = [t.strip() for t in page.locator("#tiext_tabs > .tab-nav button").all_inner_texts()]
    assert labels == ["Create embedding", "Preprocess images", "Train"]
    sub_tab(page, "Train")
    wait_value(page, "tiext_train_status", r"\S")  # gradio 4's polling runs too
    page.locator("#tabs > .tab-nav button", has_text="Settings").click()
    page.locator("#settings > .tab-nav button", has_text="Textual Inversion (extension)").first.click()
    for key in OUR_OPTIONS:
        page.locator(f"#setting_{key}").wait_for(state="visible")


def _chart(page: Page) -> bytes:
    return page.locator("#tiext_train_loss_chart").screenshot()


def test_forge_create_then_train_in_the_browser(page, host_api, dataset, shots, cleanup):  # noqa: F811
    name = f"tiext-forge-ui-{int(time.time() * 1000) % 10**8}"
    cleanup["names"].append(name)
    with checkpoint_loaded(host_api, CHECKPOINT):
        open_extension(page)
        textarea(page, "tiext_create_name").fill(name)
        textarea(page, "tiext_create_init_text").fill("red circle")
        page.locator("#tiext_create_init_text_info", has_text="2 tokens → suggested vectors 2").first.wait_for()
        page.locator("#tiext_create_button").click()
        message = wait_value(page, "tiext_create_message", r"\S", timeout=120_000)  # Forge loads the model here
        assert message.startswith("Created ") and f"{name}.pt (2 vectors)" in message, message
        page.locator("#tiext_create_model_info", has_text=SD1_LINE).first.wait_for()

        sub_tab(page, "Train")
        wait_value(page, "tiext_train_status", r"\S")
        page.locator("#tiext_train_refresh").click()
        pick(page, name)
        textarea(page, "tiext_train_data_dir").fill(str(dataset))
        page.locator("#tiext_train_max_steps input").fill(str(MAX_STEPS))
        page.locator("#tiext_train_resolution input[type=number]").fill("64")
        open_accordion(page, "tiext_train_save_every_section")  # "Output"
        page.locator("#tiext_train_preview_every input").fill(str(PREVIEW_EVERY))
        open_accordion(page, "tiext_train_preview_prompt_section")  # "Preview"
        page.locator("#tiext_train_preview_steps input[type=number]").fill("4")
        page.locator("#tiext_train_comparison_grid input").uncheck()
        started, job_id = click_train(page, cleanup["jobs"])
        assert f"Started training '{name}'" in started, started

        # The loss chart moves: a later step and a different picture of the chart.
        page.wait_for_function("([prefix]) => { const t = document.querySelector('#tiext_train_status textarea');"
                               " return t.value.startsWith(prefix) && /step [1-9]/.test(t.value); }",
                               arg=[f"{name}: running"], timeout=TRAIN_TIMEOUT_MS, polling=200)
        first_step, first_chart = status_step(page), _chart(page)
        assert first_step < MAX_STEPS, "the run ended before the page saw it train"
        deadline = time.time() + TRAIN_TIMEOUT_MS / 1000
        while _chart(page) == first_chart and time.time() < deadline:
            page.wait_for_timeout(500)
        assert _chart(page) != first_chart and status_step(page) > first_step

        final = wait_value(page, "tiext_train_status", rf"^{re.escape(name)}: (finished|error|interrupted)",
                           timeout=TRAIN_TIMEOUT_MS)
        job = host_api.call("GET", f"{V1}/jobs/{job_id}")
        assert final.startswith(f"{name}: finished · step {MAX_STEPS}/{MAX_STEPS}"), (final, job["message"])
        assert len(job["previews"]) == MAX_STEPS // PREVIEW_EVERY and all(Path(p).is_file() for p in job["previews"])
        page.locator("#tiext_train_previews img").first.wait_for(state="visible")
        page.wait_for_timeout(2000)  # the last poll's chart is drawn
        page.locator("#tiext_tabs").evaluate("e => e.scrollIntoView()")
        shoot(page, shots / "forge-train.png")

        # Listed by Forge (its API reads its list again on refresh) and in our dropdown.
        host_api.call("POST", "/sdapi/v1/refresh-embeddings")
        loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
        assert loaded[name]["vectors"] == 2 and loaded[name]["shape"] == 768, loaded.get(name)
        page.locator("#tiext_train_refresh").click()
        pick(page, name)
