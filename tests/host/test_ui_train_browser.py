"""The Train tab's live run view in the real A1111 host (headless Chromium through Playwright).

A short run started from the Train tab, with validation and previews every few steps, and a preview
sampler chosen in the tab: the loss chart (its validation series), the learning-rate chart and the
vector-norm chart redraw while the run goes on; the preview gallery captions its images "step N ·
prompt k"; the result panel names the best step, lists the snapshots, shows the comparison grid and
promotes the best step; and the previews really come from the host's sampler.

The charts are checked twice over: the canvases' pixels change between two polls, and the chart data
the page receives (gradio 3.41 sends each LinePlot as a Vega-Lite spec over the queue's websocket)
holds more validation, learning-rate and norm points the second time.

Needs what test_ui_browser.py needs (WEBUI_DIR, the host running with the extension linked in and the
tiny checkpoint). `TIEXT_SCREENSHOTS=docs/screenshots` refreshes the README's train-live.png.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

pytest.importorskip("playwright")

from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from .conftest import open_page, stop_job_and_remove_logs
from .test_ui_browser import (
    TRAIN_TIMEOUT_MS,
    click_train,
    open_accordion,
    open_extension,
    pick,
    shoot,
    shoot_file,
    status_step,
    sub_tab,
    textarea,
    wait_value,
)

V1 = "/textual-inversion-ext/v1"
MAX_STEPS, VAL_EVERY, PREVIEW_EVERY = 60, 5, 20
LEARN_RATE = "0.01:20, 0.005"
NORM_WARN = 2.0  # the tiny model's vectors pass 2× the vocabulary median within ~20 steps at this LR
SAMPLER, OTHER_SAMPLER = "DDIM", "Euler a"  # the previews' sampler, and one they must not match
PROMPTS = ["a photo of {name}", "{name} on a table"]
CHARTS = {"loss": "tiext_train_loss_chart", "lr": "tiext_train_lr_chart", "norm": "tiext_train_norm_chart"}


class ChartFeed:
    """The LinePlot specs the page receives over the queue's websockets: points per series, latest first."""

    def __init__(self, page: Page) -> None:
        self.series: dict[str, int] = {}  # series name -> points in the newest spec that holds it
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload: str | bytes) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(payload)
            for value in (message.get("output") or {}).get("data") or []:
                if isinstance(value, dict) and value.get("type") == "altair" and value.get("plot"):
                    spec = json.loads(value["plot"])
                    counts: dict[str, int] = {}
                    for rows in (spec.get("datasets") or {}).values():
                        for row in rows:
                            counts[row.get("series")] = counts.get(row.get("series"), 0) + 1
                    self.series.update(counts)

    def points(self, series: str) -> int:
        return self.series.get(series, 0)


def canvases(page: Page) -> dict[str, str | None]:
    return {key: page.evaluate("id => { const c = document.querySelector(`#${id} canvas`);"
                               " return c ? c.toDataURL() : null; }", elem)
            for key, elem in CHARTS.items()}


@pytest.fixture
def trained(host_api, host_dir):
    """The test's embedding and job: stopped and removed afterwards, also on failure."""
    made = {"name": f"tiext-live-{int(time.time() * 1000) % 10**8}", "jobs": []}
    made["preset"] = f"{made['name']} preset"
    host_api.call("POST", f"{V1}/create", {"name": made["name"], "init_text": "red circle"})
    yield made
    for job_id in made["jobs"]:
        log_dir = stop_job_and_remove_logs(host_api, job_id)
        if log_dir:
            with contextlib.suppress(OSError):
                Path(log_dir).parent.rmdir()
    for path in (host_dir / "embeddings").glob(f"{made['name']}.pt*"):  # .pt, .pt.optim, .pt.json
        path.unlink()
    # presets live in <log root>/.presets (the default log root: <webui>/textual_inversion_ext)
    log_root = made.get("log_root") or host_dir / "textual_inversion_ext"
    (Path(log_root) / ".presets" / f"{made['preset']}.json").unlink(missing_ok=True)
    assert made["preset"] not in host_api.call("GET", f"{V1}/presets")["presets"]
    host_api.call("POST", "/sdapi/v1/refresh-embeddings")


