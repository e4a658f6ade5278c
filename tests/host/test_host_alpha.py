"""'Use PNG alpha channel as loss weight' inside the real A1111 host (WEBUI_DIR): a run on cut-out RGBA images
finishes with finite losses through the host's own model (ldm `apply_model`, its ᾱ table), records the option,
and skips the fully transparent image instead of going NaN as the host's own trainer does."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from . import test_host_training as training
from .test_host_training import FAST, tiext, wait

fresh_embedding = training.embedding  # that module's fixture, usable here under this name


def _cut_outs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(["red", "green", "blue"]):
        img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        ImageDraw.Draw(img).ellipse((8, 8, 56 - 8 * i, 56), fill=colour)  # non-square visible part
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} circle")
    Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(folder / "ghost.png")
    return folder


def test_alpha_weighted_training_in_the_host(host_api, host_dir, fresh_embedding, tmp_path_factory):
    embedding = fresh_embedding
    data = _cut_outs(tmp_path_factory.mktemp("tiext-host-alpha"))
    status, body = tiext(host_api, "POST", "/train", {"name": embedding, "data_dir": str(data), "max_steps": 8,
                                                       **FAST, "alpha_weight": True, "val_every": 4})
    assert status == 200, body
    job = wait(host_api, body["job_id"])
    assert job["status"] == "finished", job
    runs = sorted((host_dir / "textual_inversion_ext" / embedding).glob("*/run.json"))
    record = json.loads(runs[-1].read_text())
    assert record["params"]["alpha_weight"] is True
    assert record["dataset"]["images"] == 3
    assert [s["file"] for s in record["dataset"]["skipped"]] == ["ghost.png"]
    losses = [float(row.split(",")[3]) for row in (runs[-1].parent / "textual_inversion_loss.csv").read_text()
              .splitlines()[1:]]
    assert len(losses) == 8 and all(math.isfinite(v) and v > 0 for v in losses)
