"""The extension's tabs and settings in the real A1111 host, driven by headless Chromium (Playwright).

Needs WEBUI_DIR (the host running with the extension linked in, see ../shared/host-lab), the
`playwright` package (no browser download: it drives the system Chromium, CHROMIUM or
/usr/bin/chromium) and the tiny checkpoint loaded (training runs 40 steps at 64 px on the CPU).

It clicks through Create and Train like a user, watches the loss chart redraw while the run goes on,
then checks the host loaded the trained embedding. Screenshots (1280×900 viewport, palette PNGs) go
to TIEXT_SCREENSHOTS when set (`TIEXT_SCREENSHOTS=docs/screenshots` refreshes the README's images),
else to a temporary folder, so a plain test run leaves the working tree alone.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("playwright")

from playwright.sync_api import Page

from .conftest import stop_job_and_remove_logs
from .ui_screenshots import TAB_ID, _save

MAX_PNG_BYTES = 200 * 1024
V1 = "/textual-inversion-ext/v1"

MAX_STEPS, PREVIEW_EVERY = 40, 20
TRAIN_TIMEOUT_MS = 600_000  # 40 steps take ~20 s on 2 idle cores, minutes when other work shares them
# The host's training options (section "Training") and ours (our own section, category "Training").
HOST_TRAINING_OPTIONS = ("unload_models_when_training", "training_write_csv_every",
                         "training_xattention_optimizations", "save_optimizer_state")
OUR_OPTIONS = ("tiext_save_every", "tiext_preview_every", "tiext_preview_steps", "tiext_log_dir")
OUR_SECTION = "Textual Inversion (extension)"


@pytest.fixture
def cleanup(host_api, host_dir):
    """Embeddings and training jobs the test made: stopped and removed afterwards, also on failure."""
    made = {"names": [], "jobs": []}
    yield made
    for job_id in made["jobs"]:
        log_dir = stop_job_and_remove_logs(host_api, job_id)
        if log_dir:
            with contextlib.suppress(OSError):
                Path(log_dir).parent.rmdir()  # <log root>/<name>/, unique to this test
    for name in made["names"]:
        for path in (host_dir / "embeddings").glob(f"{name}.pt*"):  # .pt and .pt.optim
            path.unlink()
    host_api.call("POST", "/sdapi/v1/refresh-embeddings")


def open_extension(page: Page) -> None:
    page.locator("#tabs > .tab-nav button", has_text="Textual Inversion").click()
    page.locator(f"#{TAB_ID}").wait_for(state="visible")


def sub_tab(page: Page, label: str) -> None:
    page.locator("#tiext_tabs > .tab-nav button", has_text=label).click()


def shoot(locator_or_page, path: Path) -> Path:
    _save(locator_or_page, path)  # the colleague's helper: screenshot + 256-colour palette
    assert path.stat().st_size < MAX_PNG_BYTES, f"{path} is {path.stat().st_size} bytes"
    return path


def textarea(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea").first


def wait_value(page: Page, elem_id: str, pattern: str, timeout: float = 30_000) -> str:
    """Wait until the textbox's value matches `pattern` (a regex); return the value."""
    page.wait_for_function("([id, pattern]) => { const t = document.querySelector(`#${id} textarea`);"
                           " return t && new RegExp(pattern).test(t.value); }",
                           arg=[elem_id, pattern], timeout=timeout, polling=200)
    return textarea(page, elem_id).input_value()


def test_tab_and_sub_tabs_render(page):
    host_tab = page.locator("#tabs > .tab-nav button", has_text="Textual Inversion")
    assert host_tab.count() == 1
    open_extension(page)
    labels = [t.strip() for t in page.locator("#tiext_tabs > .tab-nav button").all_inner_texts()]
    assert labels == ["Create embedding", "Preprocess images", "Train"]
    page.locator("#tiext_create_name textarea").wait_for(state="visible")
    page.locator("#tiext_create_button").wait_for(state="visible")
    sub_tab(page, "Preprocess images")
    page.locator("#tiext_preprocess_button").first.wait_for(state="visible")
    sub_tab(page, "Train")
    wait_value(page, "tiext_train_status", r"\S")  # the status poll runs (it fills the line on page load)
    for elem in ("tiext_train_embedding", "tiext_train_data_dir", "tiext_train_max_steps", "tiext_train_button",
                 "tiext_train_status", "tiext_train_loss_chart"):
        page.locator(f"#{elem}").first.wait_for(state="visible")