def shoot_view(page: Page, path: Path) -> Path:
    """The Train tab's right column from the message down to the preview thumbnails (the live part), as a small
    PNG (the gallery's empty space below its thumbnails cut off)."""
    view = page.locator("#tiext_train_view")
    view.scroll_into_view_if_needed()
    view.screenshot(path=str(path))
    top = view.bounding_box()
    bottom = max(box["y"] + box["height"] for box in
                 (img.bounding_box() for img in page.locator("#tiext_train_previews img").all()) if box)
    with Image.open(path) as im:
        scale = im.height / top["height"]
        im.crop((0, 0, im.width, int((bottom - top["y"] + 12) * scale))).save(path)
    shoot_file(path)
    return path


def choose(page: Page, elem_id: str, option: str) -> None:
    """Pick `option` in a gradio 3.41 dropdown (an input and a list of options)."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} ul.options li", has_text=re.compile(rf"^\W*{re.escape(option)}\s*$")).first.click()
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`).value === v", arg=[elem_id, option])


def number(page: Page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")  # gradio 3.41 sliders' number boxes commit on blur


@pytest.fixture
def fed_page(browser, host_api):
    """The host's page and a ChartFeed attached before it loads: gradio 3's `every=` poll is one websocket
    opened during the page load, so a listener added afterwards never sees the charts' data."""
    feeds: list[ChartFeed] = []
    with open_page(browser, before_load=lambda page: feeds.append(ChartFeed(page))) as page:
        yield page, feeds[0]


