"""Preprocess → caption editor → Train in the real A1111 host, through the browser only (Playwright).

Needs what `test_ui_browser.py` needs (WEBUI_DIR, the host running with the extension, the tiny
checkpoint, `playwright` and the system Chromium). A source folder made with PIL (three 96×64 and
three 64×96 images with captions, plus a corrupt file) is preprocessed to 64×64 with flipped copies
and BLIP captions requested: the offline host has no BLIP weights, so the run must say so clearly and
still write every output to `<source>-Processed` (the destination left empty). The caption editor
then loads that folder (thumbnails), edits one caption, replaces a word in all of them and undoes it;
the files on disk must follow each step. Finally Train, whose dataset folder the preprocess filled
in, trains a fresh embedding for 10 steps and the host must list it at step 10.

Screenshots (the Preprocess tab after the run, the caption editor with its thumbnails) go to
TIEXT_SCREENSHOTS when set (`TIEXT_SCREENSHOTS=docs/screenshots` refreshes the README's images), else
to a temporary folder. Everything the test makes is removed afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("playwright")

from playwright.sync_api import Page

from .conftest import stop_job_and_remove_logs
from .test_ui_browser import (
    V1,
    open_accordion,
    open_extension,
    pick,
    shoot,
    sub_tab,
    textarea,
    wait_value,
)
from .ui_screenshots import TAB_ID

MAX_STEPS = 10
TRAIN_TIMEOUT_MS = 600_000  # 10 steps at 64 px take seconds on idle cores, much longer on busy ones
PREPROCESS_TIMEOUT_MS = 180_000
COLOURS = ["red", "green", "blue"]
SHAPES = {"wide": (96, 64), "tall": (64, 96)}  # both crop to 64×64
FINISHED = r"^Preprocess '[^']*': (finished|error|interrupted)"


@pytest.fixture
def workdir():
    """A temporary folder for the source and its '<source>-Processed' sibling, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tiext-prep-ui-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def source(workdir) -> Path:
    folder = workdir / "photos"
    folder.mkdir()
    for shape, size in SHAPES.items():
        for i, colour in enumerate(COLOURS):
            img = Image.new("RGB", size, (40 * i, 70, 110))
            ImageDraw.Draw(img).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
            img.save(folder / f"{shape} {i}.png")
            (folder / f"{shape} {i}.txt").write_text(f"a {colour} circle on a {shape} card")
    (folder / "broken.png").write_bytes(b"\x89PNG not really an image")
    return folder


@pytest.fixture
def cleanup(host_api, host_dir):
    """Jobs, embeddings, training logs and caption thumbnails the test made: removed afterwards."""
    made = {"names": [], "jobs": [], "folders": []}
    yield made
    for job_id in made["jobs"]:
        stop_job_and_remove_logs(host_api, job_id)
    for folder in made["folders"]:  # the caption editor's thumbnails live in a cache outside the folder
        if Path(folder).is_dir():
            query = urllib.parse.urlencode({"folder": folder, "per_page": 1000})
            with contextlib.suppress(Exception):
                for item in host_api.call("GET", f"{V1}/captions?{query}")["items"]:
                    if item["thumbnail"]:
                        Path(item["thumbnail"]).unlink(missing_ok=True)
    for name in made["names"]:
        for path in (host_dir / "embeddings").glob(f"{name}.pt*"):  # .pt and .pt.optim
            path.unlink()
        shutil.rmtree(host_dir / "textual_inversion_ext" / name, ignore_errors=True)
    host_api.call("POST", "/sdapi/v1/refresh-embeddings")


def wait_new_value(page: Page, elem_id: str, before: str, timeout: float = 30_000) -> str:
    """Wait until the textbox holds a non-empty value other than `before`; return it."""
    page.wait_for_function("([id, before]) => { const t = document.querySelector(`#${id} textarea`);"
                           " return t && t.value.trim() && t.value !== before; }",
                           arg=[elem_id, before], timeout=timeout, polling=200)
    return textarea(page, elem_id).input_value()


