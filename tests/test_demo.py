from __future__ import annotations

import json

from PIL import Image

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.training.metrics import read_loss_csv
from textual_inversion_ext.demo import run_demo


def test_demo_300_steps_writes_everything_and_repeats_its_validation_curve(tiny_backend, tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", steps=300, seed=0, backend=tiny_backend)
    for key in ("embedding_pt", "embedding_safetensors", "run_record", "loss_csv", "loss_plot", "comparison_grid"):
        assert summary[key] is not None and summary[key].exists(), key
    pt = formats.load_embedding(summary["embedding_pt"]).embedding
    st = formats.load_embedding(summary["embedding_safetensors"]).embedding
    assert pt.step == st.step == 300
    rows = read_loss_csv(summary["loss_csv"])
    assert len(rows) == 300 and all(r["loss"] is not None for r in rows)
    measured = {int(r["step"]): r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert sorted(measured) == list(range(25, 301, 25))  # training and validation loss in one CSV
    assert summary["best_step"] in {0, *measured}
    record = json.loads(summary["run_record"].read_text())
    assert record["saved"]["best_step"] == summary["best_step"] and record["params"]["max_steps"] == 300
    assert Image.open(summary["comparison_grid"]).width > Image.open(summary["loss_plot"]).width // 4
    assert summary["loss_plot"].read_bytes()[:4] == b"\x89PNG"
    # the fixed-noise loss on the training images must drop
    assert summary["fixed_loss_after"] < summary["fixed_loss_before"]
    assert "lowest at step" in capsys.readouterr().out
    again = run_demo(tmp_path / "again", steps=300, seed=0, backend=tiny_backend)
    assert again["validation"] == summary["validation"]  # same seed, same validation curve
