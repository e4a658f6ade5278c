"""Forge (tests/host/forge): create, train, list and generate on the model Forge loaded, for SD1 and SDXL, with
interrupt, a refused second run, an injected error and the server's memory while training.

Forge recognises a model by its weights, so the lab's tiny checkpoints do not load there (tests/host/forge/README.md):
these run on `full-sd15-random` (SD1.5-shaped) and `forge-sdxl-small` (SDXL's interfaces and text encoders, a
smaller UNet). Start the lab with the test-only extension linked (`./ext.sh link <repo>/tests/host/fault_ext
tiext-test-faults`), then `WEBUI_DIR=$LAB/webui pytest -p no:xdist tests/host/test_forge_host.py`."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from textual_inversion_ext.core import formats

from .conftest import checkpoint_loaded, server_rss_mb
from .test_host_training import FAST, model_state, tiext, wait

HOSTS = ("forge",)
CHECKPOINTS = {  # checkpoint -> (family, file suffix, vector widths, width Forge reports)
    "full-sd15-random.safetensors": ("sd1", ".pt", {"default": 768}, 768),
    "forge-sdxl-small.safetensors": ("sdxl", ".safetensors", {"clip_l": 768, "clip_g": 1280}, 2048),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS), ids=["sd15", "sdxl"])
def forge(request, host_api):
    """Forge with the checkpoint selected for the module (it loads at our first create); (api, checkpoint)."""
    with checkpoint_loaded(host_api, request.param):
        yield host_api, request.param


@pytest.fixture
def made(forge, host_dir):
    """A fresh 2-vector embedding created by our route on the selected checkpoint; removed afterwards."""
    api, checkpoint = forge
    family, suffix, dims, _ = CHECKPOINTS[checkpoint]
    name = f"tiext-forge-{family}-{int(time.time() * 1000) % 10**8}"
    status, body = tiext(api, "POST", "/create", {"name": name, "init_text": "red circle"})
    assert status == 200, body
    assert body["dims"] == dims and body["file"].endswith(name + suffix), body
    yield name, host_dir / "embeddings" / (name + suffix)
    for path in (host_dir / "embeddings").glob(f"{name}*"):
        path.unlink()
    shutil.rmtree(host_dir / "textual_inversion_ext" / name, ignore_errors=True)
    api.call("POST", "/sdapi/v1/refresh-embeddings")


def _vectors(path: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    vectors = formats.load_embedding(path).embedding.vectors
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {
        k: (2, width) for k, width in CHECKPOINTS[checkpoint][2].items()}
    return vectors


class RssWatch:
    """The server's peak RSS while a block runs, sampled every 0.2 s."""

    def __init__(self, host_dir: Path) -> None:
        self.host_dir, self.peak, self._stop = host_dir, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss_mb(self.host_dir) or 0.0)
            time.sleep(0.2)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_forge_create_train_list_generate_on_the_loaded_model(forge, faults, host_dir, made, dataset):
    (api, checkpoint), (name, path) = forge, made
    created = _vectors(path, checkpoint)
    before = model_state(api)
    assert before["loaded"], "our create should have made Forge load the selected checkpoint"
    # Forge's own txt2img first: it pages in every weight (mmap'd from the file), so RSS after it is the
    # model's working size; its peak is the reference for what a generation adds.
    with RssWatch(host_dir) as generating:
        api.call("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64})
    idle_mb = server_rss_mb(host_dir)
    status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 30,
                                                 **FAST, "preview_every": 15, "preview_steps": 2})
    assert status == 200, body
    during = None
    with RssWatch(host_dir) as rss:
        while True:  # while it trains: every weight frozen, our vectors registered in Forge's engines
            state, job = model_state(api), tiext(api, "GET", "/jobs/current")[1]
            if state["embedding_registered"]:
                during = during or state
            if not job["active"]:
                break
            time.sleep(0.1)
    job = wait(api, body["job_id"])
    assert job["status"] == "finished", job
    assert job["step"] == 30 and len(job["previews"]) == 2 and all(Path(p).is_file() for p in job["previews"])
    assert during is not None, "our embedding was never seen registered in Forge during training"
    assert during["unet_trainable_tensors"] == 0 and during["text_encoder_trainable_tensors"] == 0
    assert during["vae_trainable_tensors"] == 0
    assert model_state(api) == before  # Forge's model as it was: flags, VAE device, nothing of ours registered

    trained = _vectors(path, checkpoint)
    for key in trained:
        assert not torch.allclose(trained[key], created[key]), key
    # Forge's API keeps its own embedding list, read again on refresh (as after any file copied in)
    api.call("POST", "/sdapi/v1/refresh-embeddings")
    loaded = api.call("GET", "/sdapi/v1/embeddings")["loaded"]
    assert loaded[name]["shape"] == CHECKPOINTS[checkpoint][3] and loaded[name]["vectors"] == 2, loaded.get(name)
    # txt2img right away, no model reload: Forge's engines know the trained file (Forge writes "TI: <names>")
    result = api.call("POST", "/sdapi/v1/txt2img", {"prompt": f"a photo of {name}", "steps": 2, "width": 64,
                                                    "height": 64, "seed": 1})
    info = json.loads(result["info"])["infotexts"][0]
    # (on SDXL each of the two engines adds the name: `TI: "name, name"`)
    assert result["images"] and re.search(rf'TI: "?{re.escape(name)}\b', info), info
    # No second copy of the model: in fp32 one would add twice the (fp16) file's size. What training adds is
    # measured (SD1.5 +586 MB, forge-sdxl-small +2.6 GB on 2026-12-05; SDXL's is most likely Forge's per-op
    # weight casts kept for the backward through clip_g) and must stay below 1.5× the file.
    if idle_mb:
        print(f"\n[{checkpoint}] server RSS after a txt2img {idle_mb:.0f} MB (its peak {generating.peak:.0f} MB), "
              f"peak while training {rss.peak:.0f} MB (+{rss.peak - idle_mb:.0f} MB)")
        file_mb = (host_dir / "models" / "Stable-diffusion" / checkpoint).stat().st_size / 2**20
        assert rss.peak - idle_mb < 1.5 * file_mb, (idle_mb, rss.peak, file_mb)


