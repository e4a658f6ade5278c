"""SDXL in the real A1111 host, through the browser (headless Chromium, Playwright): on the tiny SDXL checkpoint
(host-lab `SDXL=1 ./build.sh`), Create shows the model line and both encoders' token counts and writes a
clip_l + clip_g `.safetensors`; Train runs it with the loss chart moving; the host lists the result as a 2048-wide
embedding. Then the host switches to the SD1 checkpoint through its API and the tab's model line follows after a
refresh, no restart.

Needs what test_ui_browser.py needs, plus tiny-sdxl.safetensors in the host (skips without it).
`TIEXT_SCREENSHOTS=docs/screenshots` refreshes the README's train-sdxl.png.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("playwright")

from playwright.sync_api import Page

from .conftest import checkpoint_loaded, open_page, stop_job_and_remove_logs
from .test_ui_browser import (
    TRAIN_TIMEOUT_MS,
    chart_has_marks,
    chart_image,
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
from .test_ui_train_browser import ChartFeed

V1 = "/textual-inversion-ext/v1"
SD1_CHECKPOINT = "tiny-sd1.safetensors"
MAX_STEPS, PREVIEW_EVERY = 20, 10  # tiny-sdxl: ~1 s a step on 2 CPU cores
CHART_CANVAS = "#tiext_train_loss_chart canvas"
SDXL_LINE = "— SDXL: each vector is clip_l 768 + clip_g 1280 (saved as .safetensors)"
SD1_LINE = "— SD1: 768 per vector (.pt)"


@pytest.fixture
def made(host_api, host_dir):
    """The test's embedding and jobs: stopped and removed afterwards, also on failure."""
    made = {"name": f"tiext-uixl-{int(time.time() * 1000) % 10**8}", "jobs": []}
    yield made
    for job_id in made["jobs"]:
        stop_job_and_remove_logs(host_api, job_id)
    for path in (host_dir / "embeddings").glob(f"{made['name']}*.safetensors*"):  # .safetensors(.optim, .json)
        path.unlink()
    shutil.rmtree(host_dir / "textual_inversion_ext" / made["name"], ignore_errors=True)
    host_api.call("POST", "/sdapi/v1/refresh-embeddings")


@pytest.fixture
def fed_page(browser, sdxl_host):
    """The host's page, loaded once the SDXL checkpoint is in, with a ChartFeed listening from before the load."""
    feeds: list[ChartFeed] = []
    with open_page(browser, before_load=lambda page: feeds.append(ChartFeed(page))) as page:
        yield page, feeds[0]


def model_line(page: Page, prefix: str, pattern: str) -> str:
    """Wait until the tab's model line (tiext_create_/tiext_train_model_info) contains `pattern`; its text."""
    line = page.locator(f"#{prefix}model_info", has_text=pattern).first
    line.wait_for()
    return line.inner_text()


