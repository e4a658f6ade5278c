from __future__ import annotations

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.metrics import read_loss_csv
from textual_inversion_ext.demo import run_demo


def test_demo_writes_everything_and_the_loss_goes_down(tiny_backend, tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", steps=120, seed=0, backend=tiny_backend)
    for key in ("embedding_pt", "embedding_safetensors", "loss_csv", "loss_plot"):
        assert summary[key].exists(), key
    pt = formats.load_embedding(summary["embedding_pt"]).embedding
    st = formats.load_embedding(summary["embedding_safetensors"]).embedding
    assert pt.step == st.step == 120
    assert len(read_loss_csv(summary["loss_csv"])) == 120
    assert summary["loss_plot"].read_bytes()[:4] == b"\x89PNG"
    # the fixed-noise loss on the training images must drop
    assert summary["fixed_loss_after"] < summary["fixed_loss_before"]
    assert "before" in capsys.readouterr().out
