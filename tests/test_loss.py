"""The shared per-sample loss (`core.training.loss`) and vector check (`core.embedding.check_vectors`), and that
both backends use them: the standalone one on the tiny model, the A1111 one on a fake ldm model (tests/fake_host)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from textual_inversion_ext.core.embedding import SINGLE, check_vectors
from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.core.training.loss import add_noise, per_sample_loss, prediction_target

FAKE_HOST = Path(__file__).parent / "fake_host"


def _schedule() -> torch.Tensor:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def _batch(seed: int = 0, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 500, 999][:n])


# ----------------------------------------------------------------- the loss itself


def test_noising_and_targets_match_diffusers_and_ldm() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, noise, t = _batch()
    abar = scheduler.alphas_cumprod
    torch.testing.assert_close(add_noise(latents, noise, t, abar), scheduler.add_noise(latents, noise, t))
    torch.testing.assert_close(prediction_target(latents, noise, t, "v_prediction", abar),
                               scheduler.get_velocity(latents, noise, t))
    torch.testing.assert_close(prediction_target(latents, noise, t, "epsilon"), noise)
    # ldm's q_sample/get_v use sqrt tables made in float64
    a = abar.double().sqrt()[t].view(-1, 1, 1, 1)
    s = (1 - abar.double()).sqrt()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(add_noise(latents, noise, t, abar), (a * latents + s * noise).float())
    torch.testing.assert_close(prediction_target(latents, noise, t, "v_prediction", abar),
                               (a * noise - s * latents).float())
    with pytest.raises(ValueError, match="unknown prediction"):
        prediction_target(latents, noise, t, "sample", abar)


def test_weight_is_a_scale_free_weighted_mean_and_never_nan() -> None:
    latents, noise, _ = _batch()
    plain = per_sample_loss(latents, noise)
    assert plain.shape == (3,) and plain.dtype == torch.float32
    torch.testing.assert_close(plain, (latents - noise).pow(2).mean(dim=(1, 2, 3)))
    ones = torch.ones(3, 1, 8, 8)
    torch.testing.assert_close(per_sample_loss(latents, noise, ones), plain)
    torch.testing.assert_close(per_sample_loss(latents, noise, ones * 7), plain)  # only emphasis, not level
    half = torch.zeros(3, 1, 8, 8)
    half[..., 4:] = 1
    torch.testing.assert_close(per_sample_loss(latents, noise, half),
                               (latents - noise)[..., 4:].pow(2).mean(dim=(1, 2, 3)))
    # what is weighted 0 cannot move the loss, and an all-zero map gives 0, not 0/0
    pred = latents.clone().requires_grad_(True)
    empty = half.clone()
    empty[1] = 0
    loss = per_sample_loss(pred, noise, empty)
    assert torch.isfinite(loss.detach()).all() and float(loss.detach()[1]) == 0.0
    loss.sum().backward()
    assert float(pred.grad[..., :4].abs().sum()) == 0.0 and float(pred.grad[1].abs().sum()) == 0.0
    assert float(pred.grad[0, ..., 4:].abs().sum()) > 0


# ----------------------------------------------------------------- the vector check


def test_check_vectors_accepts_a_match_and_names_every_mismatch() -> None:
    sd1 = {SINGLE: torch.zeros(2, 768)}
    assert check_vectors(sd1, {SINGLE: 768}) is sd1
    xl = {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}
    assert check_vectors(xl, {"clip_l": 768, "clip_g": 1280}) is xl
    with pytest.raises(ModelError, match=r"need vectors under \['default'\].*an SDXL embedding on an SD1/SD2"):
        check_vectors(xl, {SINGLE: 768})
    with pytest.raises(ModelError, match="an SD1/SD2 embedding on an SDXL model"):
        check_vectors(sd1, {"clip_l": 768, "clip_g": 1280})
    with pytest.raises(ModelError, match=r"shape \(2, 1024\).*needs \(n, 768\).*another model family"):
        check_vectors({SINGLE: torch.zeros(2, 1024)}, {SINGLE: 768})
    with pytest.raises(ModelError, match=r"'clip_g' vectors have shape \(2, 768\)"):
        check_vectors({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 768)}, {"clip_l": 768, "clip_g": 1280})
    with pytest.raises(ModelError, match="shape"):
        check_vectors({SINGLE: torch.zeros(768)}, {SINGLE: 768})
    with pytest.raises(ModelError, match="different number of vectors"):
        check_vectors({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, {"clip_l": 768, "clip_g": 1280})


# ----------------------------------------------------------------- both backends use them


def test_standalone_backend_weighted_loss_and_vector_check(tiny_backend) -> None:
    g = torch.Generator().manual_seed(1)
    latents = tiny_backend.encode_images(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1).mean
    noise, t = torch.randn(latents.shape, generator=g), torch.tensor([100, 700])
    abar = tiny_backend.noise_scheduler.alphas_cumprod
    left = torch.zeros(2, 1, *latents.shape[-2:])
    left[..., : latents.shape[-1] // 2] = 1
    grads = {}
    for name, weight in (("plain", None), ("ones", torch.ones_like(left)), ("left", left)):
        vec = {SINGLE: torch.randn(2, tiny_backend.embedding_dim, generator=torch.Generator().manual_seed(2))}
        vec[SINGLE].requires_grad_(True)
        cond = tiny_backend.encode_text(["a photo of toy"] * 2, "toy", vec)
        loss = tiny_backend.training_loss(latents, cond, noise, t, weight)
        with torch.no_grad():
            pred = tiny_backend.unet(add_noise(latents, noise, t, abar), t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(loss, per_sample_loss(pred, noise, weight))
        loss.sum().backward()
        grads[name] = vec[SINGLE].grad
    torch.testing.assert_close(grads["ones"], grads["plain"])
    assert not torch.allclose(grads["left"], grads["plain"])  # the weight changes what the vectors learn
    with pytest.raises(ModelError, match="another model family"):
        tiny_backend.encode_text(["toy"], "toy", {SINGLE: torch.zeros(1, tiny_backend.embedding_dim + 1)})


class _FakeLdm(torch.nn.Module):
    """The parts of an ldm LatentDiffusion the A1111 backend's loss touches: a one-conv 'UNet' that also reads
    the conditioning, and the ᾱ tables (`alphas_cumprod` downcast the way a txt2img may leave it)."""

    is_sd1, is_sd2, is_sdxl, parameterization, sd_checkpoint_info = True, False, False, "v", None

    def __init__(self) -> None:
        super().__init__()
        self.unet = torch.nn.Conv2d(4, 4, 3, padding=1)
        abar = _schedule()
        self.alphas_cumprod_original = abar
        self.alphas_cumprod = abar.half()  # as after a txt2img with "Downcast alphas_cumprod"
        self.cond_stage_model = SimpleNamespace(wrapped=SimpleNamespace(transformer=SimpleNamespace(
            text_model=SimpleNamespace(embeddings=SimpleNamespace(token_embedding=torch.nn.Embedding(10, 8))))))
        self.model = SimpleNamespace(conditioning_key="crossattn")

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x) + cond.mean(1).view(-1, 1, 1, 1)


@pytest.fixture
def a1111_backend(monkeypatch):
    """An A1111Backend over `_FakeLdm`, built with the fake host's `modules` (removed again afterwards)."""
    def drop() -> None:
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]

    drop()
    monkeypatch.syspath_prepend(str(FAKE_HOST))
    importlib.import_module("modules.shared")
    from textual_inversion_ext.backends.a1111.backend import A1111Backend

    yield A1111Backend(_FakeLdm())
    drop()


