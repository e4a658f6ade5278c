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
from textual_inversion_ext.core.params import ParameterError, fields_of, param
from textual_inversion_ext.core.train_params import TrainParams
from textual_inversion_ext.ui import handlers, status
from textual_inversion_ext.ui.controls import (
    MAX_SLIDER_POSITIONS,
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
        else:
            assert spec.kind == expected[info.type]


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
    assert third.previews == [(str(three), "toy-3"), (str(two), "toy-2")]

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
    values = values_of(TrainParams(max_steps=5, save_every=0, preview_every=0, csv_every=1), TRAIN_SPECS)
    started = handlers.start_training(service, "toy", str(demo_data), TRAIN_SPECS, values)
    assert started.ok, started.message
    cache, deadline = None, time.time() + 120
    while time.time() < deadline:
        view = status.poll(service, cache)
        cache = view.cache
        if view.status.startswith("toy: finished"):
            break
        time.sleep(0.05)
    assert view.status.startswith("toy: finished · step 5/5"), view.status
    assert [s for s, _ in cache.raw] == [1, 2, 3, 4, 5]
