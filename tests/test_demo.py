from __future__ import annotations

import json

from PIL import Image

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.training.metrics import read_loss_csv
from textual_inversion_ext.demo import make_sample_dataset, run_demo

# `make demo` runs 300 steps; 36 write every artefact the same way (snapshots, previews and validation at a
# twelfth of the run), and the fixed-noise loss already falls.
STEPS = 36


def test_demo_writes_everything_and_its_validation_curve(tiny_backend, tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", steps=STEPS, seed=0, backend=tiny_backend)
    for key in ("embedding_pt", "embedding_safetensors", "run_record", "loss_csv", "loss_plot", "comparison_grid"):
        assert summary[key] is not None and summary[key].exists(), key
    pt = formats.load_embedding(summary["embedding_pt"]).embedding
    st = formats.load_embedding(summary["embedding_safetensors"]).embedding
    assert pt.step == st.step == STEPS
    rows = read_loss_csv(summary["loss_csv"])
    assert len(rows) == STEPS and all(r["loss"] is not None for r in rows)
    measured = {int(r["step"]): r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert sorted(measured) == list(range(STEPS // 12, STEPS + 1, STEPS // 12))  # training and validation loss
    assert summary["best_step"] in {0, *measured}
    record = json.loads(summary["run_record"].read_text())
    assert record["saved"]["best_step"] == summary["best_step"] and record["params"]["max_steps"] == STEPS
    assert Image.open(summary["comparison_grid"]).width > Image.open(summary["loss_plot"]).width // 4
    assert summary["loss_plot"].read_bytes()[:4] == b"\x89PNG"
    # the fixed-noise loss on the training images must drop
    assert summary["fixed_loss_after"] < summary["fixed_loss_before"]
    assert "lowest at step" in capsys.readouterr().out
    # Same seed, same run: the demo's own input is its drawn dataset (the same bytes again); that the trainer then
    # gives the same validation curve is test_validation's test_same_seed_same_validation_curve_and_split_is_reported.
    again = make_sample_dataset(tmp_path / "again", seed=0)
    assert [p.read_bytes() for p in again] == [(tmp_path / "demo" / "dataset" / p.name).read_bytes() for p in again]