def test_settings_training_category_holds_ours_and_the_hosts(page, shots):
    page.locator("#tabs > .tab-nav button", has_text="Settings").click()
    nav = page.locator("#settings > .tab-nav")
    nav.locator(".settings-category", has_text="Training").wait_for()  # added by the host's settings.js
    # The nav lists categories as <span>s, each followed by its sections' buttons.
    entries = nav.evaluate("n => [...n.children].map(e => [e.tagName, e.textContent.trim()])")
    category, in_training = None, []
    for tag, text in entries:
        if tag == "SPAN":
            category = text
        elif tag == "BUTTON" and category == "Training":
            in_training.append(text)
    assert OUR_SECTION in in_training and "Training" in in_training, entries

    nav.locator("button", has_text=OUR_SECTION).click()
    ours = page.locator("#settings_textual_inversion_ext")
    for key in OUR_OPTIONS:
        page.locator(f"#setting_{key}").wait_for(state="visible")
    assert "every N steps" in ours.inner_text()
    ours_png = shots / "_settings-ours.png"
    shoot(ours, ours_png)

    nav.locator("button", has_text=re.compile(r"^\s*Training\s*$")).click()
    host = page.locator("#settings_training")
    for key in HOST_TRAINING_OPTIONS:
        page.locator(f"#setting_{key}").wait_for(state="visible")
    host_png = shots / "_settings-host.png"
    shoot(host, host_png)

    # One picture of the category: its nav entries beside both sections (each rendered by the host).
    nav_png = shots / "_settings-nav.png"
    nav.screenshot(path=str(nav_png))
    top = nav.bounding_box()
    first = nav.locator(".settings-category", has_text="Training").bounding_box()
    last = nav.locator("button", has_text=re.compile(r"^\s*Training\s*$")).bounding_box()
    with Image.open(nav_png) as im:
        im.crop((0, int(first["y"] - top["y"]) - 8, im.width,
                 int(last["y"] + last["height"] - top["y"]) + 8)).save(nav_png)
    shoot_montage([nav_png], [ours_png, host_png], shots / "settings-training.png")


def shoot_montage(left: list[Path], right: list[Path], path: Path) -> None:
    columns = [[Image.open(p).convert("RGB") for p in ps] for ps in (left, right)]
    widths = [max(im.width for im in col) for col in columns]
    height = max(sum(im.height + 12 for im in col) for col in columns)
    out = Image.new("RGB", (sum(widths) + 12, height), "white")
    x = 0
    for col, width in zip(columns, widths):
        y = 0
        for i, im in enumerate(col):
            if i:  # a thin rule between two sections
                ImageDraw.Draw(out).line((x, y - 6, x + width, y - 6), fill=(200, 200, 200))
            out.paste(im, (x, y))
            y += im.height + 12
        x += width + 12
    out.save(path)
    for p in left + right:
        p.unlink()
    shoot_file(path)


def shoot_file(path: Path) -> None:
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    assert path.stat().st_size < MAX_PNG_BYTES, f"{path} is {path.stat().st_size} bytes"


CHART_CANVAS = "#tiext_train_loss_chart canvas"
STEP = re.compile(r"step (\d+)/(\d+)")


def chart_image(page: Page) -> str | None:
    """The loss chart as rendered (gradio 3.41's LinePlot draws with Vega on a canvas), or None if empty."""
    return page.evaluate("sel => { const c = document.querySelector(sel); return c ? c.toDataURL() : null; }",
                         CHART_CANVAS)


def click_train(page: Page, jobs: list[str]) -> tuple[str, str]:
    """Click "Train embedding"; (the start message, the job id), the job noted in `jobs` for clean-up."""
    page.locator("#tiext_train_button").click()
    started = wait_value(page, "tiext_train_message", r"\(job \S+\)|[Ee]rror|[Ff]ailed")
    match = re.search(r"\(job (\S+)\)", started)
    assert match, started
    jobs.append(match.group(1))
    return started, match.group(1)


def status_step(page: Page) -> int:
    match = STEP.search(textarea(page, "tiext_train_status").input_value())
    return int(match.group(1)) if match else 0