def test_a1111_backend_uses_the_shared_loss_with_weights(a1111_backend) -> None:
    m = a1111_backend.model
    assert a1111_backend.info.prediction == "v_prediction"
    latents, noise, t = _batch(3)
    abar = m.alphas_cumprod_original
    left = torch.zeros(3, 1, 8, 8)
    left[..., :4] = 1
    grads = {}
    for name, weight in (("plain", None), ("left", left)):
        cond = torch.ones(3, 8, requires_grad=True)
        loss = a1111_backend.training_loss(latents, cond, noise, t, weight)
        with torch.no_grad():  # the float32 schedule as loaded, not the downcast `alphas_cumprod`
            expected = per_sample_loss(m.apply_model(add_noise(latents, noise, t, abar), t, cond),
                                       prediction_target(latents, noise, t, "v_prediction", abar), weight)
        torch.testing.assert_close(loss, expected)
        loss.sum().backward()
        grads[name] = cond.grad
    assert not torch.allclose(grads["left"], grads["plain"])
    with pytest.raises(ModelError, match="an SDXL embedding on an SD1/SD2 model"):
        a1111_backend._host_vec({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)})


def test_visiting_brings_an_offloaded_vae_home_for_the_block_only() -> None:
    """The one helper both backends' previews use while the VAE is offloaded to RAM."""
    from textual_inversion_ext.core.backend import visiting

    moves: list[str] = []

    class Recording(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moves.append(str(args[0]))
            return self

    vae = Recording(1, 1)
    with visiting(vae, None):
        pass
    assert moves == []  # not offloaded: left alone
    with pytest.raises(RuntimeError), visiting(vae, torch.device("cuda", 0)):
        assert moves == ["cuda:0"]
        raise RuntimeError("preview failed")
    assert moves == ["cuda:0", "cpu"]  # back to RAM, also on error
