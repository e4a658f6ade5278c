"""Forge backend parts that need no Forge (the real one: tests/host/forge/ and tests/host/test_forge_*.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from textual_inversion_ext.backends.forge.backend import check_supported, normal_tensors
from textual_inversion_ext.core.errors import ModelError


def _forge_model(**flags) -> SimpleNamespace:
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=flags.pop("in_channels", 4)))
    objects = SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
    return SimpleNamespace(forge_objects=objects, **flags)


@pytest.mark.parametrize(("model", "expected"), [
    (_forge_model(is_sd1=True), "sd1"),
    (_forge_model(is_sd2=True), "sd2"),
    (_forge_model(is_sdxl=True, text_processing_engine_l=1, text_processing_engine_g=2), "sdxl"),
])
def test_forge_families(model, expected):
    assert check_supported(model) == expected


@pytest.mark.parametrize(("model", "message"), [
    (SimpleNamespace(cond_stage_model=None), "has not loaded a checkpoint yet"),  # Forge's FakeInitialModel
    (_forge_model(is_sdxl=True, text_processing_engine_g=2), "refiner"),
    (_forge_model(is_sd3=True), "SD3, Flux"),
    (_forge_model(is_sd1=True, in_channels=9), "Inpainting"),
])
def test_forge_refusals_say_what_to_do(model, message):
    with pytest.raises(ModelError, match=message):
        check_supported(model)


def test_inference_tensors_made_ordinary_in_place_so_autograd_can_save_them():
    """Forge loads models under inference_mode; a frozen weight used by a differentiable op must be saved."""
    with torch.inference_mode():
        layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    layer.requires_grad_(False)
    weight = layer[0].weight
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        layer(x).sum().backward()
    assert normal_tensors(layer) == 4 and normal_tensors(layer) == 0  # once only
    assert not layer[0].weight.is_inference() and not layer[0].weight.requires_grad  # flags kept
    torch.testing.assert_close(layer[0].weight, weight)
    layer(x).sum().backward()
    assert x.grad is not None
