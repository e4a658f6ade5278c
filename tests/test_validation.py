"""Validation loss, best step, overtraining warning, health, recoveries, previews and the comparison grid."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch
from _faults import FaultyBackend
from _linear_backend import LinearBackend
from PIL import Image, ImageDraw

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.errors import DatasetError, TrainingError
from textual_inversion_ext.core.training.health import vocabulary_median_norms
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.core.training.trainer import sidecar_path
from textual_inversion_ext.core.training.validation import ValidationTracker, split_indices


def fresh(backend, folder, name="toy"):
    return create_embedding(backend, CreateParams(name=name, init_text="red robot", overwrite=True), folder).path


def params(**kw) -> TrainParams:
    base = dict(max_steps=12, save_every=0, preview_every=0, csv_every=1, learn_rate="0.01", seed=5,
                val_every=4, val_budget=0.0, comparison_grid=False, preview_steps=3)  # validate exactly every 4
    base.update(kw)
    return TrainParams(**base)


def train(backend, data, tmp, p, emb=None, **kw):
    emb = emb or fresh(backend, tmp / "emb")
    return run_training(backend, RunRequest(emb, data, tmp / "logs", p, **kw))


# ----------------------------------------------------------------- pure logic


def test_split_holds_out_spread_images_independent_of_seed():
    assert split_indices(6, 0.0) == ([0, 1, 2, 3, 4, 5], [])
    train_idx, val = split_indices(10, 0.2)
    assert len(val) == 2 and val == [2, 7] and sorted(train_idx + val) == list(range(10))
    assert split_indices(2, 0.5) == ([0], [1])
    with pytest.raises(DatasetError, match="no training image"):
        split_indices(1, 0.5)


def test_tracker_best_step_and_overtraining_needs_val_up_and_train_down():
    t = ValidationTracker(patience=2)
    assert t.add(0, 1.0, None) == (True, None)
    assert t.add(10, 0.8, 1.0)[0] is True
    t.add(20, 0.9, 0.9)
    new_best, warning = t.add(30, 1.0, 0.8)  # rose twice while the training loss fell
    assert not new_best and warning is not None and "step 10" in warning
    assert t.best.step == 10 and t.overtraining_step == 30
    # a wobble of a few 0.01 % is not a rise worth a warning
    w = ValidationTracker(patience=2)
    for step, val, tr in ((0, 1.0, None), (10, 1.00001, 1.0), (20, 1.00002, 0.9)):
        assert w.add(step, val, tr)[1] is None
    # rising validation with rising training loss is divergence, not overtraining
    u = ValidationTracker(patience=2)
    for step, val, tr in ((0, 1.0, None), (10, 1.1, 1.0), (20, 1.2, 1.1)):
        assert u.add(step, val, tr)[1] is None


# ----------------------------------------------------------------- runs


def test_validation_loss_in_csv_best_step_and_sidecars(tiny_backend, demo_data, tmp_path):
    out = train(tiny_backend, demo_data, tmp_path, params(save_every=6))
    r = out.result
    assert [s for s, _ in r.validation] == [0, 4, 8, 12]  # the start, every 4 steps
    rows = list(csv.DictReader(out.paths.loss_csv.open()))
    logged = {int(row["step"]): float(row["val_loss"]) for row in rows if row["val_loss"]}
    assert logged == {s: pytest.approx(v, rel=1e-6) for s, v in r.validation if s}
    best = min(r.validation, key=lambda sv: sv[1])
    assert (r.best_step, r.best_loss) == best
    assert r.best_path is not None and r.best_path.exists()
    assert formats.load_embedding(r.best_path).embedding.step == r.best_step
    # a run record next to every saved embedding, the final one included
    for path in (*r.snapshots, r.final_path):
        record = json.loads(sidecar_path(path).read_text())
        saved = record["saved"]
        assert saved["file"] == path.name and saved["step"] == formats.load_embedding(path).embedding.step
        assert record["params"]["learn_rate"] == "0.01" and record["model"]["hash"] == tiny_backend.info.short_hash
        assert record["dataset"]["images"] == 6 and "s_per_step" in saved
    final_record = json.loads(sidecar_path(r.final_path).read_text())["saved"]
    assert final_record["best_step"] == r.best_step and final_record["step"] == 12
    assert f"Best step by validation loss: {r.best_step}" in r.message


def test_only_the_current_best_is_kept_among_unscheduled_snapshots(tiny_backend, demo_data, tmp_path):
    out = train(tiny_backend, demo_data, tmp_path, params(val_every=2, save_every=0))
    files = sorted(p.name for p in out.paths.snapshots.glob("toy-*.pt"))
    expected = {"toy-0.pt", f"toy-{out.result.best_step}.pt"}
    assert set(files) == expected  # earlier bests were removed with their .optim and sidecar
    assert {p.name for p in out.paths.snapshots.iterdir()} == (
        expected | {n + ".optim" for n in expected} | {n + ".json" for n in expected})


def test_same_seed_same_validation_curve_and_split_is_reported(tiny_backend, demo_data, tmp_path):
    curves = []
    for run in ("a", "b"):
        out = train(tiny_backend, demo_data, tmp_path / run, params(val_split=0.34))
        curves.append(out.result.validation)
        record = json.loads(out.record_path.read_text())
        assert len(record["dataset"]["validation_images"]) == 2 and record["dataset"]["images"] == 4
    assert curves[0] == curves[1]


def _one_image_and_a_held_out_one(folder):
    """Same red left half; the right half is white in the training image, grey in the held-out one."""
    folder.mkdir()
    for name, right in (("a", (240, 240, 240)), ("b", (150, 150, 150))):
        image = Image.new("RGB", (64, 64), right)
        ImageDraw.Draw(image).rectangle([0, 0, 31, 63], fill=(200, 30, 30))
        image.save(folder / f"{name}.png")
    return folder


def test_deliberately_overtrained_run_warns_and_can_stop_early(tmp_path):
    """High LR, one training image: the held-out loss falls, then rises while the training loss keeps
    falling. On a model where the embedding matters (see _linear_backend for why not the tiny one)."""
    backend = LinearBackend()
    data = _one_image_and_a_held_out_one(tmp_path / "data")
    p = params(max_steps=60, learn_rate="0.5", val_every=2, val_split=0.5, resolution=64, norm_warn=0)
    out = train(backend, data, tmp_path, p)
    warnings = [w for w in out.result.warnings if w.startswith("Overtraining")]
    assert len(warnings) == 1 and f"best step so far is {out.result.best_step}" in warnings[0]
    val = dict(out.result.validation)
    assert val[out.result.best_step] < val[0] and val[60] > val[out.result.best_step]
    assert out.result.losses[-1][1] < out.result.losses[0][1]  # the training loss did fall
    stopped = train(backend, data, tmp_path / "early", replace(p, early_stop=True))
    assert stopped.result.early_stopped and stopped.result.step < 60
    assert "Stopped early" in stopped.result.message
    assert formats.load_embedding(stopped.result.final_path).embedding.step == stopped.result.step
    # the default learning rate on the same data: no warning
    calm = train(backend, data, tmp_path / "calm", replace(p, learn_rate="0.005"))
    assert not [w for w in calm.result.warnings if w.startswith("Overtraining")], calm.result.validation


def test_norm_warning_and_cap(tiny_backend, demo_data, tmp_path):
    medians = vocabulary_median_norms(tiny_backend)
    warned = train(tiny_backend, demo_data, tmp_path / "w", params(learn_rate="0.2", norm_warn=1.5))
    assert any("norms are inflating" in w for w in warned.result.warnings)
    capped = train(tiny_backend, demo_data, tmp_path / "c", params(learn_rate="0.2", norm_cap=1.5))
    vec = formats.load_embedding(capped.result.final_path).embedding.single()
    assert float(vec.norm(dim=1).max()) <= 1.5 * medians["default"] * (1 + 1e-4)
    assert max(ratio for _, ratio in capped.result.norms) <= 1.5 * (1 + 1e-4)
    rows = list(csv.DictReader(capped.paths.loss_csv.open()))
    assert all(0 < float(row["norm_ratio"]) <= 1.5 * (1 + 1e-4) for row in rows)


def test_transient_nan_rolls_back_halves_lr_and_finishes(tiny_backend, demo_data, tmp_path):
    flaky = FaultyBackend(tiny_backend, bad_calls={7})
    out = train(flaky, demo_data, tmp_path, params(val_every=0))
    r = out.result
    assert r.status == "finished" and r.step == 12 and len(r.recoveries) == 1
    assert "step 7" in r.recoveries[0] and "Recovered 1×" in r.message
    rates = {int(row["step"]): float(row["learn_rate"]) for row in csv.DictReader(out.paths.loss_csv.open())}
    assert rates[6] == pytest.approx(0.01) and rates[7] == pytest.approx(0.005) and rates[12] == pytest.approx(0.005)
    assert [s for s, _ in r.losses] == list(range(1, 13))  # the bad step was replayed, not skipped
    assert formats.optim_path(r.final_path).exists()  # consistent again after the rollback


def test_recoveries_are_limited(tiny_backend, demo_data, tmp_path):
    always = FaultyBackend(tiny_backend, bad_calls=range(5, 1000))
    out = train(always, demo_data, tmp_path, params(val_every=0, nan_retries=2))
    assert out.result.status == "nan" and len(out.result.recoveries) == 2
    assert formats.load_embedding(out.result.final_path).embedding.step == 4


def test_previews_differ_between_steps_and_repeat_for_the_same_step(tiny_backend, demo_data, tmp_path):
    p = params(max_steps=4, preview_every=2, learn_rate="0.5", val_every=0,
               preview_prompt="a photo of toy\ntoy on a red background")
    first = train(tiny_backend, demo_data, tmp_path / "a", p).result.previews
    again = train(tiny_backend, demo_data, tmp_path / "b", p).result.previews
    assert [x.name for x in first] == ["toy-2-1.png", "toy-2-2.png", "toy-4-1.png", "toy-4-2.png"]
    pixels = [Image.open(x).tobytes() for x in first]
    assert pixels[0] != pixels[2]  # step 2 vs step 4, same prompt and seed
    assert [Image.open(x).tobytes() for x in again] == pixels  # same step, same seed: identical


def test_unknown_preview_sampler_is_refused_before_training(tiny_backend, demo_data, tmp_path):
    with pytest.raises(TrainingError, match=r"Unknown preview sampler 'Nope'.*Euler a"):
        train(tiny_backend, demo_data, tmp_path, params(preview_sampler="Nope"))


def test_resume_from_a_snapshot_into_another_file_equals_the_straight_run(tiny_backend, demo_data, tmp_path):
    # test_trainer's resume test continues the embedding itself; this one starts from a snapshot's file.
    p = params(max_steps=20, save_every=10, csv_every=0, val_every=0, learn_rate="0.02")
    straight = train(tiny_backend, demo_data, tmp_path / "straight", p)
    snapshot = straight.paths.snapshots / "toy-10.pt"
    other = fresh(tiny_backend, tmp_path / "resumed")  # a different file: only the snapshot's state counts
    resumed = train(tiny_backend, demo_data, tmp_path / "resumed", p, emb=other, resume_from=snapshot)
    assert resumed.result.step == 20 and json.loads(resumed.record_path.read_text())["resumed_optimizer"]
    a = formats.load_embedding(straight.result.final_path).embedding
    b = formats.load_embedding(other).embedding
    assert b.name == "toy" and b.step == 20
    torch.testing.assert_close(a.single(), b.single(), rtol=1e-4, atol=1e-6)


def test_comparison_grid_has_a_column_per_snapshot_and_a_row_per_prompt(tiny_backend, demo_data, tmp_path):
    from textual_inversion_ext.core.training.grid import HEADER, LABEL_WIDTH, PAD

    p = params(max_steps=8, save_every=4, val_every=0, comparison_grid=True, resolution=64,
               preview_prompt="a photo of toy\ntoy on a red background")
    out = train(tiny_backend, demo_data, tmp_path, p)
    assert out.grid is not None and out.grid.exists()
    image = Image.open(out.grid)
    columns = 3  # init (step 0), step 4, step 8
    assert image.size == (LABEL_WIDTH + columns * (64 + PAD), HEADER + 2 * (64 + PAD))
    cell = lambda c, r: image.crop((LABEL_WIDTH + c * (64 + PAD), HEADER + r * (64 + PAD),  # noqa: E731
                                    LABEL_WIDTH + c * (64 + PAD) + 64, HEADER + r * (64 + PAD) + 64))
    assert cell(0, 0).tobytes() != cell(2, 0).tobytes()
    assert json.loads(out.record_path.read_text())["grid"] == str(out.grid)
