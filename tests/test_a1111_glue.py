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
    assert sorted(labels) == ["tiext_api_roots", "tiext_log_dir", "tiext_preview_every", "tiext_preview_steps",
                              "tiext_save_every"]
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


def _sdxl_refiner() -> SimpleNamespace:
    """An SDXL-family model whose conditioner has only the clip_g text encoder (as the refiner)."""
    table = SimpleNamespace(textual_inversion_key="clip_g", wrapped=torch.nn.Embedding(4, 1280))
    clip_g = SimpleNamespace(encode_embedding_init_text=None, wrapped=SimpleNamespace(
        model=SimpleNamespace(token_embedding=table)))
    return SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=[clip_g, SimpleNamespace()]),
                           model=SimpleNamespace(diffusion_model=SimpleNamespace(in_channels=4)))


@pytest.mark.parametrize(("model", "cmd", "message"), [
    (_sdxl_refiner(), {}, "refiner"),
    (SimpleNamespace(is_sdxl=True, model=SimpleNamespace(diffusion_model=SimpleNamespace(in_channels=9))), {},
     "SDXL inpainting"),
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


def _sd1_model(dtype: torch.dtype) -> SimpleNamespace:
    """Enough of a host SD1 model for A1111Backend's set-up: the CLIP token table in the loaded dtype."""
    table = torch.nn.Embedding(16, 8).to(dtype)
    text_model = SimpleNamespace(embeddings=SimpleNamespace(token_embedding=table))
    return SimpleNamespace(is_sdxl=False, is_sd1=True, is_sd2=False,
                           cond_stage_model=SimpleNamespace(transformer=SimpleNamespace(text_model=text_model)))


def test_precision_follows_the_dtype_the_host_loaded(host, monkeypatch):
    """The backend reports the host's weight dtype; core's resolve_precision decides (no host-side rewrite)."""
    from modules import devices

    from textual_inversion_ext.backends.a1111.backend import A1111Backend
    from textual_inversion_ext.core.training.precision import resolve_precision

    assert host.glue.get_service().before_training(TrainParams()).precision == "auto"  # left to the core
    monkeypatch.setattr(devices, "device", torch.device("cuda"))
    half = A1111Backend(_sd1_model(torch.float16))  # the host's default half model
    assert half.weight_dtype == torch.float16
    assert resolve_precision(TrainParams(), half).autocast == torch.float16
    with pytest.raises(ParameterError, match=r"loaded in fp16.*--no-half"):  # was: fp16 weights, no autocast
        resolve_precision(TrainParams(precision="fp32"), half)
    full = A1111Backend(_sd1_model(torch.float32))  # --no-half
    assert resolve_precision(TrainParams(), full).autocast is None


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


# ------------------------------------------------------------------ REST exposure (issue 12.1)


@pytest.fixture
def registered(host, monkeypatch):
    """on_app_started with register_routes recorded instead of needing FastAPI: [(service, access), ...]."""
    from textual_inversion_ext import api

    calls = []
    monkeypatch.setattr(api, "register_routes", lambda app, service, dependencies=(), *, access=None:
                        calls.append((service, access)))
    return calls


@pytest.mark.parametrize(("flags", "served"), [({}, False), ({"api": True}, True), ({"nowebui": True}, True)])
def test_routes_registered_only_with_api_like_the_hosts(host, registered, monkeypatch, flags, served):
    for key, value in flags.items():
        monkeypatch.setattr(host.shared.cmd_opts, key, value, raising=False)
    host.glue.on_app_started(None, object())
    assert len(registered) == (1 if served else 0)


def test_api_roots_are_the_hosts_folders_and_the_setting(host, registered, monkeypatch):
    from textual_inversion_ext.backends.a1111 import settings

    monkeypatch.setattr(host.shared.cmd_opts, "api", True, raising=False)
    settings.register_options()
    host.glue.on_app_started(None, object())
    (_service, access), = registered
    emb = Path(host.shared.cmd_opts.embeddings_dir)
    assert access.roots() == [host.tmp, emb, host.tmp / "textual_inversion_ext"]
    assert access.write_refusal is None  # 127.0.0.1 only
    host.shared.opts.tiext_api_roots = " /srv/datasets ; ~/pictures\nrelative ;"  # read per request
    assert access.roots()[3:] == [Path("/srv/datasets"), Path.home() / "pictures", host.tmp / "relative"]
    status, reply = api_dispatch(access, host.tmp.parent / "elsewhere")
    assert status == 403 and "tiext_api_roots" in reply["error"] and "Textual Inversion (extension)" in reply["error"]


def api_dispatch(access, folder):
    from textual_inversion_ext import api

    return api.dispatch(api.caption_tags, None, {"folder": str(folder)}, access)


@pytest.mark.parametrize(("flags", "refused"), [
    ({"listen": True}, True), ({"share": True}, True), ({"server_name": "0.0.0.0"}, True),
    ({"listen": True, "api_auth": "me:pw"}, False), ({"server_name": "127.0.0.1"}, False),
])
def test_write_routes_refused_when_listening_beyond_loopback_without_api_auth(host, registered, monkeypatch,
                                                                               flags, refused):
    monkeypatch.setattr(host.shared.cmd_opts, "api", True, raising=False)
    monkeypatch.setattr(host.glue, "api_dependencies", list)  # basic auth needs FastAPI; tested on the host
    for key, value in flags.items():
        monkeypatch.setattr(host.shared.cmd_opts, key, value, raising=False)
    host.glue.on_app_started(None, object())
    (_service, access), = registered
    assert (access.write_refusal is not None) == refused
    if refused:
        assert "--api-auth" in access.write_refusal

