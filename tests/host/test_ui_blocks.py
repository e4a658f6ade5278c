"""The tabs built with a real gradio (the host's 3.41.2; also runs on 4.40): layout, one control per
TrainParams field with the field's type/default/bounds, values back to TrainParams, the polling
wiring (also once rendered inside an outer Blocks, as the host does), and the served endpoints.

Run: WEBUI_DIR=$LAB/webui PYTHONPATH=. $LAB/venv/bin/python -m pytest -q tests/host/test_ui_blocks.py
(the host venv has no diffusers: the service runs on a model-free stub backend)."""

from __future__ import annotations

import inspect
import socket

import pytest

gr = pytest.importorskip("gradio")

from _ui_fakes import ScriptedService, hold_a_job, job, stub_service  # noqa: E402
from PIL import Image  # noqa: E402

from textual_inversion_ext.core.params import fields_of  # noqa: E402
from textual_inversion_ext.core.training.train_params import TrainParams  # noqa: E402
from textual_inversion_ext.ui import build_tabs, compat, status  # noqa: E402
from textual_inversion_ext.ui.blocks import POLL_SECONDS  # noqa: E402
from textual_inversion_ext.ui.controls import control_specs, params_from_values  # noqa: E402

KINDS = {"checkbox": gr.Checkbox, "radio": gr.Radio, "dropdown": gr.Dropdown, "slider": gr.Slider,
         "number": gr.Number, "textbox": gr.Textbox}
TRAIN_SPECS = control_specs(TrainParams, "tiext_train_")


@pytest.fixture
def service(tmp_path):
    return stub_service(tmp_path)


@pytest.fixture
def blocks(service):
    return build_tabs(service)