def test_live_run_charts_previews_result_and_host_sampler(fed_page, host_api, dataset, shots, trained):
    name = trained["name"]
    page, feed = fed_page
    # What a user set up in txt2img, copied into the preview fields by the tab's button.
    page.evaluate("p => { document.querySelector('#txt2img_prompt textarea').value = p; }",
                  PROMPTS[0].format(name=name))
    open_extension(page)
    sub_tab(page, "Train")
    wait_value(page, "tiext_train_status", r"\S")
    page.locator("#tiext_train_refresh").click()
    pick(page, name)
    textarea(page, "tiext_train_data_dir").fill(str(dataset))
    textarea(page, "tiext_train_learn_rate").fill(LEARN_RATE)  # a step in the LR chart
    page.locator("#tiext_train_max_steps input").fill(str(MAX_STEPS))
    number(page, "tiext_train_resolution", 64)
    open_accordion(page, "tiext_train_save_every_section")  # "Output"
    page.locator("#tiext_train_save_every input").fill(str(PREVIEW_EVERY))
    page.locator("#tiext_train_preview_every input").fill(str(PREVIEW_EVERY))

    open_accordion(page, "tiext_train_preview_prompt_section")  # "Preview"
    page.locator("#tiext_copy_txt2img").click()
    copied = wait_value(page, "tiext_train_preview_prompt", re.escape(name))
    assert copied == PROMPTS[0].format(name=name)
    host_sampler = page.evaluate("() => document.querySelector('#txt2img_sampling input').value")
    assert page.locator("#tiext_train_preview_sampler input").input_value() == host_sampler
    assert page.locator("#tiext_train_preview_steps input[type=number]").input_value() == "20"  # txt2img's
    textarea(page, "tiext_train_preview_prompt").fill("\n".join(p.format(name=name) for p in PROMPTS))
    choose(page, "tiext_train_preview_sampler", SAMPLER)  # the host's list, loaded with the page
    for field, value in (("preview_steps", 4), ("preview_width", 64), ("preview_height", 64)):
        number(page, f"tiext_train_{field}", value)

    open_accordion(page, "tiext_train_val_every_section")  # "Validation"
    page.locator("#tiext_train_val_every input").fill(str(VAL_EVERY))
    number(page, "tiext_train_val_timesteps", 2)
    number(page, "tiext_train_val_budget", 0)  # every VAL_EVERY steps, not what a 10 % budget allows
    open_accordion(page, "tiext_train_norm_warn_section")  # "Health"
    number(page, "tiext_train_norm_warn", NORM_WARN)  # low enough for this run to reach: a warning shows

    # Preset: save all of it, spoil a field, load it back (the run below then uses the loaded values).
    preset = page.locator("#tiext_preset input")
    preset.fill(trained["preset"])
    preset.press("Enter")
    page.locator("#tiext_preset_save").click()
    assert wait_value(page, "tiext_train_message", "preset") == f"Saved preset '{trained['preset']}'."
    page.locator("#tiext_train_max_steps input").fill("7")
    choose(page, "tiext_train_preview_sampler", OTHER_SAMPLER)
    page.locator("#tiext_preset_load").click()
    assert wait_value(page, "tiext_train_message", "Loaded") == f"Loaded preset '{trained['preset']}'."
    page.wait_for_function("() => document.querySelector('#tiext_train_max_steps input').value === '60'")
    assert page.locator("#tiext_train_preview_sampler input").input_value() == SAMPLER
    assert textarea(page, "tiext_train_data_dir").input_value() == str(dataset)
    _, job_id = click_train(page, trained["jobs"])

    # Live: the status line, the three charts' pictures and their data all move on while it runs.
    page.wait_for_function("([prefix, ids]) => { const t = document.querySelector('#tiext_train_status textarea');"
                           " return t.value.startsWith(prefix) && /step [1-9]/.test(t.value) && / val /.test(t.value)"
                           " && ids.every(id => document.querySelector(`#${id} canvas`)); }",
                           arg=[f"{name}: running", list(CHARTS.values())], timeout=TRAIN_TIMEOUT_MS, polling=200)
    first_step, first = status_step(page), canvases(page)
    first_points = {s: feed.points(s) for s in ("validation", "learning rate", "largest vector / vocabulary median")}
    assert first_step < MAX_STEPS, "the run ended before the page saw it train"
    assert all(first_points.values()), feed.series
    page.wait_for_function("([ids, before]) => ids.every((id, i) => {"
                           " const c = document.querySelector(`#${id} canvas`);"
                           " return c && c.toDataURL() !== before[i]; })",
                           arg=[list(CHARTS.values()), list(first.values())], timeout=TRAIN_TIMEOUT_MS, polling=250)
    deadline = time.time() + TRAIN_TIMEOUT_MS / 1000
    while feed.points("validation") <= first_points["validation"] and time.time() < deadline:
        page.wait_for_timeout(250)
    second_step = status_step(page)
    live = host_api.call("GET", f"{V1}/jobs/{job_id}")
    assert second_step > first_step
    assert feed.points("validation") > first_points["validation"], (first_points, feed.series)
    assert feed.points("learning rate") > first_points["learning rate"]
    assert feed.points("largest vector / vocabulary median") > first_points["largest vector / vocabulary median"]
    status_line = textarea(page, "tiext_train_status").input_value()
    assert re.search(r"· val \d\.\d{4}", status_line) and re.search(r"· norm \d+\.\d\d×", status_line), status_line
    assert live["active"] or live["step"] == MAX_STEPS
    # The picture for the README: halfway, with previews and the norm warning, the run still going.
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function("([prefix, at]) => { const v = document.querySelector('#tiext_train_status textarea')"
                               ".value; const m = /step (\\d+)\\//.exec(v); return !v.startsWith(prefix) || (m &&"
                               " +m[1] >= at && document.querySelector('#tiext_train_previews img')"
                               " && document.querySelector('#tiext_train_warnings .tiext-warn')); }",
                               arg=[f"{name}: running", MAX_STEPS // 2], timeout=TRAIN_TIMEOUT_MS, polling=250)
        page.wait_for_timeout(2000)  # the charts redraw after the status line
        if textarea(page, "tiext_train_status").input_value().startswith(f"{name}: running"):
            shoot_view(page, shots / "train-live.png")

    # The end: result panel (best step), snapshots, comparison grid, previews with their captions.
    final = wait_value(page, "tiext_train_status", rf"^{re.escape(name)}: (finished|error|interrupted)",
                       timeout=TRAIN_TIMEOUT_MS)
    job = host_api.call("GET", f"{V1}/jobs/{job_id}")
    result = job["result"]
    trained["log_root"] = Path(result["log_dir"]).parents[1]  # <log root>/<name>/<run>
    assert final.startswith(f"{name}: finished · step {MAX_STEPS}/{MAX_STEPS}"), (final, job["message"])
    best = result["best_step"]
    assert best is not None and result["best_snapshot"], result
    panel = wait_value(page, "tiext_train_result", r"Best step: \d+")
    assert f"Best step: {best}" in panel and str(best) in result["message"]
    page.locator("#tiext_train_grid img").first.wait_for(state="visible", timeout=TRAIN_TIMEOUT_MS)
    assert result["grid"] and Path(result["grid"]).is_file()
    page.wait_for_timeout(1000)
    shoot(page.locator("#tiext_result_section"), shots / "train-result.png")
    snapshot_value = page.locator("#tiext_snapshot input").input_value()
    assert snapshot_value.startswith(f"step {best} · ") and " · best · run " in snapshot_value, snapshot_value

    # The run's warning stands out under the status line.
    assert any("Vector norms are inflating" in w for w in job["warnings"]), job["warnings"]
    warning = page.locator("#tiext_train_warnings .tiext-warn").first
    assert "Vector norms are inflating" in warning.inner_text() and warning.is_visible()

    assert len(job["previews"]) == MAX_STEPS // PREVIEW_EVERY * len(PROMPTS)
    page.locator("#tiext_train_previews img").first.wait_for(state="visible")
    captions = page.locator("#tiext_train_previews").inner_text()
    assert f"step {MAX_STEPS} · prompt 1" in captions and f"step {PREVIEW_EVERY} · prompt 2" in captions, captions

    check_previews_use_the_host_sampler(host_api, name, job)

    # One click: the best step becomes the embedding, loaded by the host at once.
    page.locator("#tiext_promote_best").click()
    promoted = wait_value(page, "tiext_train_message", r"is now the step|[Cc]annot|failed")
    assert f"'{name}' is now the step-{best} snapshot" in promoted, promoted
    loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[name]["step"] == best, loaded.get(name)

    # The grid on demand: a background job the status line follows; its image replaces the panel's.
    page.locator("#tiext_render_grid").click()
    rendering = wait_value(page, "tiext_train_message", r"comparison grid|[Cc]annot|failed")
    assert rendering.startswith(f"Rendering the comparison grid of '{name}' (job grid-"), rendering
    trained["jobs"].append(re.search(r"\(job (\S+)\)", rendering).group(1))
    wait_value(page, "tiext_train_status", rf"^grid {re.escape(name)}: finished", timeout=TRAIN_TIMEOUT_MS)
    page.locator("#tiext_train_grid img").first.wait_for(state="visible")


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB")


def _difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def check_previews_use_the_host_sampler(host_api, name: str, job: dict) -> None:
    """The last preview is the host's own txt2img render with the chosen sampler, and not another sampler's.

    Our preview PNG carries no infotext (the trainer saves the image's pixels only), so the check
    re-renders it: the final embedding holds the vectors of the last preview's step, so txt2img with the
    same prompt, seed, steps, CFG and size gives the same picture with the same sampler (the host's
    infotext then says "Sampler: DDIM"), and a visibly different one with another sampler.
    """
    last = Path(job["previews"][-2])  # step MAX_STEPS, prompt 1
    assert last.name == f"{name}-{MAX_STEPS}-1.png", last
    preview = Image.open(last)
    if "parameters" in preview.info:  # should the trainer ever keep the host's infotext
        assert f"Sampler: {SAMPLER}" in preview.info["parameters"]
    preview_record = json.loads((Path(job["result"]["log_dir"]) / "run.json").read_text())["preview"]
    settings = preview_record["settings"]
    assert settings["sampler"] == SAMPLER and preview_record["prompts"][0] == PROMPTS[0].format(name=name)
    request = {"prompt": preview_record["prompts"][0], "negative_prompt": settings["negative_prompt"],
               "seed": settings["seed"], "steps": settings["steps"], "cfg_scale": settings["cfg_scale"],
               "width": settings["width"], "height": settings["height"], "batch_size": 1, "n_iter": 1,
               "save_images": False, "send_images": True}
    same = host_api.call("POST", "/sdapi/v1/txt2img", {**request, "sampler_name": SAMPLER})
    other = host_api.call("POST", "/sdapi/v1/txt2img", {**request, "sampler_name": OTHER_SAMPLER})
    assert json.loads(same["info"])["sampler_name"] == SAMPLER
    assert f"Sampler: {SAMPLER}" in json.loads(same["info"])["infotexts"][0]
    mine = preview.convert("RGB")
    d_same, d_other = _difference(mine, _decode(same["images"][0])), _difference(mine, _decode(other["images"][0]))
    assert d_same < 1.0 < d_other, (d_same, d_other)
