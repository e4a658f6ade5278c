"""Training through our REST API inside the real A1111 host (WEBUI_DIR; the extension linked in, and the
test-only extension tests/host/fault_ext for the fault-injection and model-state routes)."""

from __future__ import annotations

import csv
import json
import shutil
import time
import urllib.error
from pathlib import Path

import pytest
from PIL import Image

from textual_inversion_ext.core import formats

V1 = "/textual-inversion-ext/v1"


def tiext(api, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
    try:
        return 200, api.call(method, V1 + path, body)
    except urllib.error.HTTPError as exc:  # our errors are JSON with a 4xx status
        return exc.code, json.loads(exc.read().decode())


def wait(api, job_id: str, timeout: float = 900) -> dict:  # generous: the lab shares 2 cores
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, job = tiext(api, "GET", f"/jobs/{job_id}")
        assert status == 200, job
        if not job["active"]:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture
def embedding(host_api, host_dir):
    """A fresh 2-vector embedding in the host's embeddings folder, removed afterwards."""
    name = f"tiext-host-{int(time.time() * 1000) % 10**8}"
    status, body = tiext(host_api, "POST", "/create", {"name": name, "init_text": "red circle"})
    assert status == 200, body
    yield name
    for path in (host_dir / "embeddings").glob(f"{name}.pt*"):
        path.unlink()
    shutil.rmtree(host_dir / "textual_inversion_ext" / name, ignore_errors=True)  # its run logs (default root)
    host_api.call("POST", "/sdapi/v1/refresh-embeddings")


def model_state(api) -> dict | None:
    """The host's model as the test-only extension sees it (tests/host/fault_ext), None when it is not linked."""
    try:
        return api.call("GET", "/tiext-test/model")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


FAST = {"resolution": 64, "save_every": 0, "preview_every": 0, "csv_every": 1, "comparison_grid": False}


def test_train_finishes_and_host_uses_the_embedding(host_api, host_dir, embedding, dataset):
    status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset), "max_steps": 30,
                                                       **FAST, "preview_every": 15, "preview_steps": 3})
    assert status == 200, body
    frozen_seen = None
    watch = model_state(host_api) is not None
    while watch:  # while it trains, the UNet must be frozen
        state = model_state(host_api)
        job = tiext(host_api, "GET", "/jobs/current")[1]
        if state["embedding_registered"]:
            frozen_seen = state["unet_trainable_tensors"]
            break
        if not job["active"]:
            break
        time.sleep(0.05)
    job = wait(host_api, body["job_id"])
    assert job["status"] == "finished", job
    assert job["step"] == 30 and [s for s, _ in job["losses"]][-1] == 30
    assert len(job["previews"]) == 2 and all(Path(p).is_file() for p in job["previews"])
    log_dir = Path(job["result"]["log_dir"])
    assert (host_dir / "embeddings") not in log_dir.parents  # logs never land in the embeddings folder
    path = host_dir / "embeddings" / f"{embedding}.pt"
    saved = formats.load_embedding(path).embedding
    assert saved.step == 30 and saved.num_vectors == 2
    loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[embedding]["vectors"] == 2 and loaded[embedding]["step"] == 30
    result = host_api.call("POST", "/sdapi/v1/txt2img", {"prompt": f"a photo of {embedding}", "steps": 2,
                                                         "width": 64, "height": 64, "seed": 1})
    assert result["images"] and f"{embedding}: " in json.loads(result["info"])["infotexts"][0]
    if watch:
        assert frozen_seen == 0, "UNet weights were trainable during training (or never seen registered)"
        after = model_state(host_api)
        assert after["unet_trainable_tensors"] > 0 and not after["embedding_registered"]  # restored


def test_interrupt_saves_and_second_request_is_409(host_api, host_dir, embedding, dataset):
    status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset),
                                                       "max_steps": 100000, **FAST})
    assert status == 200, body
    while (tiext(host_api, "GET", "/jobs/current")[1].get("step") or 0) < 3:
        time.sleep(0.1)
    status, busy = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset)})
    assert status == 409 and embedding in busy["error"]
    status, _ = tiext(host_api, "POST", "/interrupt", {})
    assert status == 200
    job = wait(host_api, body["job_id"])
    assert job["status"] == "interrupted" and job["step"] >= 3
    saved = formats.load_embedding(host_dir / "embeddings" / f"{embedding}.pt").embedding
    assert saved.step == job["step"]
    loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[embedding]["step"] == job["step"]


def test_host_interrupt_button_stops_our_job(host_api, embedding, dataset):
    status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset),
                                                       "max_steps": 100000, **FAST})
    assert status == 200, body
    while (tiext(host_api, "GET", "/jobs/current")[1].get("step") or 0) < 2:
        time.sleep(0.1)
    progress = host_api.call("GET", "/sdapi/v1/progress?skip_current_image=true")
    assert progress["state"]["job"] == body["job_id"] and progress["state"]["job_count"] == 100000
    host_api.call("POST", "/sdapi/v1/interrupt")
    assert wait(host_api, body["job_id"])["status"] == "interrupted"


