"""The REST handlers over a Service on the tiny standalone model (no FastAPI needed)."""

from __future__ import annotations

import threading
import time

from textual_inversion_ext import api
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