def click_and_wait(page: Page, button: str, elem_id: str) -> str:
    """Click `button` and return the next message shown in `elem_id` (messages repeat, so clear it first)."""
    page.evaluate("id => { const t = document.querySelector(`#${id} textarea`); t.value = ''; }", elem_id)
    page.locator(f"#{button}").click()
    return wait_new_value(page, elem_id, "")


def thumbnails(page: Page):
    return page.locator("#tiext_captions_gallery button.thumbnail-item")


def captions_of(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted(folder.glob("*.txt"))}


def test_preprocess_captions_then_train_in_the_browser(page, host_api, source, shots, cleanup):
    dest = Path(f"{source}-Processed")
    cleanup["folders"].append(str(dest))
    name = f"tiext-prepui-{int(time.time() * 1000) % 10**8}"
    cleanup["names"].append(name)
    open_extension(page)
    wait_value(page, "tiext_train_status", r"\S")  # the page's load events (model size, poll) have run

    # Preprocess: source only (destination empty), 64×64, flipped copies, BLIP captions.
    sub_tab(page, "Preprocess images")
    textarea(page, "tiext_preprocess_source").fill(str(source))
    assert textarea(page, "tiext_preprocess_destination").input_value() == ""
    for side in ("width", "height"):
        page.locator(f"#tiext_preprocess_{side} input[type=number]").fill("64")
    page.locator("#tiext_preprocess_flip input[type=checkbox]").check()
    open_accordion(page, "tiext_preprocess_caption_action_section")  # "Captions"
    textarea(page, "tiext_preprocess_captioners").fill("blip")
    message = click_and_wait(page, "tiext_preprocess_button", "tiext_preprocess_message")
    match = re.search(r"\(job (\S+)\)", message)
    assert message.startswith("Started preprocessing 'photos'") and match, message
    cleanup["jobs"].append(match.group(1))
    # the destination it chose goes to the caption editor and to Train
    assert textarea(page, "tiext_captions_folder").input_value() == str(dest)

    summary = wait_value(page, "tiext_preprocess_status", FINISHED, timeout=PREPROCESS_TIMEOUT_MS)
    assert summary.startswith("Preprocess 'photos': finished · 7/7 file(s)"), summary
    assert "BLIP weights are not available offline: put model_base_caption_capfilt_large.pth in" in summary
    assert "models/BLIP" in summary and "processed without BLIP captions" in summary, summary
    assert re.search(r"Skipped or failed:\n\s+broken\.png", summary), summary
    stems = [f"{shape} {i}" for shape in SHAPES for i in range(len(COLOURS))]
    outputs = sorted(p.name for p in dest.glob("*.png"))
    assert outputs == sorted([f"{s}.png" for s in stems] + [f"{s}-flip.png" for s in stems]), outputs
    for png in dest.glob("*.png"):
        with Image.open(png) as im:
            assert im.size == (64, 64), (png.name, im.size)
        assert png.with_suffix(".txt").is_file(), f"no caption beside {png.name}"
    assert (dest / "tall 1.txt").read_text().strip() == "a green circle on a tall card"  # copied, BLIP absent
    page.locator("#tiext_tabs").evaluate("e => e.scrollIntoView()")
    shoot(page.locator(f"#{TAB_ID}"), shots / "preprocess-tab.png")

    # Caption editor on the destination: Load → thumbnails; click one; edit and save its caption.
    page.locator("#tiext_captions_load").click()
    info = wait_value(page, "tiext_captions_info", r"image\(s\)")
    assert info.startswith("Page 1 of 1 · 12 image(s)"), info
    thumbnails(page).nth(11).wait_for(state="visible")
    assert thumbnails(page).count() == 12
    gallery = page.locator("#tiext_captions_gallery").bounding_box()
    rights = [thumbnails(page).nth(i).bounding_box() for i in range(12)]
    assert max(b["x"] + b["width"] for b in rights) <= gallery["x"] + gallery["width"], "thumbnails cut off"
    thumbnails(page).nth(1).click()
    image = Path(wait_value(page, "tiext_captions_image", r"\S"))
    assert image.parent == dest and image.suffix == ".png", image
    caption_file = image.with_suffix(".txt")
    before = caption_file.read_text().strip()
    assert textarea(page, "tiext_captions_text").input_value() == before
    edited = "a hand-edited circle caption"
    textarea(page, "tiext_captions_text").fill(edited)
    saved = click_and_wait(page, "tiext_captions_save", "tiext_captions_message")
    assert saved.startswith(f"edit {image.name}: 1 caption(s) changed"), saved
    assert caption_file.read_text().strip() == edited

    # Bulk find/replace over the folder, then undo it: the files follow, the single edit stays.
    on_disk = captions_of(dest)
    assert sum("circle" in text for text in on_disk.values()) == 12, on_disk
    textarea(page, "tiext_captions_find").fill("circle")
    textarea(page, "tiext_captions_replace").fill("disc")
    replaced = click_and_wait(page, "tiext_captions_replace_button", "tiext_captions_message")
    assert re.match(r"\S.*: 12 caption\(s\) changed", replaced), replaced
    after_replace = captions_of(dest)
    assert after_replace == {n: t.replace("circle", "disc") for n, t in on_disk.items()}, after_replace
    assert caption_file.read_text().strip() == "a hand-edited disc caption"
    wait_value(page, "tiext_captions_text", r"^a hand-edited disc caption$")  # the box follows the file
    # the gallery's labels show the changed captions
    page.locator("#tiext_captions_gallery", has_text="disc").first.wait_for()
    undone = click_and_wait(page, "tiext_captions_undo", "tiext_captions_message")
    assert undone.startswith("Undid ") and "12 caption(s) restored" in undone, undone
    assert captions_of(dest) == on_disk
    assert caption_file.read_text().strip() == edited
    wait_value(page, "tiext_captions_text", rf"^{edited}$")
    shoot_caption_editor(page, shots / "caption-editor.png")

    # Create an embedding, then Train on the destination (pre-filled by the preprocess run).
    sub_tab(page, "Create embedding")
    textarea(page, "tiext_create_name").fill(name)
    textarea(page, "tiext_create_init_text").fill("red circle")
    created = click_and_wait(page, "tiext_create_button", "tiext_create_message")
    assert created.startswith("Created ") and f"{name}.pt" in created, created
    sub_tab(page, "Train")
    assert textarea(page, "tiext_train_data_dir").input_value() == str(dest)
    page.locator("#tiext_train_refresh").click()
    pick(page, name)
    page.locator("#tiext_train_max_steps input").fill(str(MAX_STEPS))
    page.locator("#tiext_train_resolution input[type=number]").fill("64")
    started = click_and_wait(page, "tiext_train_button", "tiext_train_message")
    match = re.search(r"\(job (\S+)\)", started)
    assert started.startswith("Dataset check: 12 usable images") and f"Started training '{name}'" in started, started
    assert match, started
    cleanup["jobs"].append(match.group(1))
    final = wait_value(page, "tiext_train_status", rf"^{re.escape(name)}: (finished|error|interrupted)",
                       timeout=TRAIN_TIMEOUT_MS)
    assert final.startswith(f"{name}: finished · step {MAX_STEPS}/{MAX_STEPS}"), final
    loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert name in loaded and loaded[name]["step"] == MAX_STEPS, loaded.get(name)


def shoot_caption_editor(page: Page, path: Path) -> None:
    """The caption editor's column (title to result box), thumbnails included."""
    column = page.locator("#tiext_preprocess_tab .gradio-column", has=page.locator("#tiext_captions_gallery")).last
    column.evaluate("e => e.scrollIntoView()")
    page.mouse.move(0, 0)  # no hover highlight on a thumbnail
    shoot(column, path)