def by_id(blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def choice_values(component) -> list:
    return [c[1] if isinstance(c, tuple | list) else c for c in component.choices]  # 4.x: (label, value)


def fns(blocks) -> list:
    return list(blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns)


def poll_once(blocks, cache):
    """Call the polling event's function once (3.41 wraps an `every=` fn into an endless generator)."""
    status_id = by_id(blocks)["tiext_train_status"]._id
    fn = next(f for f in fns(blocks) if [o._id for o in f.outputs][:1] == [status_id]).fn
    out = fn(cache)
    return next(out) if inspect.isgenerator(out) else out


def test_sub_tabs_and_ids(blocks):
    tabs = [b for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert [t.label for t in tabs] == ["Create embedding", "Preprocess images", "Train"]
    ids = by_id(blocks)
    assert all(i.startswith("tiext_") for i in ids)
    for needed in ("tiext_preprocess_source", "tiext_preprocess_width", "tiext_preprocess_flip",
                   "tiext_preprocess_button", "tiext_preprocess_interrupt", "tiext_preprocess_status",
                   "tiext_captions_folder", "tiext_captions_gallery", "tiext_captions_text", "tiext_captions_undo",
                   "tiext_captions_regex", "tiext_captions_strip", "tiext_check_button", "tiext_check_report",
                   "tiext_create_name", "tiext_create_init_text", "tiext_create_num_vectors", "tiext_create_button",
                   "tiext_train_embedding", "tiext_train_refresh", "tiext_train_data_dir", "tiext_train_button",
                   "tiext_interrupt_button", "tiext_train_status", "tiext_train_loss_chart", "tiext_train_previews",
                   "tiext_train_message", "tiext_train_lr_chart", "tiext_train_norm_chart", "tiext_train_warnings",
                   "tiext_train_result", "tiext_promote_best", "tiext_render_grid", "tiext_snapshot",
                   "tiext_promote_selected", "tiext_resume_selected", "tiext_train_grid", "tiext_preset",
                   "tiext_preset_save", "tiext_preset_load", "tiext_copy_txt2img", "tiext_create_model_info",
                   "tiext_create_model_refresh", "tiext_train_model_info"):
        assert needed in ids, needed
    for chart in ("tiext_train_loss_chart", "tiext_train_lr_chart", "tiext_train_norm_chart"):
        assert isinstance(ids[chart], gr.LinePlot)
    assert isinstance(ids["tiext_train_previews"], gr.Gallery)
    assert isinstance(ids["tiext_train_grid"], gr.Image)
    assert ids["tiext_preset"].allow_custom_value and ids["tiext_train_preview_sampler"].allow_custom_value


def test_every_train_field_has_a_control_with_its_type_default_and_bounds(blocks):
    ids = by_id(blocks)
    assert len(TRAIN_SPECS) == len(fields_of(TrainParams))
    for spec in TRAIN_SPECS:
        comp = ids[spec.elem_id]
        assert type(comp) is KINDS[spec.kind], spec.name
        assert (comp.label, comp.info) == (spec.label, spec.info), spec.name
        assert comp.value == spec.default, spec.name
        if spec.kind in ("slider", "number"):
            assert (comp.minimum, comp.maximum) == (spec.minimum, spec.maximum), spec.name
        if spec.kind == "slider":
            assert comp.step == spec.step, spec.name
        if spec.kind in ("radio", "dropdown"):
            assert choice_values(comp) == list(spec.choices or ()), spec.name  # model choices: at page load
        if spec.kind == "textbox":
            assert comp.lines == spec.lines, spec.name
    non_main = {s.section for s in TRAIN_SPECS} - {"main"}
    accordions = {b.label for b in blocks.blocks.values()
                  if isinstance(b, gr.Accordion) and (b.elem_id or "").startswith("tiext_train_")}
    assert accordions == {s.capitalize() for s in non_main}


def test_control_values_round_trip_to_train_params(blocks):
    ids = by_id(blocks)
    values = [ids[s.elem_id].value for s in TRAIN_SPECS]
    assert params_from_values(TrainParams, TRAIN_SPECS, values) == TrainParams()
    # what the components hand a handler after preprocessing, e.g. floats from a Number box
    processed = [ids[s.elem_id].preprocess(v) if s.kind != "dropdown" else v for s, v in zip(TRAIN_SPECS, values)]
    assert params_from_values(TrainParams, TRAIN_SPECS, processed) == TrainParams()


def _poll_dependency(blocks) -> dict:
    config = blocks.get_config_file()
    ids = by_id(blocks)
    want = [ids["tiext_train_status"]._id, ids["tiext_train_loss_chart"]._id, ids["tiext_train_previews"]._id]
    deps = [d for d in config["dependencies"] if d["outputs"][:3] == want]
    if compat.GRADIO_MAJOR < 4:
        return next(d for d in deps if d.get("every") == POLL_SECONDS)
    timers = {b._id: b for b in blocks.blocks.values() if type(b).__name__ == "Timer"}
    dep = next(d for d in deps if any(t[1] == "tick" for t in d["targets"]))
    assert timers[dep["targets"][0][0]].value == POLL_SECONDS
    return dep


def test_polling_is_wired_and_survives_being_rendered_inside_the_host(blocks):
    assert _poll_dependency(blocks)
    # what the host does with the Blocks on_ui_tabs returns
    with gr.Blocks(analytics_enabled=False) as outer, gr.Tabs(), gr.Tab("Textual Inversion"):
        blocks.render()
    assert _poll_dependency(outer)


def test_poll_outputs_are_accepted_by_the_components(tmp_path):
    picture = tmp_path / "toy-3.png"
    Image.new("RGB", (16, 16), "red").save(picture)
    service = ScriptedService([job(losses=[(1, 1.0), (2, 0.5), (3, 0.25)], previews=[str(picture)])])
    blocks = build_tabs(service)
    ids = by_id(blocks)
    cache = status.LossCache()
    text, frame, pictures, same, prep_status, *_ = poll_once(blocks, cache)
    assert prep_status == "Training 'toy': running."  # the Preprocess tab says why it would be refused
    assert same is cache and [s for s, _ in cache.raw] == [1, 2, 3]  # updated in place (see LossCache)
    assert text.startswith("toy: running · step 3/100")
    assert list(frame.columns) == ["step", "loss", "series"] and len(frame) == 6
    assert ids["tiext_train_loss_chart"].postprocess(frame) is not None
    assert pictures == [(str(picture), "step 3")]
    assert ids["tiext_train_previews"].postprocess(pictures)
    unchanged = poll_once(blocks, cache)  # nothing new: gr.update() leaves chart and gallery alone
    assert unchanged[1] == compat.no_change() and unchanged[2] == compat.no_change()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_endpoints_create_train_refusal_and_interrupt(service, tmp_path):
    from gradio_client import Client

    from textual_inversion_ext.ui.app import launch

    data = tmp_path / "data"
    data.mkdir()
    port = _free_port()
    app = launch(service, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        message, _ = client.predict("toy", "blue bmw", 0, "pool", False, api_name="/tiext_create")
        assert "Created" in message and "2 vectors" in message
        assert [e["name"] for e in service.list_embeddings()] == ["toy"]
        again, _ = client.predict("toy", "blue bmw", 0, "pool", False, api_name="/tiext_create")
        assert "already exists" in again

        defaults = [s.default for s in TRAIN_SPECS]
        release = hold_a_job(service, "other")
        try:
            refused = client.predict("toy", str(data), *defaults, "", api_name="/tiext_train")
            assert "'other' is training" in refused and "Traceback" not in refused
            assert client.predict(api_name="/tiext_interrupt").startswith("Interrupting")
        finally:
            release.set()
    finally:
        app.close()


def test_create_notes_and_the_effective_lr_note_are_wired(blocks, service):
    ids = by_id(blocks)
    outputs = {tuple(o._id for o in f.outputs): f.fn for f in fns(blocks)}
    note_ids = tuple(ids[f"tiext_create_{box}_info"]._id for box in ("name", "init_text", "model"))
    name_html, init_html, _ = outputs[note_ids]("car", "blue bmw", 70, "pool")  # name, init text, vectors, mode
    assert "tiext-warn" in name_html and "whole word of CLIP" in name_html
    assert "2 tokens → suggested vectors 2" in init_html and "over the 75-token budget" in init_html
    init_only, _ = outputs[note_ids[1:]]("tiext-robot", "blue bmw", 0, "pool")
    assert init_only == "<div class='tiext-note'>2 tokens → suggested vectors 2</div>"
    lr = ids["tiext_train_lr_info"]
    assert isinstance(lr, gr.HTML)
    assert "= 0.02." in outputs[(lr._id,)]("0.005", 2, 2, True)
    assert "tiext-warn" in outputs[(lr._id,)]("0.005:x", 2, 2, True)


def test_model_lines_and_counts_follow_a_checkpoint_switch(service):
    from _ui_fakes import StubBackend

    from textual_inversion_ext.core.backend import ModelInfo
    from textual_inversion_ext.core.errors import ModelError

    class StubSDXL(StubBackend):
        info = ModelInfo(family="sdxl", encoders={"clip_l": 8, "clip_g": 16}, resolution=64, name="stub-xl",
                         short_hash=None)

    sd1, loaded = service.backend(), {}
    service.backend = lambda: loaded.get("now", sd1)  # the host's: whatever is loaded when asked
    blocks = build_tabs(service)
    ids = by_id(blocks)
    create_line, train_line = ids["tiext_create_model_info"], ids["tiext_train_model_info"]
    notes = [ids["tiext_create_name_info"]._id, ids["tiext_create_init_text_info"]._id, create_line._id]
    # the name box, the Create refresh button and showing the Create tab redo the notes and the line
    note_fns = [f.fn for f in fns(blocks) if [o._id for o in f.outputs] == notes]
    train_fns = [f.fn for f in fns(blocks) if [o._id for o in f.outputs] == [train_line._id]]
    assert len(note_fns) == 3 and len(train_fns) == 2  # Train: showing the tab, choosing an embedding
    load = next(f.fn for f in fns(blocks) if train_line._id in [o._id for o in f.outputs] and len(f.outputs) > 2)
    refresh = next(f.fn for f in fns(blocks) if [o._id for o in f.outputs] == [ids["tiext_train_embedding"]._id,
                                                                                 train_line._id])
    _, init_html, line = note_fns[0]("tiext-robot", "red robot", 0, "pool")
    assert "SD1: 8 per vector (.pt)" in line and ">2 tokens → suggested vectors 2<" in init_html
    loaded["now"] = StubSDXL()
    for fn in note_fns:
        _, init_html, line = fn("tiext-robot", "red robot", 0, "pool")
        assert "Loaded model: stub-xl — SDXL: each vector is clip_l 8 + clip_g 16 (saved as .safetensors)" in line
        assert "clip_l: 2 tokens · clip_g: 2 tokens → suggested vectors 2" in init_html
    assert all("SDXL" in fn() for fn in train_fns) and "SDXL" in refresh()[1]
    *_, create_html, train_html = load("tiext-robot", "red robot", 0, "pool")
    assert "SDXL" in create_html and create_html == train_html
    loaded["now"] = ModelError("No checkpoint is loaded.")

    def failing():
        raise loaded["now"]

    service.backend = failing
    failed = "<div class='tiext-note tiext-model tiext-warn'>No checkpoint is loaded.</div>"
    assert train_fns[0]() == failed and load("x", "", 0, "pool")[-2:] == (failed, failed)
    assert note_fns[0]("x", "red robot", 0, "pool")[1:] == (
        "<div class='tiext-note'>2 tokens → suggested vectors 2</div>", failed)  # the hints still come


def test_new_series_results_and_grid_reach_the_components(tmp_path):
    picture, grid = tmp_path / "toy-3-2.png", tmp_path / "toy-grid.png"
    for path in (picture, grid):
        Image.new("RGB", (16, 16), "red").save(path)
    running = job(losses=[(1, 1.0), (2, 0.5), (3, 0.25)], previews=[str(picture)], learn_rates=[[1, 0.01], [3, 0.005]],
                  validation=[[0, 0.9], [2, 0.4]], norms=[[1, 1.0], [3, 1.5]], best_step=2,
                  warnings=["Vector norms reached 4.2× the vocabulary median."])
    snaps = [{"path": "/l/toy-2.pt", "step": 2, "run": "r1", "val_loss": 0.4, "best": True}]
    service = ScriptedService([running], snapshots={"toy": snaps})
    blocks = build_tabs(service)
    ids = by_id(blocks)
    cache = status.LossCache()
    out = poll_once(blocks, cache)
    text, loss, pictures, _, _, lr, norms, warn, result, image, snapshot = out
    assert "val 0.4000 (best step 2)" in text and "norm 1.50×" in text
    assert set(loss["series"]) == {status.RAW, status.SMOOTH, status.VAL, status.BEST}
    assert list(lr.columns) == ["step", "value", "series"] and list(lr["value"]) == [0.01, 0.005]
    assert list(norms["value"]) == [1.0, 1.5]
    for elem, value in (("tiext_train_loss_chart", loss), ("tiext_train_lr_chart", lr),
                        ("tiext_train_norm_chart", norms)):
        assert ids[elem].postprocess(value) is not None, elem
    assert pictures == [(str(picture), "step 3 · prompt 2")]
    assert "tiext-warn" in warn and "4.2×" in warn
    assert (result, image, snapshot) == ("", None, compat.no_change())  # running: panel cleared, list unchanged

    running.update(status="finished", active=False, result={"message": "Finished at step 3. Best step by "
                   "validation loss: 2 (0.40000).", "best_step": 2, "best_val_loss": 0.4,
                   "best_snapshot": "/l/toy-2.pt", "grid": str(grid)})
    *_, result, image, snapshot = poll_once(blocks, cache)
    assert result.startswith("Finished at step 3. Best step by validation loss: 2")
    assert image == str(grid) and ids["tiext_train_grid"].postprocess(image) is not None
    label = "step 2 · val 0.4000 · best · run r1"
    assert snapshot == compat.update(choices=[label], value=label)


def test_copy_from_txt2img_only_in_the_host_and_client_side(service):
    from textual_inversion_ext.ui.blocks import COPY_FIELDS, build

    for host in (False, True):
        blocks = build(service, host=host)
        ids = by_id(blocks)
        assert ids["tiext_copy_txt2img"].visible is host
        config = blocks.get_config_file()
        button = ids["tiext_copy_txt2img"]._id
        dep = next(d for d in config["dependencies"] if any(t[0] == button for t in d["targets"])
                   ) if compat.GRADIO_MAJOR >= 4 else next(d for d in config["dependencies"] if button in d["targets"])
        fields = [ids[f"tiext_train_{name}"]._id for name in COPY_FIELDS]
        assert dep["inputs"] == fields and dep["outputs"] == fields
        assert dep["backend_fn"] is False and "txt2img_prompt" in dep["js"] and "txt2img_sampling" in dep["js"]


def test_preset_buttons_save_and_fill_every_train_control(service):
    blocks = build_tabs(service)
    ids = by_id(blocks)
    by_outputs = {tuple(o._id for o in f.outputs): f.fn for f in fns(blocks)}
    message, preset, data_dir, subject = (ids[i]._id for i in ("tiext_train_message", "tiext_preset",
                                                                "tiext_train_data_dir", "tiext_train_subject"))
    controls = tuple(ids[s.elem_id]._id for s in TRAIN_SPECS)
    custom = TrainParams(max_steps=42, val_every=5, preview_prompt="a\nb", preview_sampler="DDIM", norm_cap=2.5)
    values = [ids[s.elem_id].preprocess(getattr(custom, s.name)) if s.kind not in ("dropdown",) else
              getattr(custom, s.name) for s in TRAIN_SPECS]
    saved, names = by_outputs[(message, preset)]("toy preset", "/data/toy", "blue bmw", *values)
    assert saved == "Saved preset 'toy preset'." and names == compat.update(choices=["toy preset"])
    text, folder, words, *loaded = by_outputs[(message, data_dir, subject, *controls)]("toy preset")
    assert (text, folder, words) == ("Loaded preset 'toy preset'.", "/data/toy", "blue bmw")
    assert params_from_values(TrainParams, TRAIN_SPECS, loaded) == custom
    for spec, value in zip(TRAIN_SPECS, loaded):  # each value is one its component accepts
        ids[spec.elem_id].postprocess(value)
    failed = by_outputs[(message, data_dir, subject, *controls)]("ghost")
    assert "No preset named 'ghost'" in failed[0] and all(v == compat.no_change() for v in failed[1:])
