"""Preprocess, check and caption editing through our REST API inside the real A1111 host, then training
on the outputs. The lab host is offline with no BLIP/deepbooru weights: asking for them must say so
clearly and still produce every output."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from textual_inversion_ext.core import formats

from .test_host_training import tiext, wait


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "photos in"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        img = Image.new("RGB", (160, 96), (30 * i, 60, 120))
        ImageDraw.Draw(img).ellipse((40, 10, 120, 86), fill=colour)
        img.save(folder / f"shot {i}.png")
        (folder / f"shot {i}.txt").write_text(f"a red circle on a {colour} card")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_preprocess_with_missing_captioners_then_train(host_api, host_dir, source, tmp_path):
    dest = tmp_path / "processed"
    status, body = tiext(host_api, "POST", "/preprocess", {"source": str(source), "destination": str(dest),
                                                            "width": 64, "height": 64, "flip": True,
                                                            "upscale": True, "captioners": "blip, deepbooru",
                                                            "caption_action": "append"})
    assert status == 200, body
    job = wait(host_api, body["job_id"], timeout=120)
    assert job["kind"] == "preprocess" and job["status"] == "finished", job
    message = job["message"]
    assert "BLIP weights are not available offline: put model_base_caption_capfilt_large.pth in" in message
    assert "models/BLIP" in message and "deepbooru weights are not available offline" in message
    result = job["result"]
    assert (result["total"], result["processed"], result["outputs"]) == (4, 3, 6)
    assert any(p.startswith("broken.png") for p in result["problems"])
    outputs = sorted(p.name for p in dest.glob("*.png"))
    assert outputs == ["shot 0-flip.png", "shot 0.png", "shot 1-flip.png", "shot 1.png", "shot 2-flip.png",
                       "shot 2.png"]
    assert all(Image.open(dest / n).size == (64, 64) for n in outputs)
    assert (dest / "shot 1.txt").read_text().strip() == "a red circle on a green card"

    # the check, and a caption edit with undo, on the outputs
    status, report = tiext(host_api, "POST", "/check", {"folder": str(dest), "subject": "red circle",
                                                         "width": 64, "height": 64})
    assert status == 200 and report["summary"].startswith("6 usable images"), report
    assert any(f["kind"] == "caption_subject" for f in report["findings"])
    status, edit = tiext(host_api, "POST", "/captions/edit", {"folder": str(dest), "op": "strip_subject",
                                                               "subject": "red circle"})
    assert status == 200 and edit["changed"] == 6
    assert "circle" not in (dest / "shot 1.txt").read_text()
    status, page = tiext(host_api, "GET", f"/captions?folder={dest}&per_page=4")
    assert status == 200 and page["total"] == 6 and len(page["items"]) == 4
    assert all(Image.open(i["thumbnail"]).size[0] <= 256 for i in page["items"])

    # train on the outputs
    name = f"tiext-prep-{int(time.time() * 1000) % 10**8}"
    assert tiext(host_api, "POST", "/create", {"name": name, "init_text": "red circle"})[0] == 200
    try:
        status, body = tiext(host_api, "POST", "/train", {"name": name, "data_dir": str(dest), "max_steps": 6,
                                                           "resolution": 64, "save_every": 0, "preview_every": 0})
        assert status == 200, body
        trained = wait(host_api, body["job_id"])
        assert trained["status"] == "finished" and trained["step"] == 6, trained
        assert formats.load_embedding(host_dir / "embeddings" / f"{name}.pt").embedding.step == 6
    finally:
        for path in (host_dir / "embeddings").glob(f"{name}.pt*"):
            path.unlink()
        shutil.rmtree(host_dir / "textual_inversion_ext" / name, ignore_errors=True)
        host_api.call("POST", "/sdapi/v1/refresh-embeddings")


def test_preprocess_defaults_to_the_models_size_and_refuses_bad_folders(host_api, source, tmp_path):
    status, schema = tiext(host_api, "GET", "/schema")
    assert status == 200 and schema["preprocess"]["properties"]["width"]["default"] == 512  # SD1.x
    status, body = tiext(host_api, "POST", "/preprocess", {"source": str(source),
                                                            "destination": str(source / "inside")})
    assert status == 400 and "inside the source" in body["error"]
    status, body = tiext(host_api, "POST", "/preprocess", {"source": str(tmp_path / "missing")})
    assert status == 400 and "does not exist" in body["error"]
