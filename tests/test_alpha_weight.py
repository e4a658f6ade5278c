"""'Use PNG alpha channel as loss weight' (A1111 parity): the alpha read, cropped and cached beside each latent
(mirrored with it), images without alpha weighing 1, nothing-visible images skipped and flagged by the check,
and the weight reaching the gradient: on the linear model, a transparent half teaches the vectors nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _linear_backend import LinearBackend
from PIL import Image

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams, create_embedding
from textual_inversion_ext.core.data import alpha, images
from textual_inversion_ext.core.data.dataset import prepare
from textual_inversion_ext.core.data.dataset_check import CheckParams, check_dataset
from textual_inversion_ext.core.errors import DatasetError
from textual_inversion_ext.core.params import fields_of
from textual_inversion_ext.core.training.run import RunRequest, run_training
from textual_inversion_ext.core.training.train_params import TrainParams

SIDE = 64  # LinearBackend's resolution: an 8×8 latent


def _cut_out(path: Path) -> None:
    """Red left half fully transparent, blue right half opaque."""
    img = Image.new("RGBA", (SIDE, SIDE), (30, 30, 220, 255))
    img.paste((220, 30, 30, 0), (0, 0, SIDE // 2, SIDE))
    img.save(path)


def _dataset(folder: Path, *, ghost: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _cut_out(folder / "cut.png")
    Image.new("RGBA", (SIDE, SIDE), (10, 200, 10, 255)).save(folder / "opaque.png")  # alpha band, all opaque
    Image.new("RGB", (SIDE, SIDE), (200, 200, 10)).save(folder / "plain.png")
    palette = Image.new("P", (SIDE, SIDE), 1)
    palette.putpalette([0, 0, 0, 240, 240, 240] + [0] * 762)
    palette.paste(0, (0, 0, SIDE, SIDE // 4))  # top quarter: the transparent index
    palette.save(folder / "palette.png", transparency=0)
    if ghost:
        Image.new("RGBA", (SIDE, SIDE), (255, 0, 0, 0)).save(folder / "ghost.png")
    return folder


def _prepare(folder: Path, alpha_weight: bool, **kw):
    return prepare(LinearBackend(), images.scan_dataset(folder), resolution=SIDE, use_buckets=True, with_flips=True,
                   latent_sampling="deterministic", seed=0, alpha_weight=alpha_weight, **kw)


def test_alpha_is_read_from_bands_palettes_and_not_from_opaque_images(tmp_path) -> None:
    folder = _dataset(tmp_path)
    assert alpha.load_alpha(folder / "plain.png") is None
    assert alpha.load_alpha(folder / "opaque.png") is None  # an alpha band with nothing transparent: weight 1
    cut = alpha.load_alpha(folder / "cut.png")
    assert cut is not None and cut.mode == "L" and cut.getextrema() == (0, 255)
    assert alpha.load_alpha(folder / "palette.png").getextrema() == (0, 255)  # colour-key transparency counts
    assert alpha.coverage(alpha.load_alpha(folder / "ghost.png")) == 0.0


def test_weights_are_cached_on_the_latent_grid_and_mirrored_with_the_flip(tmp_path) -> None:
    data = _prepare(_dataset(tmp_path), alpha_weight=True)
    names = [p.name for p in data.paths]
    assert names == ["cut.png", "opaque.png", "palette.png", "plain.png"]  # scan order, ghost left out
    assert [s.reason for s in data.skipped if s.path.name == "ghost.png"] == [alpha.TRANSPARENT_REASON]
    cut = data.latents[names.index("cut.png")]
    assert cut[False].weight.shape == (1, 8, 8) == (1, *cut[False].mean.shape[-2:])
    assert float(cut[False].weight[..., :4].max()) == 0.0 and float(cut[False].weight[..., 4:].min()) == 1.0
    torch.testing.assert_close(cut[True].weight, torch.flip(cut[False].weight, dims=[2]))
    pal = data.latents[names.index("palette.png")][False].weight
    assert float(pal[:, :2].max()) == 0.0 and float(pal[:, 2:].min()) == 1.0
    for name in ("opaque.png", "plain.png"):
        assert all(cached.weight is None for cached in data.latents[names.index(name)].values())
    i, j = names.index("cut.png"), names.index("plain.png")
    batch = data.weights([i, j], [True, False])
    assert batch.shape == (2, 1, 8, 8)
    torch.testing.assert_close(batch[0], cut[True].weight)
    assert bool((batch[1] == 1).all())  # no alpha: weight 1 everywhere
    assert data.weights([j, j], [False, True]) is None  # plain mean for batches without any map
    # off (the default): no maps, and the transparent image trains as white, as before
    off = _prepare(tmp_path, alpha_weight=False)
    assert "ghost.png" in [p.name for p in off.paths]
    assert all(c.weight is None for variants in off.latents for c in variants.values())


def test_non_square_maps_are_not_transposed(tiny_backend, tmp_path) -> None:
    """The host resizes the alpha to (h, w) where PIL wants (w, h), scrambling non-square maps (HOST-NOTES)."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    tall = Image.new("RGBA", (64, 128), (0, 0, 200, 255))
    tall.paste((0, 0, 0, 0), (0, 0, 64, 64))  # top half transparent
    tall.save(folder / "tall.png")
    wide = Image.new("RGBA", (128, 64), (0, 0, 200, 255))
    wide.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left quarter transparent
    wide.save(folder / "wide.png")
    data = prepare(tiny_backend, images.scan_dataset(folder), resolution=192, use_buckets=True, with_flips=False,
                   latent_sampling="deterministic", seed=0, alpha_weight=True)
    tall_w, wide_w = (data.latents[[p.name for p in data.paths].index(n)][False] for n in ("tall.png", "wide.png"))
    h, w = tall_w.mean.shape[-2:]
    assert h == 2 * w and tall_w.weight.shape == (1, h, w)
    assert float(tall_w.weight[:, : h // 2 - 1].max()) == 0.0 and float(tall_w.weight[:, h // 2 + 1 :].min()) == 1.0
    h, w = wide_w.mean.shape[-2:]
    assert w == 2 * h and wide_w.weight.shape == (1, h, w)
    assert float(wide_w.weight[..., : w // 4 - 1].max()) == 0.0 and float(wide_w.weight[..., w // 4 + 1 :].min()) == 1.0


def test_only_transparent_images_is_a_dataset_error_not_nan(tmp_path) -> None:
    folder = tmp_path / "ghosts"
    folder.mkdir()
    Image.new("RGBA", (SIDE, SIDE), (255, 0, 0, 0)).save(folder / "ghost.png")
    with pytest.raises(DatasetError, match="None of the dataset images could be used"):
        _prepare(folder, alpha_weight=True)


def test_dataset_check_flags_fully_transparent_images(tmp_path) -> None:
    report = check_dataset(_dataset(tmp_path), CheckParams(width=SIDE, height=SIDE))
    flagged = [f for f in report.findings if f.kind == "transparent"]
    assert [f.path.name for f in flagged] == ["ghost.png"]
    assert "Use PNG alpha channel as loss weight" in flagged[0].message


def _train(folder: Path, tmp: Path, alpha_weight: bool):
    backend = LinearBackend()
    emb = create_embedding(backend, CreateParams(name="toy", init_text="red robot", overwrite=True), tmp / "emb").path
    start = formats.load_embedding(emb).embedding.single().clone()
    p = TrainParams(max_steps=6, learn_rate="0.05", resolution=SIDE, save_every=0, preview_every=0, csv_every=0,
                    val_every=0, comparison_grid=False, norm_warn=0, alpha_weight=alpha_weight)
    out = run_training(backend, RunRequest(emb, folder, tmp / "logs", p))
    end = formats.load_embedding(out.result.final_path).embedding.single()
    record = json.loads((out.paths.log_dir / "run.json").read_text())
    return start, end, record


def test_alpha_weight_changes_what_the_vectors_learn(tmp_path) -> None:
    """LinearBackend paints the left latent half from vector dims 0-3 and the right half from 4-7: with the left
    half transparent, those dims get exactly zero gradient, so they stay put; without the option they move."""
    folder = tmp_path / "data"
    folder.mkdir()
    _cut_out(folder / "cut.png")
    start, end, record = _train(folder, tmp_path / "on", alpha_weight=True)
    assert record["params"]["alpha_weight"] is True
    assert torch.equal(end[:, :4], start[:, :4])
    assert not torch.allclose(end[:, 4:], start[:, 4:])
    start, end, _ = _train(folder, tmp_path / "off", alpha_weight=False)
    assert not torch.allclose(end[:, :4], start[:, :4]) and not torch.allclose(end[:, 4:], start[:, 4:])


def test_validation_loss_is_weighted_like_the_training_loss(tmp_path) -> None:
    """Vectors differing only in the dims that paint the transparent half: same weighted validation loss."""
    from textual_inversion_ext.core.training.validation import ValidationSet

    folder = tmp_path / "data"
    folder.mkdir()
    _cut_out(folder / "cut.png")
    a = torch.zeros(1, 8)
    b = a.clone()
    b[0, :4] = 3.0
    for alpha_weight, same in ((True, True), (False, False)):
        val = ValidationSet(LinearBackend(), _prepare(folder, alpha_weight), "toy", ["a photo of [name]"])
        loss_a, loss_b = val.loss({"default": a}), val.loss({"default": b})
        assert (loss_a == loss_b) is same, (alpha_weight, loss_a, loss_b)


def test_the_option_is_one_declared_parameter() -> None:
    spec = {f.name: f for f in fields_of(TrainParams)}["alpha_weight"]
    assert spec.default is False and spec.flag == "--alpha-weight"
    assert spec.spec.label == "Use PNG alpha channel as loss weight"
