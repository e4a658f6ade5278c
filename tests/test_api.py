"""The REST handlers over a Service on the tiny standalone model (no FastAPI needed)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from textual_inversion_ext import api
from textual_inversion_ext.api_access import ApiAccess, exposure, exposure_refusal
from textual_inversion_ext.service import Service


def call(service: Service, handler, body=None) -> tuple[int, dict]:
    return api.dispatch(handler, service, body)


def wait(service: Service, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body = call(service, api.job, {"id": job_id})
        assert status == 200
        if not body["active"]:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running")


def test_version_and_schema(service):
    assert call(service, api.version) == (200, {"name": "textual_inversion_ext", "version": api.__version__,
                                                "api": "v1"})
    status, schema = call(service, api.schema)
    assert status == 200
    assert schema["train"]["required"] == ["name", "data_dir"]
    assert schema["train"]["properties"]["max_steps"]["type"] == "integer"
    assert schema["create"]["properties"]["init_mode"]["enum"] == ["pool", "truncate", "spread", "zeros"]


def test_schema_shows_host_defaults(tiny_backend, tmp_path):
    svc = Service(backend=lambda: tiny_backend, embeddings_dir=tmp_path, log_root=tmp_path / "logs",
                  train_defaults=lambda: {"csv_every": 1})
    assert call(svc, api.schema)[1]["train"]["properties"]["csv_every"]["default"] == 1


def test_create_conflict_and_validation(service):
    status, body = call(service, api.create, {"name": "toy", "init_text": "red robot"})
    assert status == 200 and body["vectors"] == 2 and body["dims"] == {"default": 64}
    assert call(service, api.create, {"name": "toy"})[0] == 409
    assert call(service, api.create, {"name": "toy", "overwrite": True})[0] == 200
    status, body = call(service, api.create, {"name": "x", "num_vectors": "3"})
    assert status == 422 and "num_vectors" in body["error"]
    status, body = call(service, api.create, {"name": "x", "colour": "red"})
    assert status == 422 and "colour" in body["error"]
    status, body = call(service, api.create, {"name": "x", "num_vectors": 99})
    assert status == 422 and "at most" in body["error"]
    assert call(service, api.create, {"name": "../evil"})[0] == 400  # an invalid name: a TIError
    assert call(service, api.create, ["not", "an", "object"])[0] == 422


def test_train_poll_since_step_and_embeddings(service, demo_data):
    call(service, api.create, {"name": "toy", "init_text": "red robot"})
    status, body = call(service, api.train, {"name": "toy", "data_dir": str(demo_data), "max_steps": 5,
                                              "save_every": 0, "preview_every": 0})
    assert status == 200, body
    done = wait(service, body["job_id"])
    assert done["status"] == "finished" and done["step"] == 5
    status, later = call(service, api.job, {"id": body["job_id"], "since_step": "3"})
    assert [s for s, _ in later["losses"]] == [4, 5]
    assert call(service, api.current_job)[1]["id"] == body["job_id"]  # the latest when none runs
    listed = call(service, api.embeddings)[1]["embeddings"]
    assert [(e["name"], e["step"], e["vectors"], e["dims"]) for e in listed] == [("toy", 5, 2, {"default": 64})]


def test_train_errors(service, demo_data):
    call(service, api.create, {"name": "toy"})
    assert call(service, api.train, {"name": "nope", "data_dir": str(demo_data)})[0] == 404
    assert call(service, api.train, {"name": "toy"})[0] == 422
    status, body = call(service, api.train, {"name": "toy", "data_dir": str(demo_data), "max_steps": 0})
    assert status == 422 and "Max steps" in body["error"]
    status, body = call(service, api.train, {"name": "toy", "data_dir": str(demo_data), "batch_size": 1.5})
    assert status == 422 and "batch_size" in body["error"]
    status, body = call(service, api.train, {"name": "toy", "data_dir": str(demo_data), "learn_rat": "0.1"})
    assert status == 422 and "learn_rat" in body["error"]
    assert call(service, api.train, {"name": "toy", "data_dir": "/no/such/folder"})[0] == 400
    assert call(service, api.job, {"id": "train-999"})[0] == 404
    assert call(service, api.job, {"id": "x", "since_step": "soon"})[0] == 422


def test_busy_is_409_and_interrupt(service, demo_data):
    call(service, api.create, {"name": "toy"})
    release = threading.Event()
    running = service.jobs.start("train", "other", lambda job: release.wait(30) and {})
    try:
        status, body = call(service, api.train, {"name": "toy", "data_dir": str(demo_data)})
        assert status == 409 and "other" in body["error"]
        status, body = call(service, api.interrupt, {})
        assert status == 200 and body["id"] == running.id
        assert running.stop.is_set()
    finally:
        release.set()
    assert call(service, api.interrupt, {"id": "train-999"})[0] == 404


def test_unexpected_failure_is_json_500_without_trace(service):
    def broken(service, body):
        raise KeyError("boom")

    status, body = call(service, broken, {})
    assert status == 500 and body == {"error": "KeyError: 'boom'"}


def test_non_finite_numbers_become_null(service):
    assert call(service, lambda s, b: {"loss": float("nan"), "xs": [1.0, float("inf")]}) == (
        200, {"loss": None, "xs": [1.0, None]})


# ------------------------------------------------------------------ access: folder roots, exposure (issue 12.1)

SETTING = "the allow-list setting"


@pytest.fixture
def guarded(service, demo_data, tmp_path):
    """An allowed root holding a dataset, a folder outside every root, and escapes from the root to it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    shutil.copytree(demo_data, allowed / "data")
    shutil.copytree(demo_data, outside)
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    (outside / "template.txt").write_text("a photo of [name]\n")
    call(service, api.create, {"name": "toy"})
    access = ApiAccess(roots=lambda: [allowed, service.embeddings_dir, service.log_root], setting=SETTING)
    escapes = {"outside": str(outside), "dotdot": str(allowed / "data" / ".." / ".." / "outside"),
               "symlink": str(allowed / "link")}
    return SimpleNamespace(service=service, access=access, allowed=allowed, outside=outside, escapes=escapes,
                           data=str(allowed / "data"))


