"""The UI's logic without gradio: field → control mapping, values → parameters, handlers, polling."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from _ui_fakes import ScriptedService, hold_a_job, job, stub_service

from textual_inversion_ext.core.create import CreateParams
from textual_inversion_ext.core.errors import TIError
from textual_inversion_ext.core.params import ParameterError, fields_of, param
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.ui import handlers, status
from textual_inversion_ext.ui.controls import (
    MAX_SLIDER_POSITIONS,
    MODEL_CHOICES,
    by_section,
    control_specs,
    params_from_values,
    section_title,
    values_of,
)


def specs_by_name(cls=TrainParams, prefix="tiext_train_"):
    return {s.name: s for s in control_specs(cls, prefix)}


def test_importing_the_ui_package_does_not_import_gradio():
    code = "import sys, textual_inversion_ext.ui; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_train_field_gets_a_control_of_its_type():
    specs = specs_by_name()
    assert list(specs) == [f.name for f in fields_of(TrainParams)]
    for info in fields_of(TrainParams):
        spec = specs[info.name]
        assert (spec.label, spec.info, spec.default, spec.section) == (
            info.spec.label, info.spec.help, info.default, info.spec.section)
        assert spec.elem_id == f"tiext_train_{info.name}"
        expected = {bool: "checkbox", str: "textbox", int: {"slider", "number"}, float: {"slider", "number"}}
        if info.spec.choices:
            assert spec.kind in ("radio", "dropdown") and spec.choices == info.spec.choices
        elif info.type in (int, float):
            assert spec.kind in expected[info.type]
            assert (spec.minimum, spec.maximum) == (info.spec.minimum, info.spec.maximum)
        elif info.name in MODEL_CHOICES:  # choices from the loaded model, typed names allowed
            assert (spec.kind, spec.custom, spec.choices) == ("dropdown", True, None)
        else:
            assert spec.kind == expected[info.type]


def test_ui_hints_for_text_fields():
    s = specs_by_name()
    assert (s["preview_prompt"].kind, s["preview_prompt"].lines) == ("textbox", 3)  # one prompt per line
    assert s["preview_negative"].lines == 2 and s["learn_rate"].lines == 1
    assert s["preview_sampler"].kind == "dropdown" and s["preview_sampler"].custom
    specs = control_specs(TrainParams, "p_")
    values = values_of(TrainParams(preview_sampler="DDIM"), specs)
    assert params_from_values(TrainParams, specs, values).preview_sampler == "DDIM"  # any name: the trainer checks
    values[[x.name for x in specs].index("preview_sampler")] = None  # a cleared dropdown = the model's default
    assert params_from_values(TrainParams, specs, values).preview_sampler == ""


def test_control_choice_rules():
    s = specs_by_name()
    assert s["scale_lr"].kind == "checkbox"
    assert s["learn_rate"].kind == "textbox"
    assert s["latent_sampling"].kind == "radio"  # three choices
    assert s["precision"].kind == "dropdown"  # four
    assert (s["batch_size"].kind, s["batch_size"].step) == ("slider", 1)
    assert (s["resolution"].kind, s["resolution"].step) == ("slider", 64)
    assert (s["tag_dropout"].kind, s["tag_dropout"].step) == ("slider", 0.05)
    assert (s["preview_cfg"].kind, s["preview_cfg"].step) == ("slider", 0.1)  # no declared step: a round one
    # 1…1,000,000 is too many slider positions; no maximum at all is a number box too
    assert (s["max_steps"].kind, s["max_steps"].precision) == ("number", 0)
    assert 1_000_000 / MAX_SLIDER_POSITIONS > 1
    assert (s["save_every"].kind, s["save_every"].minimum, s["save_every"].maximum) == ("number", 0, None)


def test_a_new_field_gets_a_control_without_ui_changes():
    @dataclass
    class Future:
        warmup: int = param(10, "Warm-up", "Steps of LR warm-up.", minimum=0, maximum=100, section="optimizer")
        ema: float = param(0.0, "EMA", "Vector EMA decay.", minimum=0.0, maximum=1.0)
        optimizer: str = param("adamw", "Optimizer", "Which optimizer.", choices=("adamw", "sgd"))
        note: str = param("", "Note", "Free text.", section="output")
        fast: bool = param(True, "Fast", "Go fast.")

    specs = {s.name: s for s in control_specs(Future, "x_")}
    assert {n: s.kind for n, s in specs.items()} == {
        "warmup": "slider", "ema": "slider", "optimizer": "radio", "note": "textbox", "fast": "checkbox"}
    assert params_from_values(Future, list(specs.values()), [20.0, 0.5, "sgd", "hi", False]) == Future(
        20, 0.5, "sgd", "hi", False)


def test_sections_main_first_then_declaration_order():
    groups = by_section(control_specs(TrainParams, "p_"))
    assert list(groups) == ["main", "captions", "optimizer", "performance", "output", "preview", "validation",
                            "health"]
    assert sum(len(g) for g in groups.values()) == len(fields_of(TrainParams))
    assert section_title("performance") == "Performance"


def test_values_round_trip_to_train_params():
    specs = control_specs(TrainParams, "p_")
    assert params_from_values(TrainParams, specs, values_of(TrainParams(), specs)) == TrainParams()
    custom = TrainParams(learn_rate="0.05:10, 0.01", max_steps=42, tag_dropout=0.25, precision="bf16",
                         gradient_checkpointing=True, preview_prompt="a photo of toy")
    assert params_from_values(TrainParams, specs, values_of(custom, specs)) == custom
    # gradio hands whole numbers back as floats
    floats = [float(v) if type(v) is int else v for v in values_of(custom, specs)]
    assert params_from_values(TrainParams, specs, floats) == custom


@pytest.mark.parametrize(("name", "value", "match"), [
    ("max_steps", 2.5, "Max steps: 2.5 is not a whole number"),
    ("max_steps", None, "Max steps: enter a number"),
    ("batch_size", 65, "Batch size .* at most 64"),
    ("precision", None, "Precision: choose one of auto"),
    ("precision", "fp8", "fp8"),
    ("seed", "x", "'x' is not a number"),
])
def test_bad_values_are_parameter_errors_naming_the_control(name, value, match):
    specs = control_specs(TrainParams, "p_")
    values = values_of(TrainParams(), specs)
    values[[s.name for s in specs].index(name)] = value
    with pytest.raises(ParameterError, match=match):
        params_from_values(TrainParams, specs, values)


def test_token_notes():
    assert handlers.init_text_info("blue bmw") == "2 tokens → suggested vectors 2"
    assert handlers.init_text_info("car") == "1 token → suggested vectors 1"
    assert handlers.init_text_info("  ").startswith("Empty")
    long = handlers.init_text_info("word " * 80)
    assert long.startswith("80 tokens → suggested vectors 75") and "pooled" in long
    assert handlers.name_info("my-bmw").startswith("Name: 3 tokens")
    assert "not allowed" in handlers.name_info("a/b")
    assert handlers.name_info("") == ""


def create_values(name, init_text="red robot", num_vectors=0, init_mode="pool", overwrite=False):
    return [name, init_text, num_vectors, init_mode, overwrite]


CREATE_SPECS = control_specs(CreateParams, "c_")


def test_create_handler_success_duplicate_and_invalid(tmp_path):
    service = stub_service(tmp_path)
    assert [s.name for s in CREATE_SPECS] == ["name", "init_text", "num_vectors", "init_mode", "overwrite"]
    outcome, names = handlers.create(service, CREATE_SPECS, create_values("toy", num_vectors=3.0))
    assert outcome.ok and "Created" in outcome.message and "3 vectors" in outcome.message and names == ["toy"]
    outcome, names = handlers.create(service, CREATE_SPECS, create_values("toy"))
    assert not outcome.ok and "already exists" in outcome.message and names == ["toy"]
    outcome, _ = handlers.create(service, CREATE_SPECS, create_values("toy", overwrite=True))
    assert outcome.ok
    outcome, _ = handlers.create(service, CREATE_SPECS, create_values("bad/name"))
    assert not outcome.ok and "not allowed" in outcome.message
    outcome, _ = handlers.create(service, CREATE_SPECS, create_values("ok", num_vectors=99))
    assert not outcome.ok and "at most 75" in outcome.message


TRAIN_SPECS = control_specs(TrainParams, "t_")
DEFAULTS = values_of(TrainParams(), TRAIN_SPECS)


def test_train_handler_messages_instead_of_tracebacks(tmp_path, caplog):
    service = stub_service(tmp_path)
    handlers.create(service, CREATE_SPECS, create_values("toy"))
    data = tmp_path / "data"
    data.mkdir()
    assert "Choose an embedding" in handlers.start_training(service, None, str(data), TRAIN_SPECS, DEFAULTS).message
    assert "dataset folder" in handlers.start_training(service, "toy", " ", TRAIN_SPECS, DEFAULTS).message
    missing = handlers.start_training(service, "toy", str(tmp_path / "nope"), TRAIN_SPECS, DEFAULTS)
    assert not missing.ok and "does not exist" in missing.message
    assert "No embedding named 'ghost'" in handlers.start_training(
        service, "ghost", str(data), TRAIN_SPECS, DEFAULTS).message
    bad = list(DEFAULTS)
    bad[[s.name for s in TRAIN_SPECS].index("tag_dropout")] = 3
    assert "Tag dropout" in handlers.start_training(service, "toy", str(data), TRAIN_SPECS, bad).message

    release = hold_a_job(service, "other")
    try:  # a second Train while one runs: the service's refusal, as a message
        busy = handlers.start_training(service, "toy", str(data), TRAIN_SPECS, DEFAULTS)
        assert not busy.ok and "'other' is training" in busy.message
        stop = handlers.interrupt(service)
        assert stop.ok and stop.message.startswith("Interrupting")
    finally:
        release.set()

    class Broken:
        def start_training(self, *args):
            raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR):
        out = handlers.start_training(Broken(), "toy", str(data), TRAIN_SPECS, DEFAULTS)
    assert out.message == "Train failed: RuntimeError: disk on fire (details in the console log)."
    assert "Traceback" in caplog.text  # the log keeps the trace; the UI shows one line


def test_interrupt_with_nothing_running(tmp_path):
    out = handlers.interrupt(stub_service(tmp_path))
    assert (out.ok, out.message) == (False, "Nothing is training.")


def test_poll_fetches_only_new_steps_and_reports_changes(tmp_path):
    j = job(losses=[(1, 1.0), (2, 0.5)])
    service = ScriptedService([j])
    view = status.poll(service, None)
    assert [r[:2] for r in view.chart if r[2] == status.RAW] == [(1, 1.0), (2, 0.5)]
    smooth = [r[1] for r in view.chart if r[2] == status.SMOOTH]
    assert smooth[0] == 1.0 and 0.5 < smooth[1] < 1.0  # bias-corrected: starts at the first loss
    assert view.previews == []
    assert view.status.startswith("toy: running · step 2/100 · loss 0.5000 · LR 0.005 · 0.50 s/step · ETA 1:02:05")

    again = status.poll(service, view.cache)
    assert again.chart is None and again.previews is None  # nothing new: the page keeps what it has
    assert service.calls[-1] == (None, 2)

    j["losses"].append([3, 0.25])
    two, three = tmp_path / "toy-2.png", tmp_path / "toy-3.png"
    two.write_bytes(b"png")
    three.write_bytes(b"png")
    j["previews"] = [str(two), str(three), str(tmp_path / "deleted-4.png")]
    third = status.poll(service, again.cache)
    assert [r[0] for r in third.chart if r[2] == status.RAW] == [1, 2, 3]
    # newest first; a file gone from disk (deleted log folder) is left out, else the Gallery raises
    assert third.previews == [(str(three), "step 3"), (str(two), "step 2")]

    service.jobs.append(job("train-2", losses=[(7, 0.9)], status="error", active=False, message="Boom."))
    fourth = status.poll(service, third.cache)  # a new job: the page starts its series over
    assert [r[0] for r in fourth.chart if r[2] == status.RAW] == [7]
    assert service.calls[-1] == ("train-2", 0)
    assert fourth.status.endswith("\nBoom.") and "ETA" not in fourth.status


def test_poll_idle_and_nan_and_thinning():
    idle = status.poll(ScriptedService(), None)
    assert idle.status == "No training has run yet." and idle.chart is None

    losses = [(s, float("nan") if s == 5 else 1.0 / s) for s in range(1, 5001)]
    view = status.poll(ScriptedService([job(losses=losses)]), None)
    raw = [r for r in view.chart if r[2] == status.RAW]
    assert len(raw) <= status.MAX_CHART_POINTS + 1 and raw[-1][0] == 5000
    assert all(math.isfinite(r[1]) for r in view.chart)
    assert 5 not in [s for s, _ in view.cache.raw]


def test_poll_validation_lr_norm_series_best_step_and_warnings():
    j = job(losses=[(1, 1.0), (2, 0.8)], learn_rates=[[1, 0.005], [2, 0.005]], validation=[[0, 0.9], [2, 0.7]],
            norms=[[1, 1.1], [2, 1.3]], best_step=2)
    service = ScriptedService([j])
    view = status.poll(service, None)
    assert [r[:2] for r in view.chart if r[2] == status.VAL] == [(0, 0.9), (2, 0.7)]  # step 0: starting vectors
    best = [r for r in view.chart if r[2] == status.BEST]
    assert [r[0] for r in best] == [2, 2] and best[0][1] == 0.7 and best[1][1] == 1.0  # a vertical line, full height
    assert view.lr == [(1, 0.005, status.LR), (2, 0.005, status.LR)]
    assert view.norms == [(1, 1.1, status.NORM), (2, 1.3, status.NORM)]
    assert view.warnings == "" and view.result == "" and view.grid == ""  # a new running job clears the panel
    assert view.status.startswith("toy: running · step 2/100 · loss 0.8000 · val 0.7000 (best step 2) · LR 0.005 · "
                                  "norm 1.30× · 0.50 s/step")

    again = status.poll(service, view.cache)  # nothing new: every part unchanged
    assert (again.chart, again.lr, again.norms, again.warnings, again.result, again.snapshots) == (None,) * 6

    j["losses"].append([3, 0.6])
    j["learn_rates"].append([3, 0.004])
    j["warnings"] = ["Validation loss rose 3 evaluations in a row while the training loss fell <overtraining>."]
    third = status.poll(service, again.cache)
    assert service.calls[-1] == (None, 2)  # only what came after step 2
    assert [r[0] for r in third.chart if r[2] == status.RAW] == [1, 2, 3]
    assert [r[:2] for r in third.chart if r[2] == status.VAL] == [(0, 0.9), (2, 0.7)]  # no duplicate points
    assert third.lr[-1] == (3, 0.004, status.LR) and third.norms is None
    assert third.warnings == ("<div class='tiext-note tiext-warn'>⚠ Validation loss rose 3 evaluations in a row "
                              "while the training loss fell &lt;overtraining&gt;.</div>")
    assert status.poll(service, third.cache).warnings is None  # shown once, not re-sent every poll


def test_poll_at_the_end_rereads_the_series_and_shows_the_result(tmp_path):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    j = job(losses=[(1, 1.0), (2, 0.8)], validation=[[0, 0.9]], best_step=0)
    snaps = [{"path": "/l/toy/r2/embeddings/toy-4.pt", "step": 4, "run": "20261126-101010", "val_loss": 0.5,
              "best": True},
             {"path": "/l/toy/r2/embeddings/toy-2.pt", "step": 2, "run": "20261126-101010", "val_loss": None,
              "best": False}]
    service = ScriptedService([j], snapshots={"toy": snaps})
    view = status.poll(service, None)
    assert view.snapshots is None and view.cache.active
    # the worker recorded step 4 and the validation at step 2, which an incremental read could have missed
    j.update(losses=[[1, 1.0], [2, 0.8], [3, 0.7], [4, 0.6]], validation=[[0, 0.9], [2, 0.55], [4, 0.5]],
             status="finished", active=False, step=4, best_step=4, message="Finished at step 4. Best step by "
             "validation loss: 4 (0.50000); its snapshot is /l/toy/r2/embeddings/toy-4.pt.",
             result={"status": "finished", "message": "Finished at step 4. Best step by validation loss: 4 (0.50000)"
                     "; its snapshot is /l/toy/r2/embeddings/toy-4.pt.", "best_step": 4, "best_val_loss": 0.5,
                     "best_snapshot": "/l/toy/r2/embeddings/toy-4.pt", "grid": str(grid), "log_dir": "/l/toy/r2",
                     "warnings": ["Vector norms reached 4.2× the vocabulary median."]})
    end = status.poll(service, view.cache)
    assert service.calls[-1] == ("train-1", 0)  # the whole series once more
    assert [r[:2] for r in end.chart if r[2] == status.VAL] == [(0, 0.9), (2, 0.55), (4, 0.5)]
    assert [r[0] for r in end.chart if r[2] == status.RAW] == [1, 2, 3, 4]
    assert end.result.splitlines() == [
        "Finished at step 4. Best step by validation loss: 4 (0.50000); its snapshot is /l/toy/r2/embeddings/toy-4.pt.",
        "Best step: 4 (validation loss 0.50000)", "⚠ Vector norms reached 4.2× the vocabulary median.",
        "Logs, snapshots and previews: /l/toy/r2"]
    assert end.grid == str(grid)
    assert end.snapshots == ["step 4 · val 0.5000 · best · run 20261126-101010", "step 2 · run 20261126-101010"]
    assert end.cache.result["best_snapshot"].endswith("toy-4.pt")
    later = status.poll(service, end.cache)
    assert (later.result, later.grid, later.snapshots, later.chart) == (None, None, None, None)

    # another page opening now sees the finished job at once, result included
    fresh = status.poll(service, None)
    assert fresh.result == end.result and fresh.grid == str(grid) and len(fresh.snapshots) == 2
    grid.unlink()  # a deleted log folder: no image (gradio would raise on the missing file)
    assert status.poll(service, None).grid == ""


def test_poll_a_grid_job_keeps_the_charts_and_shows_the_grid(tmp_path):
    grid = tmp_path / "toy-grid.png"
    grid.write_bytes(b"png")
    train = job(losses=[(1, 1.0)], status="finished", active=False, result={"message": "Finished at step 1."})
    service = ScriptedService([train])
    view = status.poll(service, None)
    rendering = job("grid-2", kind="grid", status="running", message="Rendering snapshot 1/3…", step=None,
                    loss=None, end_step=None, learn_rate=None, s_per_step=None, eta_s=None)
    service.jobs.append(rendering)
    during = status.poll(service, view.cache)
    assert during.status == "grid toy: running\nRendering snapshot 1/3…"
    assert during.chart is None and during.grid is None and during.cache.job == "train-1"  # the charts stay
    rendering.update(status="finished", active=False, result={"grid": str(grid)}, message="Grid saved.")
    done = status.poll(service, during.cache)
    assert done.grid == str(grid) and done.chart is None
    assert status.poll(service, done.cache).grid is None  # shown once


@pytest.mark.parametrize(("path", "name", "caption"), [
    ("/l/toy/images/toy-40.png", "toy", "step 40"),
    ("/l/toy/images/toy-40-2.png", "toy", "step 40 · prompt 2"),
    ("/l/x/images/tiext-ui-12345678-20.png", "tiext-ui-12345678", "step 20"),  # a name ending in digits
    ("/l/x/images/tiext-ui-12345678-20-3.png", "tiext-ui-12345678", "step 20 · prompt 3"),
    ("/l/x/images/other-20.png", "toy", "other-20"),
    ("/l/x/images/toy-final.png", "toy", "toy-final"),
])
def test_preview_captions(path, name, caption):
    assert status.preview_caption(path, name) == caption


def test_snapshot_labels_and_the_default_choice():
    snap = {"path": "/p/toy-400.pt", "step": 400, "run": "20261126-101010", "val_loss": 0.12344, "best": True}
    assert status.snapshot_label(snap) == "step 400 · val 0.1234 · best · run 20261126-101010"
    assert status.snapshot_label({**snap, "val_loss": None, "best": False}) == "step 400 · run 20261126-101010"

    class Broken:
        def snapshots(self, name):
            raise OSError("gone")

    assert status.snapshot_labels(Broken(), "toy") == [] and status.snapshot_labels(Broken(), None) == []


def test_promote_handlers_messages(tmp_path):
    snaps = [{"path": str(tmp_path / "toy-4.pt"), "step": 4, "run": "r1", "val_loss": 0.5, "best": True}]

    class Promoting(ScriptedService):
        def promote(self, name, snapshot):
            if name == "busy":
                raise TIError("'busy' is being trained; interrupt the training before promoting a snapshot.")
            self.promoted.append((name, snapshot))
            return {"message": f"'{name}' is now the step-4 snapshot (toy-4.pt); it is ready to use."}

    service = Promoting(snapshots={"toy": snaps, "busy": snaps})
    service.promoted = []
    label = status.snapshot_label(snaps[0])
    ok = handlers.promote_selected(service, "toy", label)
    assert ok.ok and ok.message.startswith("'toy' is now the step-4 snapshot")
    assert service.promoted == [("toy", str(tmp_path / "toy-4.pt"))]
    assert handlers.promote_selected(service, "toy", None).message == "Choose a snapshot to promote."
    gone = handlers.promote_selected(service, "toy", "step 9 · run r0")
    assert not gone.ok and "refresh the list" in gone.message
    assert not handlers.promote_selected(service, None, label).ok
    busy = handlers.promote_selected(service, "busy", label)
    assert not busy.ok and "is being trained" in busy.message

    best = handlers.promote_best(service, {"best_snapshot": snaps[0]["path"]}, "toy")
    assert best.ok and service.promoted[-1] == ("toy", snaps[0]["path"])
    assert "No finished training" in handlers.promote_best(service, {}, "toy").message
    none_kept = handlers.promote_best(service, {"message": "Finished.", "best_snapshot": None}, "toy")
    assert not none_kept.ok and "Validate every" in none_kept.message


def test_resume_and_grid_handlers(tmp_path):
    snaps = [{"path": str(tmp_path / "toy-4.pt"), "step": 4, "run": "r1", "val_loss": None, "best": False}]
    data = tmp_path / "data"
    data.mkdir()

    class Resuming(ScriptedService):
        def start_training(self, name, data_dir, params, resume_from=None):
            self.started.append((name, data_dir, params.max_steps, resume_from))
            return type("Job", (), {"id": "train-9", "name": name})()

        def check_dataset(self, *args, **kwargs):
            return {"summary": "4 usable images"}

        def embedding_path(self, name):
            raise TIError("no file")

        def start_grid(self, name, log_dir=None, prompts=""):
            if name == "none":
                raise TIError("'none' has no training runs under /logs.")
            return type("Job", (), {"id": "grid-3", "name": name, "message": "Comparison grid: 6 images × 20 "
                                    "sampling steps, about 2 min. Interrupt skips it."})()

    service = Resuming(snapshots={"toy": snaps})
    service.started = []
    values = values_of(TrainParams(max_steps=8), TRAIN_SPECS)
    out = handlers.resume_selected(service, "toy", str(data), TRAIN_SPECS, values, "", "step 4 · run r1")
    assert out.ok and "Resuming from toy-4.pt." in out.message, out.message
    assert service.started == [("toy", str(data), 8, str(tmp_path / "toy-4.pt"))]
    missing = handlers.resume_selected(service, "toy", str(data), TRAIN_SPECS, values, "", None)
    assert not missing.ok and "Choose a snapshot" in missing.message and len(service.started) == 1

    grid = handlers.render_grid(service, "toy")
    assert grid.ok and "(job grid-3)" in grid.message
    assert "6 images × 20 sampling steps, about 2 min. Interrupt skips it." in grid.message  # told before it runs
    assert handlers.render_grid(service, "none").message == "'none' has no training runs under /logs."


def test_preset_round_trip_through_control_values(tmp_path):
    service = stub_service(tmp_path)
    custom = TrainParams(learn_rate="0.05:10, 0.01", max_steps=42, tag_dropout=0.25, precision="bf16",
                         preview_prompt="a photo of toy\ntoy on a beach", preview_sampler="DDIM", val_every=5,
                         early_stop=True, norm_cap=3.5)
    # what gradio hands the handler: whole numbers as floats
    floats = [float(v) if type(v) is int else v for v in values_of(custom, TRAIN_SPECS)]
    saved = handlers.save_preset(service, " mine ", TRAIN_SPECS, floats, " /data/toy ", "blue bmw")
    assert saved.ok and saved.message == "Saved preset 'mine'."
    assert handlers.preset_names(service) == ["mine"]
    loaded = handlers.load_preset(service, "mine", TRAIN_SPECS)
    assert loaded.outcome.ok and (loaded.data_dir, loaded.subject) == ("/data/toy", "blue bmw")
    assert params_from_values(TrainParams, TRAIN_SPECS, loaded.values) == custom
    assert loaded.values == values_of(custom, TRAIN_SPECS)

    assert handlers.save_preset(service, "", TRAIN_SPECS, floats).message == "Enter a preset name."
    bad = list(floats)
    bad[[s.name for s in TRAIN_SPECS].index("tag_dropout")] = 3
    refused = handlers.save_preset(service, "bad", TRAIN_SPECS, bad)
    assert not refused.ok and "Tag dropout" in refused.message
    assert "use letters" in handlers.save_preset(service, "../x", TRAIN_SPECS, floats).message
    missing = handlers.load_preset(service, "ghost", TRAIN_SPECS)
    assert missing.values is None and "No preset named 'ghost'" in missing.outcome.message


def test_sampler_choices(tmp_path):
    class Host:
        def backend(self):
            return type("B", (), {"samplers": lambda self: ["Euler a", "DDIM"]})()

    class NoModel:
        def backend(self):
            raise RuntimeError("no model loaded")

    assert handlers.sampler_choices(Host(), host=True) == ["Euler a", "DDIM"]
    assert handlers.sampler_choices(NoModel(), host=True) == []


def test_format_duration():
    assert status.format_duration(3725) == "1:02:05"
    assert status.format_duration(float("inf")) == "?"


@pytest.mark.slow
def test_handlers_drive_a_real_training(tiny_backend, tmp_path, demo_data):
    """Create → Train → poll until done, through the handlers, on the embedded tiny model."""
    from textual_inversion_ext.service import Service

    service = Service(lambda: tiny_backend, tmp_path / "embeddings", tmp_path / "logs")
    outcome, names = handlers.create(service, CREATE_SPECS, create_values("toy"))
    assert outcome.ok and names == ["toy"]
    values = values_of(TrainParams(max_steps=5, save_every=0, preview_every=0, csv_every=1, comparison_grid=False),
                       TRAIN_SPECS)
    started = handlers.start_training(service, "toy", str(demo_data), TRAIN_SPECS, values)
    assert started.ok, started.message
    cache, deadline = None, time.time() + 600
    while time.time() < deadline:
        view = status.poll(service, cache)
        cache = view.cache
        if view.status.startswith("toy: finished"):
            break
        time.sleep(0.05)
    assert view.status.startswith("toy: finished · step 5/5"), view.status
    assert [s for s, _ in cache.raw] == [1, 2, 3, 4, 5]
