"""Forge backend parts that need no Forge (the real one: tests/host/forge/ and tests/host/test_forge_*.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from textual_inversion_ext.backends.forge.backend import check_supported, normal_tensors, residual_safe_norms
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
    assert layer[0].weight.data_ptr() == weight.data_ptr()  # the same memory: no second copy of a model
    layer(x).sum().backward()
    assert x.grad is not None


def test_a_weight_shared_by_two_modules_stays_shared():
    with torch.inference_mode():
        first, second = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    second.weight = first.weight  # tied, as some text encoders tie their tables
    tied = torch.nn.ModuleList([first, second])
    assert normal_tensors(tied) == 1
    assert second.weight is first.weight and not first.weight.is_inference()
    assert len(list(tied.parameters())) == 1


class _InPlaceResidualBlock(torch.nn.Module):
    """Forge's transformer-block pattern: normalise the residual stream, then add to it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        x += self.norm1(x)
        x += self.norm2(x)
        return x


def test_norms_copy_their_input_so_in_place_residual_adds_keep_the_backward_valid():
    block = _InPlaceResidualBlock()
    vec = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        block(vec).sum().backward()
    with residual_safe_norms(block) as covered:
        out = block(vec)
        out.pow(2).sum().backward()
    assert covered == 2 and vec.grad is not None and torch.isfinite(vec.grad).all()
    reference = vec.detach().clone().requires_grad_(True)  # the same maths, out of place
    x = reference * 1.0
    x = x + block.norm1(x)
    x = x + block.norm2(x)
    x.pow(2).sum().backward()
    assert torch.allclose(vec.grad, reference.grad) and torch.allclose(out, x)
    assert not block.norm1._forward_pre_hooks  # hooks removed after the block
