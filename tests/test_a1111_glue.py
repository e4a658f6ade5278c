"""The A1111 glue against a small fake `modules` package (tests/fake_host): settings mapping, hooks
on shared.state, model refusals, precision, callback registration. The real host: tests/host/."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.core.params import ParameterError
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.jobs import JobManager

FAKE_HOST = Path(__file__).parent / "fake_host"


def _drop_host_modules() -> None:
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]


@pytest.fixture
def host(monkeypatch, tmp_path):
    """Fresh fake host modules on sys.path; removed again afterwards."""
    _drop_host_modules()
    monkeypatch.syspath_prepend(str(FAKE_HOST))
    shared = importlib.import_module("modules.shared")
    importlib.import_module("modules.paths").data_path = str(tmp_path)
    shared.cmd_opts.embeddings_dir = str(tmp_path / "embeddings")
    from textual_inversion_ext.backends.a1111 import glue

    monkeypatch.setattr(glue, "_service", None)
    monkeypatch.setattr(glue, "_backend", None)
    yield SimpleNamespace(shared=shared, glue=glue, tmp=tmp_path)
    _drop_host_modules()


def test_options_registered_namespaced_in_our_section(host):
    from textual_inversion_ext.backends.a1111 import settings

    settings.register_options()
    labels = host.shared.opts.data_labels
    assert sorted(labels) == ["tiext_log_dir", "tiext_preview_every", "tiext_preview_steps", "tiext_save_every"]
    assert {(i.section, i.category_id) for i in labels.values()} == {
        (("textual_inversion_ext", "Textual Inversion (extension)"), "training")}


def test_host_and_our_settings_fill_train_params(host):
    from textual_inversion_ext.backends.a1111 import settings

    settings.register_options()
    # The host's defaults (its options are registered by the host itself; unset here = its defaults).
    assert settings.train_defaults() == {
        "offload_vae": False, "csv_every": 500, "attention_optimizations": False, "save_optimizer_state": False,
        "pin_memory": False, "save_every": 500, "preview_every": 500, "preview_steps": 20}
    opts = host.shared.opts
    opts.unload_models_when_training = True
    opts.training_write_csv_every = 1  # every step is allowed
    opts.training_xattention_optimizations = True
    opts.save_optimizer_state = True
    opts.pin_memory = True
    opts.tiext_save_every = 7
    opts.tiext_preview_every = 0
    opts.tiext_preview_steps = 5
    service = host.glue.get_service()
    params = service.train_params({"max_steps": 10})
    assert (params.offload_vae, params.csv_every, params.attention_optimizations, params.save_optimizer_state,
            params.pin_memory, params.save_every, params.preview_every, params.preview_steps) == (
                True, 1, True, True, True, 7, 0, 5)
    assert service.train_params({"csv_every": 3}).csv_every == 3  # a request's own value wins
    opts.training_write_csv_every = -1
    with pytest.raises(ParameterError, match="CSV every"):
        service.train_params({})


def test_log_root_default_setting_and_never_inside_embeddings(host):
    from textual_inversion_ext.backends.a1111 import settings

    emb = Path(host.shared.cmd_opts.embeddings_dir)
    assert settings.log_root(emb) == host.tmp / "textual_inversion_ext"
    host.shared.opts.tiext_log_dir = "ti-logs"
    assert settings.log_root(emb) == host.tmp / "ti-logs"
    host.shared.opts.tiext_log_dir = str(emb / "logs")
    assert settings.log_root(emb) == host.tmp / "textual_inversion_ext"
    # The service reads the setting again when a run starts.
    service = host.glue.get_service()
    host.shared.opts.tiext_log_dir = str(host.tmp / "elsewhere")
    service.before_training(TrainParams())
    assert service.log_root == host.tmp / "elsewhere"


def test_hooks_drive_shared_state_lock_and_interrupt(host):
    from modules import call_queue, progress

    from textual_inversion_ext.backends.a1111.hooks import host_hooks

    hooks = host_hooks()
    state = host.shared.state
    assert hooks.lock() is call_queue.queue_lock
    hooks.begin("train-1", 0)
    hooks.update(3, 30, "Step 3/30")
    assert (state.job, state.job_no, state.job_count, state.textinfo) == ("train-1", 3, 30, "Step 3/30")
    assert not hooks.host_interrupted()
    state.interrupted = True
    assert hooks.host_interrupted()
    hooks.end()
    assert state.calls == [("begin", "train-1"), ("end", "train-1")]
    assert progress.events[-2:] == [("start", "train-1"), ("finish", "train-1")]


def test_host_interrupt_button_stops_a_job(host):
    from textual_inversion_ext.backends.a1111.hooks import host_hooks

    jobs = JobManager(host_hooks())
    job = jobs.start("train", "toy", lambda job: {"status": "interrupted"} if job.stop.wait(10) else {})
    import time

    while host.shared.state.job != job.id:
        time.sleep(0.01)
    host.shared.state.interrupted = True  # the host's Interrupt button
    deadline = time.time() + 5
    while jobs.get(job.id).active and time.time() < deadline:
        time.sleep(0.02)
    assert jobs.get(job.id).status == "interrupted"
    assert host.shared.state.calls[-1][0] == "end"


@pytest.mark.parametrize(("model", "cmd", "message"), [
    (SimpleNamespace(is_sdxl=True, is_sd1=False, is_sd2=False), {}, "SDXL"),
    (SimpleNamespace(is_sdxl=False, is_sd1=True, is_sd2=False), {"lowvram": True}, "--lowvram"),
    (SimpleNamespace(is_sdxl=False, is_sd1=True, model=SimpleNamespace(conditioning_key="hybrid")), {},
     "Inpainting"),
    (SimpleNamespace(forge_objects=object()), {}, "Forge"),
    (None, {}, "No Stable Diffusion model"),
])
def test_unsupported_models_are_refused_clearly(host, monkeypatch, model, cmd, message):
    from textual_inversion_ext.backends.a1111.backend import A1111Backend

    for key, value in cmd.items():
        monkeypatch.setattr(host.shared.cmd_opts, key, value)
    host.shared.sd_model = model
    with pytest.raises(ModelError, match=message):
        A1111Backend()


def test_medvram_is_allowed(host, monkeypatch):
    from textual_inversion_ext.backends.a1111.backend import check_supported

    monkeypatch.setattr(host.shared.cmd_opts, "medvram", True)
    assert check_supported(SimpleNamespace(is_sdxl=False, is_sd1=True, is_sd2=False), host.shared.cmd_opts) == "sd1"
    assert check_supported(SimpleNamespace(is_sdxl=False, is_sd1=False, is_sd2=True), host.shared.cmd_opts) == "sd2"


def test_auto_precision_follows_the_host_dtype(host, monkeypatch):
    from modules import devices

    glue = host.glue
    assert glue.host_precision(TrainParams()).precision == "fp32"  # CPU
    monkeypatch.setattr(devices, "device", torch.device("cuda"))
    monkeypatch.setattr(devices, "dtype", torch.float16)
    assert glue.host_precision(TrainParams()).precision == "fp16"  # the host's half model
    monkeypatch.setattr(devices, "dtype", torch.float32)
    assert glue.host_precision(TrainParams()).precision == "fp32"  # --no-half
    assert glue.host_precision(TrainParams(precision="bf16")).precision == "bf16"  # explicit wins


def test_register_adds_callbacks_and_tabs_wrap_a_blocks(host, monkeypatch):
    from modules import script_callbacks

    glue = host.glue
    glue.register()
    assert [len(v) for v in script_callbacks.registered.values()] == [1, 1, 1]
    blocks = object()
    monkeypatch.setitem(sys.modules, "textual_inversion_ext.ui", SimpleNamespace(build_tabs=lambda s: blocks))
    assert glue.on_ui_tabs() == [(blocks, "Textual Inversion", "textual_inversion_ext")]
    monkeypatch.setitem(sys.modules, "textual_inversion_ext.ui", None)  # not installed: ImportError
    assert glue.on_ui_tabs() == []


def test_api_auth_credentials_like_the_host():
    from textual_inversion_ext.backends.a1111.glue import parse_credentials

    assert parse_credentials("alice:secret, bob:p:w") == {"alice": "secret", "bob": "p:w"}