def test_error_inside_the_loop_saves_and_reports(host_api, faults, host_dir, embedding, dataset):
    assert host_api.call("POST", "/tiext-test/fail", {"after": 5}) == {"armed": True, "after": 5}
    status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset), "max_steps": 30,
                                                       **FAST})
    assert status == 200, body
    job = wait(host_api, body["job_id"])
    assert job["status"] == "error" and "injected failure" in job["message"] and "step 5" in job["message"]
    saved = formats.load_embedding(host_dir / "embeddings" / f"{embedding}.pt").embedding
    assert saved.step == 5
    state = model_state(host_api)
    assert state["unet_trainable_tensors"] > 0 and not state["embedding_registered"]  # restored on error too


# Defaults to restore when an option was never saved (GET /sdapi/v1/options omits those).
DEFAULTS = {"training_write_csv_every": 500, "tiext_save_every": 500, "save_optimizer_state": False,
            "training_xattention_optimizations": False}


def _set_options(api, values: dict) -> dict:
    current = api.call("GET", "/sdapi/v1/options")
    api.call("POST", "/sdapi/v1/options", values)
    return {k: current.get(k, DEFAULTS[k]) if current.get(k) is not None else DEFAULTS[k] for k in values}


def test_settings_change_what_training_does(host_api, host_dir, embedding, dataset):
    old = _set_options(host_api, {"training_write_csv_every": 2, "tiext_save_every": 4, "save_optimizer_state": True,
                                  "training_xattention_optimizations": False})
    try:
        status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset),
                                                           "max_steps": 8, "resolution": 64, "preview_every": 0})
        assert status == 200, body
        job = wait(host_api, body["job_id"])
        assert job["status"] == "finished", job
        log_dir = Path(job["result"]["log_dir"])
        with open(log_dir / "textual_inversion_loss.csv") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 6, 8]  # training_write_csv_every
        snapshots = {p.name for p in (log_dir / "embeddings").glob("*.pt")}
        assert {f"{embedding}-4.pt", f"{embedding}-8.pt"} <= snapshots  # tiext_save_every
        assert snapshots <= {f"{embedding}-{step}.pt" for step in range(9)}  # + the start and the best step
        assert (host_dir / "embeddings" / f"{embedding}.pt.optim").is_file()  # save_optimizer_state
        run_record = json.loads((log_dir / "run.json").read_text())
        record = run_record["params"]
        assert record["attention_optimizations"] is False and record["precision"] == "auto"
        # the host on CPU runs --no-half: fp32 weights, so 'auto' is plain fp32 (core's resolve_precision)
        assert run_record["precision"] == {"requested": "auto", "weights": "fp32", "autocast": None,
                                           "grad_scaler": False}
    finally:
        _set_options(host_api, old)


def test_validation_best_step_grid_and_promote_in_the_host(host_api, host_dir, embedding, dataset):
    """Validation loss and best step in the real host, the comparison grid rendered by the host's sampler
    after training, and promote: the host loads the promoted step at once."""
    status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(dataset), "max_steps": 8,
                                                       **FAST, "save_every": 4, "val_every": 2, "val_budget": 0,
                                                       "preview_every": 4,
                                                       "comparison_grid": True, "preview_steps": 2,
                                                       "preview_sampler": "Euler",
                                                       "preview_prompt": f"a photo of {embedding}"})
    assert status == 200, body
    job = wait(host_api, body["job_id"])
    assert job["status"] == "finished", job
    assert [s for s, _ in job["validation"]] == [0, 2, 4, 6, 8]
    # previews come from the host's own sampler, and keep its infotext
    assert "Sampler: Euler," in Image.open(job["previews"][0]).info["parameters"]
    result = job["result"]
    assert result["best_step"] == min(job["validation"], key=lambda sv: sv[1])[0]
    log_dir = Path(result["log_dir"])
    with open(log_dir / "textual_inversion_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [2, 4, 6, 8]
    grid = Image.open(result["grid"])
    assert grid.width > 3 * 64 and grid.height > 64  # start, step 4, step 8 (+ best) columns
    state = model_state(host_api)
    if state is not None:  # the grid was rendered after the session: the host's DB is left as it was
        assert not state["embedding_registered"]
    assert json.loads((host_dir / "embeddings" / f"{embedding}.pt.json").read_text())["saved"]["step"] == 8
    snaps = tiext(host_api, "GET", f"/snapshots?name={embedding}")[1]["snapshots"]
    four = next(s for s in snaps if s["step"] == 4)
    status, promoted = tiext(host_api, "POST", "/promote", {"name": embedding, "snapshot": four["path"]})
    assert status == 200 and promoted["step"] == 4, promoted
    loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[embedding]["step"] == 4  # the host reloaded its embeddings