# (handler, body with PATH where the path goes, the path's leaf under the escaped folder): every path field.
PATH_FIELDS = {
    "train.data_dir": (api.train, {"name": "toy", "data_dir": "PATH"}, ""),
    "train.resume_from": (api.train, {"name": "toy", "data_dir": "DATA", "resume_from": "PATH"}, "0.png"),
    "train.template": (api.train, {"name": "toy", "data_dir": "DATA", "template": "PATH"}, "template.txt"),
    "preprocess.source": (api.preprocess, {"source": "PATH", "width": 64, "height": 64}, ""),
    "preprocess.destination": (api.preprocess, {"source": "DATA", "destination": "PATH", "width": 64,
                                                "height": 64}, "out"),
    "check.folder": (api.check, {"folder": "PATH"}, ""),
    "captions.folder": (api.captions, {"folder": "PATH"}, ""),
    "caption_edit.folder": (api.caption_edit, {"folder": "PATH", "op": "append", "text": "pwned"}, ""),
    "caption_tags.folder": (api.caption_tags, {"folder": "PATH"}, ""),
    "promote.snapshot": (api.promote, {"name": "toy", "snapshot": "PATH"}, "toy-1.pt"),
    "grid.log_dir": (api.grid, {"name": "toy", "log_dir": "PATH"}, ""),
    "create_hints.template": (api.create_hints, {"name": "x", "template": "PATH"}, "template.txt"),
}


def _fill(body: dict, path: str, data: str) -> dict:
    return {k: path if v == "PATH" else data if v == "DATA" else v for k, v in body.items()}


def _snapshot_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("escape", ["outside", "dotdot", "symlink"])
@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_every_path_field_is_refused_outside_the_roots(guarded, field, escape):
    handler, body, leaf = PATH_FIELDS[field]
    outside_before = _snapshot_of(guarded.outside)
    (guarded.outside / "toy-1.pt").write_bytes((guarded.service.embeddings_dir / "toy.pt").read_bytes())
    path = str(Path(guarded.escapes[escape]) / leaf) if leaf else guarded.escapes[escape]
    status, reply = api.dispatch(handler, guarded.service, _fill(body, path, guarded.data), guarded.access)
    assert status == 403, reply
    key = field.split(".")[1]
    assert reply["error"].startswith(f"{key} {path!r} is outside the folders this API may use")
    assert SETTING in reply["error"] and str(guarded.allowed) in reply["error"]  # what to change, and where
    (guarded.outside / "toy-1.pt").unlink()
    assert _snapshot_of(guarded.outside) == outside_before  # nothing written there
    assert guarded.service.jobs.current() is None  # no job started


@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_the_same_fields_pass_inside_the_roots(guarded, field):
    """The control: inside a root (here through `..` that stays inside) the guard lets the handler decide."""
    handler, body, leaf = PATH_FIELDS[field]
    inside = guarded.allowed / "data" / ".." / "inside"
    (guarded.allowed / "inside").mkdir()
    path = str(inside / leaf) if leaf else str(inside)
    body = {**_fill(body, path, guarded.data), "max_steps": 1} if handler is api.train else _fill(
        body, path, guarded.data)
    status, reply = api.dispatch(handler, guarded.service, body, guarded.access)
    assert status != 403, reply
    _wait_idle(guarded)