def test_create_then_train_in_the_browser(page, host_api, dataset, shots, cleanup):
    name = f"tiext-ui-{int(time.time() * 1000) % 10**8}"
    cleanup["names"].append(name)
    open_extension(page)

    # Create: name and init text, live token counts, click, success message.
    textarea(page, "tiext_create_name").fill(name)
    textarea(page, "tiext_create_init_text").fill("red circle")
    page.locator("#tiext_create_init_text_info", has_text="2 tokens → suggested vectors 2").first.wait_for()
    page.locator("#tiext_create_name_info", has_text="Name: ").first.wait_for()
    textarea(page, "tiext_create_init_text").fill("a red circle")  # the count follows the typing
    page.locator("#tiext_create_init_text_info", has_text="3 tokens").first.wait_for()
    textarea(page, "tiext_create_init_text").fill("red circle")
    page.locator("#tiext_create_init_text_info", has_text="2 tokens").first.wait_for()
    page.locator("#tiext_create_button").click()
    message = wait_value(page, "tiext_create_message", r"\S")
    assert message.startswith("Created ") and f"{name}.pt" in message and "(2 vectors)" in message, message
    shoot(page.locator(f"#{TAB_ID}"), shots / "create-tab.png")

    # Train: pick the embedding (after a refresh), dataset folder, a short run at 64 px.
    sub_tab(page, "Train")
    wait_value(page, "tiext_train_status", r"\S")  # the poll is alive before we rely on it
    page.locator("#tiext_train_refresh").click()
    pick(page, name)
    textarea(page, "tiext_train_data_dir").fill(str(dataset))
    page.locator("#tiext_train_max_steps input").fill(str(MAX_STEPS))
    page.locator("#tiext_train_resolution input[type=number]").fill("64")
    open_accordion(page, "tiext_train_save_every_section")  # "Output"
    page.locator("#tiext_train_preview_every input").fill(str(PREVIEW_EVERY))
    open_accordion(page, "tiext_train_preview_prompt_section")  # "Preview"
    page.locator("#tiext_train_preview_steps input[type=number]").fill("4")
    started, job_id = click_train(page, cleanup["jobs"])
    # the dataset check's summary comes first, then the start
    assert started.startswith("Dataset check: 4 usable images") and f"Started training '{name}'" in started, started

    # The loss chart redraws while the run goes on: two polls, a later step, a different picture.
    page.wait_for_function("([prefix, sel]) => document.querySelector('#tiext_train_status textarea').value"
                           ".startsWith(prefix) && /step [1-9]/.test(document.querySelector("
                           "'#tiext_train_status textarea').value) && document.querySelector(sel)",
                           arg=[f"{name}: running", CHART_CANVAS], timeout=TRAIN_TIMEOUT_MS, polling=200)
    first_step, first_chart = status_step(page), chart_image(page)
    assert first_chart and first_step < MAX_STEPS, "the run ended before the page saw it train"
    page.wait_for_function("([sel, before]) => { const c = document.querySelector(sel);"
                           " return c && c.toDataURL() !== before; }", arg=[CHART_CANVAS, first_chart],
                           timeout=TRAIN_TIMEOUT_MS, polling=250)
    assert status_step(page) > first_step
    assert chart_has_marks(page)
    page.locator("#tiext_tabs").evaluate("e => e.scrollIntoView()")
    shoot(page, shots / "train-tab.png")

    final = wait_value(page, "tiext_train_status", rf"^{re.escape(name)}: (finished|error|interrupted)",
                       timeout=TRAIN_TIMEOUT_MS)
    job = host_api.call("GET", f"{V1}/jobs/{job_id}")
    assert final.startswith(f"{name}: finished · step {MAX_STEPS}/{MAX_STEPS}"), final
    assert job["status"] == "finished" and len(job["previews"]) == MAX_STEPS // PREVIEW_EVERY, job
    page.locator("#tiext_train_previews img").first.wait_for(state="visible")

    # The host loaded it, and the Train dropdown lists it after a refresh.
    loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[name]["vectors"] == 2 and loaded[name]["step"] == MAX_STEPS, loaded.get(name)
    page.locator("#tiext_train_refresh").click()
    pick(page, name)


def pick(page: Page, name: str) -> None:
    """Choose `name` in the Train tab's embedding dropdown (gradio 3.41: an input with a list of options)."""
    box = page.locator("#tiext_train_embedding input")
    box.click()
    page.locator("#tiext_train_embedding ul.options li", has_text=name).first.click()
    page.wait_for_function("([n]) => document.querySelector('#tiext_train_embedding input').value === n", arg=[name])
    assert box.input_value() == name


def open_accordion(page: Page, elem_id: str) -> None:
    page.locator(f"#{elem_id} .label-wrap").first.click()


def chart_has_marks(page: Page) -> bool:
    """The chart's canvas is not blank: enough non-white pixels for axes plus a drawn series."""
    return page.evaluate("""sel => {
        const c = document.querySelector(sel);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let coloured = 0;
        for (let i = 0; i < d.length; i += 4) {
            const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
            if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;  // not grey/white: a series
        }
        return coloured > 50;
    }""", CHART_CANVAS)

