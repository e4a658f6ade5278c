"""SDXL in the real A1111 host: create, train, interrupt and fail on the loaded tiny SDXL checkpoint (host-lab
`SDXL=1 ./build.sh`: real-shape clip_l and clip_g, a tiny sgm UNet), switched to through the host's API."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from textual_inversion_ext.core import formats

from .conftest import checkpoint_loaded
from .test_host_training import FAST, model_state, tiext, wait

SD1_CHECKPOINT = "tiny-sd1.safetensors"


@pytest.fixture
def sdxl_embedding(sdxl_host, host_dir):
    """A fresh 2-vector SDXL embedding (`.safetensors`, clip_l + clip_g) made by our create route."""
    name = f"tiext-sdxl-{int(time.time() * 1000) % 10**8}"
    status, body = tiext(sdxl_host, "POST", "/create", {"name": name, "init_text": "red circle"})
    assert status == 200, body
    assert body["dims"] == {"clip_l": 768, "clip_g": 1280} and body["file"].endswith(f"{name}.safetensors")
    yield name
    for path in (host_dir / "embeddings").glob(f"{name}*.safetensors*"):
        path.unlink()
    shutil.rmtree(host_dir / "textual_inversion_ext" / name, ignore_errors=True)
    sdxl_host.call("POST", "/sdapi/v1/refresh-embeddings")


def _sdxl_file(host_dir: Path, name: str) -> dict[str, torch.Tensor]:
    vectors = formats.load_embedding(host_dir / "embeddings" / f"{name}.safetensors").embedding.vectors
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    return vectors


def test_sdxl_create_train_and_generate_on_the_loaded_model(sdxl_host, faults, host_dir, sdxl_embedding, dataset):
    api, name = sdxl_host, sdxl_embedding
    created = _sdxl_file(host_dir, name)
    before = model_state(api)
    status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 30,
                                                 **FAST, "preview_every": 15, "preview_steps": 2})
    assert status == 200, body
    during = None
    while during is None:  # while it trains: every model weight frozen, our vectors registered in the host
        state, job = model_state(api), tiext(api, "GET", "/jobs/current")[1]
        if state["embedding_registered"]:
            during = state
        elif not job["active"]:
            break
        time.sleep(0.05)
    job = wait(api, body["job_id"])
    assert job["status"] == "finished", job
    assert job["step"] == 30 and len(job["previews"]) == 2 and all(Path(p).is_file() for p in job["previews"])
    assert during is not None, "our embedding was never seen registered in the host during training"
    assert during["unet_trainable_tensors"] == 0 and during["text_encoder_trainable_tensors"] == 0
    after = model_state(api)
    assert after == before  # the host's model as it was: trainable flags, VAE device, nothing registered

    trained = _sdxl_file(host_dir, name)
    for key in ("clip_l", "clip_g"):  # both encoders' rows learned
        assert not torch.allclose(trained[key], created[key]), key
    loaded = api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[name]["shape"] == 2048 and loaded[name]["vectors"] == 2
    result = api.call("POST", "/sdapi/v1/txt2img", {"prompt": f"a photo of {name}", "steps": 2,
                                                    "width": 64, "height": 64, "seed": 1})
    assert result["images"] and f"{name}: " in json.loads(result["info"])["infotexts"][0]  # TI hashes


def test_sdxl_interrupt_leaves_a_loadable_embedding(sdxl_host, host_dir, sdxl_embedding, dataset):
    api, name = sdxl_host, sdxl_embedding
    status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 100000,
                                                 **FAST})
    assert status == 200, body
    while (tiext(api, "GET", "/jobs/current")[1].get("step") or 0) < 2:
        time.sleep(0.1)
    assert tiext(api, "POST", "/interrupt", {})[0] == 200
    job = wait(api, body["job_id"])
    assert job["status"] == "interrupted" and job["step"] >= 2
    _sdxl_file(host_dir, name)
    assert api.call("GET", "/sdapi/v1/embeddings")["loaded"][name]["shape"] == 2048


def test_sdxl_error_inside_the_loop_saves_and_reports(sdxl_host, faults, host_dir, sdxl_embedding, dataset):
    api, name = sdxl_host, sdxl_embedding
    before = model_state(api)
    assert api.call("POST", "/tiext-test/fail", {"after": 3}) == {"armed": True, "after": 3}
    status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 30, **FAST})
    assert status == 200, body
    job = wait(api, body["job_id"])
    assert job["status"] == "error" and "injected failure" in job["message"] and "step 3" in job["message"]
    _sdxl_file(host_dir, name)
    assert model_state(api) == before  # restored on error too


def test_switching_sd1_and_sdxl_between_runs_without_restart(sdxl_host, host_dir, sdxl_embedding, dataset):
    api = sdxl_host
    run = {"data_dir": str(dataset), "max_steps": 2, **FAST}
    sd1_name = f"{sdxl_embedding}-sd1"
    try:
        with checkpoint_loaded(api, SD1_CHECKPOINT):
            status, body = tiext(api, "POST", "/create", {"name": sd1_name, "init_text": "red circle"})
            assert status == 200 and body["dims"] == {"default": 768}, body
            status, body = tiext(api, "POST", "/train", {"name": sd1_name, **run})
            assert status == 200 and wait(api, body["job_id"])["status"] == "finished"
            status, body = tiext(api, "POST", "/train", {"name": sdxl_embedding, **run})  # wrong family: says so
            message = body.get("error", "") if status != 200 else wait(api, body["job_id"])["message"]
            assert "SDXL embedding on an SD1/SD2 model" in message, (status, body, message)
        # back on SDXL (the context restored it): the SDXL embedding trains again
        status, body = tiext(api, "POST", "/train", {"name": sdxl_embedding, **run})
        assert status == 200
        assert wait(api, body["job_id"])["status"] == "finished"
        _sdxl_file(host_dir, sdxl_embedding)
    finally:
        for path in (host_dir / "embeddings").glob(f"{sd1_name}.pt*"):
            path.unlink()
        shutil.rmtree(host_dir / "textual_inversion_ext" / sd1_name, ignore_errors=True)


def test_sdxl_gradient_checkpointing_is_ours_and_changes_no_result(sdxl_host, faults, host_dir, sdxl_embedding,
                                                                    dataset):
    """The host's checkpointing covers ldm only; for sgm's blocks ours is on during the run, off after, and the
    losses are the same as without it (same seed)."""
    api, name = sdxl_host, sdxl_embedding
    losses, seen = {}, {}
    for checkpointing in (False, True):
        tiext(api, "POST", "/create", {"name": name, "init_text": "red circle", "overwrite": True})
        status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 3,
                                                     **FAST, "seed": 5, "gradient_checkpointing": checkpointing})
        assert status == 200, body
        seen[checkpointing] = False
        while tiext(api, "GET", f"/jobs/{body['job_id']}")[1]["active"]:
            seen[checkpointing] |= model_state(api)["sgm_checkpointing"]
            time.sleep(0.05)
        job = wait(api, body["job_id"])
        assert job["status"] == "finished", job
        losses[checkpointing] = [loss for _, loss in job["losses"]]
    assert seen == {False: False, True: True} and not model_state(api)["sgm_checkpointing"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_sdxl_latents_match_the_hosts_encode_first_stage(sdxl_host, faults):
    """sgm's encode_first_stage samples and scales (0.13025) in one go; ours keeps mean and std and scales them:
    with the same random draw both give the same latent."""
    check = sdxl_host.call("GET", "/tiext-test/latents")
    assert check["scale_factor"] == pytest.approx(0.13025) and check["shape"] == [1, 4, 8, 8]
    assert check["max_abs_diff"] < 1e-4 * max(1.0, check["host_std"]), check