def _wait_idle(guarded, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while guarded.service.jobs.current() is not None and time.time() < deadline:
        time.sleep(0.05)


def test_paths_reach_the_handler_resolved(guarded, monkeypatch):
    seen = {}
    monkeypatch.setattr(guarded.service, "check_dataset", lambda folder, *a: seen.setdefault("folder", folder) and {})
    link = guarded.allowed / "data-link"
    link.symlink_to(guarded.allowed / "data")
    api.dispatch(api.check, guarded.service, {"folder": str(link / ".." / "data-link")}, guarded.access)
    assert seen["folder"] == str((guarded.allowed / "data").resolve())  # what was checked is what is used


def test_default_preprocess_destination_is_checked_too(guarded):
    """`<source>-Processed` is the source's sibling: a source that is a root would write beside the root."""
    status, reply = api.dispatch(api.preprocess, guarded.service, {"source": str(guarded.allowed)}, guarded.access)
    assert status == 403 and reply["error"].startswith("destination ")
    assert not (guarded.allowed.parent / "allowed-Processed").exists()


def test_unresolvable_paths_are_refused_not_a_500(guarded):
    loop = guarded.allowed / "loop"
    loop.symlink_to(loop)
    for bad in (str(loop / "x"), str(guarded.allowed / "nul\0byte")):
        status, reply = api.dispatch(api.check, guarded.service, {"folder": bad}, guarded.access)
        assert status == 403 and "cannot be resolved" in reply["error"], reply


def test_template_names_are_not_paths(guarded):
    status, reply = api.dispatch(api.create_hints, guarded.service, {"name": "x", "template": "subject"},
                                 guarded.access)
    assert status == 200, reply


def test_write_routes_refused_when_exposed_without_auth(guarded):
    refusal = "Reachable beyond loopback with no password."
    access = ApiAccess(roots=guarded.access.roots, setting=SETTING, write_refusal=refusal)
    writes = {api.create: {"name": "new"}, api.train: {"name": "toy", "data_dir": guarded.data},
              api.preprocess: {"source": guarded.data}, api.caption_edit: {"folder": guarded.data, "op": "undo"},
              api.promote: {"name": "toy", "snapshot": "x"}, api.grid: {"name": "toy"},
              api.preset_save: {"preset": "p"}, api.interrupt: {}}
    assert set(writes) == api.WRITES
    for handler, body in writes.items():
        assert api.dispatch(handler, guarded.service, body, access) == (403, {"error": refusal}), handler
    assert not (guarded.service.embeddings_dir / "new.pt").exists() and guarded.service.jobs.current() is None
    for handler, body in [(api.version, {}), (api.embeddings, {}), (api.check, {"folder": guarded.data}),
                          (api.caption_tags, {"folder": guarded.data}), (api.snapshots, {"name": "toy"})]:
        assert api.dispatch(handler, guarded.service, body, access)[0] == 200, handler  # reading still works


@pytest.mark.parametrize(("flags", "exposed"), [
    ({}, []),
    ({"listen": True}, ["--listen"]),
    ({"server_name": "0.0.0.0"}, ["--server-name 0.0.0.0"]),
    ({"server_name": "my-box.lan"}, ["--server-name my-box.lan"]),
    ({"listen": True, "server_name": "127.0.0.1"}, []),  # --server-name wins over --listen, as in the host
    ({"server_name": "localhost"}, []),
    ({"server_name": "::1"}, []),
    ({"server_name": "127.0.0.2"}, []),
    ({"share": True}, ["--share"]),
    ({"ngrok": "token"}, ["--ngrok"]),
])
def test_exposure_follows_how_the_host_binds(flags, exposed):
    assert exposure(**flags) == exposed
    cmd_opts = SimpleNamespace(**flags, api_auth=None)
    assert (exposure_refusal(cmd_opts) is None) == (not exposed)
    assert exposure_refusal(SimpleNamespace(**flags, api_auth="me:pw")) is None  # a password: writes allowed
    if exposed:
        assert exposed[0] in exposure_refusal(cmd_opts) and "--api-auth" in exposure_refusal(cmd_opts)


def test_no_access_means_no_checks(service, tmp_path):
    """Standalone callers (no ApiAccess) keep the old behaviour: the service's own checks only."""
    assert api.dispatch(api.check, service, {"folder": str(tmp_path / "nowhere")})[0] == 400


def test_no_debug_routes_or_failure_hooks_in_the_package():
    """Faults are injected from the test side (tests/_faults.py, tests/host/fault_ext), never shipped (issue 12.8)."""
    assert not [path for _, path, _ in api.ROUTES if "debug" in path]
    package = Path(api.__file__).parent
    hooks = ("TIEXT_DEBUG", "fail_after_losses", "arm_failure", "debug_state", "_loss_calls", "debug_fail")
    found = [(p.name, h) for p in package.rglob("*.py") for h in hooks if h in p.read_text(encoding="utf-8")]
    assert found == []
