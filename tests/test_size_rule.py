"""One image size rule for preprocess, the dataset check and training; preprocess fails loudly when it produced
nothing (issue 12, point 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textual_inversion_ext.cli import main
from textual_inversion_ext.core.data.dataset_check import ERROR, CheckParams, check_dataset
from textual_inversion_ext.core.data.images import MAX_ASPECT, MIN_SIDE, scan_dataset, size_problem
from textual_inversion_ext.core.data.preprocess import PreprocessParams, preprocess


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_the_rule_at_its_bounds():
    assert (MIN_SIDE, MAX_ASPECT) == (64, 16.0)
    assert size_problem(64, 64) is None and size_problem(64, 1024) is None and size_problem(1024, 64) is None
    assert size_problem(1, 1).startswith("too small: 1×1 px")
    assert size_problem(63, 500).startswith("too small")
    assert size_problem(20000, 20).startswith("too small")
    assert size_problem(64, 1025).startswith("too thin: 64×1025 px")


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    _noise(1, 1).save(src / "one.png")
    _noise(20000, 20, 1).save(src / "long.png")
    _noise(2000, 100, 2).save(src / "thin.png")  # 20:1
    _noise(128, 96, 3).save(src / "fine.png")
    _noise(64, 1024, 4).save(src / "strip.png")  # 16:1, at the bound
    return src


def test_preprocess_check_and_training_refuse_the_same_images(sources, tmp_path):
    result = preprocess(PreprocessParams(source=str(sources), destination=str(tmp_path / "out"), width=128,
                                         height=128, split=False))
    refused_by_preprocess = {f.source.name for f in result.files if f.status == "skipped"}
    assert {f.source.name for f in result.files if f.status == "ok"} == {"fine.png", "strip.png"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine.png", "strip.png"]
    notes = {f.source.name: f.notes[-1] for f in result.files}
    assert notes["one.png"].startswith("too small: 1×1 px") and notes["thin.png"].startswith("too thin")

    report = check_dataset(sources, CheckParams(width=128, height=128))
    refused_by_check = {f.path.name for f in report.findings if f.severity == ERROR}
    assert {f.kind for f in report.findings if f.path.name == "thin.png"} >= {"too_thin_to_train"}

    scan = scan_dataset(sources)
    refused_by_training = {s.path.name for s in scan.report}
    assert refused_by_preprocess == refused_by_check == refused_by_training == {"one.png", "long.png", "thin.png"}


def test_cli_preprocess_fails_when_nothing_was_produced(sources, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["preprocess", str(empty), str(tmp_path / "out-empty")]) == 1
    assert f"Nothing was produced: {empty} has no usable image." in capsys.readouterr().out
    for name in ("fine.png", "strip.png"):
        (sources / name).unlink()
    assert main(["preprocess", str(sources), str(tmp_path / "out-bad")]) == 1
    out = capsys.readouterr().out
    assert "has no usable image (3 file(s) skipped or failed)." in out and "one.png: skipped (too small" in out
    _noise(100, 100).save(sources / "fine.png")
    assert main(["preprocess", str(sources), str(tmp_path / "out-ok")]) == 0