def test_sdxl_create_train_listed_then_sd1_without_restart(fed_page, sdxl_host, host_dir, dataset, shots, made):
    page, feed = fed_page
    api, name = sdxl_host, made["name"]
    open_extension(page)

    # Create: the model line names SDXL and both widths; the init text is counted per encoder.
    assert SDXL_LINE in model_line(page, "tiext_create_", "SDXL")
    textarea(page, "tiext_create_name").fill(name)
    textarea(page, "tiext_create_init_text").fill("red circle")
    note = "clip_l: 2 tokens · clip_g: 2 tokens → suggested vectors 2"
    page.locator("#tiext_create_init_text_info", has_text=note).first.wait_for()
    page.locator("#tiext_create_button").click()
    message = wait_value(page, "tiext_create_message", r"\S")
    assert message.startswith("Created ") and f"{name}.safetensors (2 vectors)" in message, message

    # Train: the same model line, a short run at 64 px, previews halfway and at the end.
    sub_tab(page, "Train")
    wait_value(page, "tiext_train_status", r"\S")
    page.locator("#tiext_train_refresh").click()
    pick(page, name)
    assert SDXL_LINE in model_line(page, "tiext_train_", "SDXL")
    textarea(page, "tiext_train_data_dir").fill(str(dataset))
    page.locator("#tiext_train_max_steps input").fill(str(MAX_STEPS))
    page.locator("#tiext_train_resolution input[type=number]").fill("64")
    open_accordion(page, "tiext_train_save_every_section")  # "Output"
    page.locator("#tiext_train_preview_every input").fill(str(PREVIEW_EVERY))
    open_accordion(page, "tiext_train_preview_prompt_section")  # "Preview"
    page.locator("#tiext_train_preview_steps input[type=number]").fill("4")
    page.locator("#tiext_train_comparison_grid input").uncheck()  # the grid re-renders every snapshot: not here
    started, job_id = click_train(page, made["jobs"])
    assert f"Started training '{name}'" in started, started

    # The loss chart moves: a later step, a different picture, more loss points in the data the page received.
    page.wait_for_function("([prefix, sel]) => { const t = document.querySelector('#tiext_train_status textarea');"
                           " return t.value.startsWith(prefix) && /step [1-9]/.test(t.value)"
                           " && document.querySelector(sel); }",
                           arg=[f"{name}: running", CHART_CANVAS], timeout=TRAIN_TIMEOUT_MS, polling=200)
    first_step, first_chart, first_points = status_step(page), chart_image(page), feed.points("loss")
    assert first_chart and first_points and first_step < MAX_STEPS, "the run ended before the page saw it train"
    page.wait_for_function("([sel, before]) => { const c = document.querySelector(sel);"
                           " return c && c.toDataURL() !== before; }", arg=[CHART_CANVAS, first_chart],
                           timeout=TRAIN_TIMEOUT_MS, polling=250)
    assert status_step(page) > first_step and feed.points("loss") > first_points, feed.series
    assert chart_has_marks(page)

    final = wait_value(page, "tiext_train_status", rf"^{re.escape(name)}: (finished|error|interrupted)",
                       timeout=TRAIN_TIMEOUT_MS)
    job = api.call("GET", f"{V1}/jobs/{job_id}")
    assert final.startswith(f"{name}: finished · step {MAX_STEPS}/{MAX_STEPS}"), (final, job["message"])
    assert len(job["previews"]) == MAX_STEPS // PREVIEW_EVERY and all(Path(p).is_file() for p in job["previews"])
    page.locator("#tiext_train_previews img").first.wait_for(state="visible")
    page.wait_for_timeout(2000)  # the last poll's chart is drawn
    page.locator("#tiext_tabs").evaluate("e => e.scrollIntoView()")
    shoot(page, shots / "train-sdxl.png")

    # Listed: by the host (2048 = 768 + 1280 wide) and in our Train dropdown.
    loaded = api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[name]["shape"] == 2048 and loaded[name]["vectors"] == 2, loaded.get(name)
    # The host reads no step from a .safetensors file (only tensors); ours keeps it in the file's metadata.
    ours = {e["name"]: e for e in api.call("GET", "/textual-inversion-ext/v1/embeddings")["embeddings"]}
    assert ours[name]["step"] == MAX_STEPS, ours.get(name)
    page.locator("#tiext_train_refresh").click()
    pick(page, name)

    # The host switches to SD1 through its API: the lines follow on Refresh and on showing the tab, no restart.
    with checkpoint_loaded(api, SD1_CHECKPOINT):
        page.locator("#tiext_train_refresh").click()
        assert SD1_LINE in model_line(page, "tiext_train_", "SD1")
        sub_tab(page, "Create embedding")
        assert SD1_LINE in model_line(page, "tiext_create_", "SD1")
        page.locator("#tiext_create_init_text_info", has_text="2 tokens → suggested vectors 2").first.wait_for()
        assert "clip_g" not in page.locator("#tiext_create_init_text_info").first.inner_text()