def test_forge_interrupt_saves_and_a_second_run_is_refused(forge, host_dir, made, dataset):
    (api, checkpoint), (name, path) = forge, made
    status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 100000,
                                                 **FAST})
    assert status == 200, body
    while (tiext(api, "GET", "/jobs/current")[1].get("step") or 0) < 2:
        time.sleep(0.1)
    second, refused = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 2, **FAST})
    assert second == 409 and name in refused["error"], (second, refused)
    assert tiext(api, "POST", "/interrupt", {})[0] == 200
    job = wait(api, body["job_id"])
    assert job["status"] == "interrupted" and job["step"] >= 2
    saved = formats.load_embedding(path).embedding
    assert saved.step is not None and saved.step >= 2
    _vectors(path, checkpoint)


def test_forge_error_inside_the_loop_saves_and_reports(forge, faults, host_dir, made, dataset):
    (api, _), (name, path) = forge, made
    before = model_state(api)
    assert api.call("POST", "/tiext-test/fail", {"after": 3}) == {"armed": True, "after": 3}
    status, body = tiext(api, "POST", "/train", {"name": name, "data_dir": str(dataset), "max_steps": 30, **FAST})
    assert status == 200, body
    job = wait(api, body["job_id"])
    assert job["status"] == "error" and "injected failure" in job["message"] and "step 3" in job["message"], job
    assert formats.load_embedding(path).embedding.step == 3
    assert model_state(api) == before


def test_forge_latents_match_its_encode_first_stage(forge, faults, made):
    """Forge's encode_first_stage samples the posterior and applies the VAE's process_in (scale, shift); ours
    keeps mean and std in the same units: with the same random draw both give the same latent."""
    api, checkpoint = forge
    check = api.call("GET", "/tiext-test/latents")
    scale = {"sd1": 0.18215, "sdxl": 0.13025}[CHECKPOINTS[checkpoint][0]]
    assert check["scale_factor"] == pytest.approx(scale) and check["shape"] == [1, 4, 8, 8]
    assert check["max_abs_diff"] < 1e-4 * max(1.0, check["host_std"]), check
