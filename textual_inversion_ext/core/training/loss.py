"""The denoising loss per sample, shared by every backend: noising, the eps/v target, (weighted) MSE.

A backend only runs its UNet on what `add_noise` gives it; the schedule arithmetic lives here once and
runs in float32 from the model's ᾱ (cumulative alpha) table: in fp16, ᾱ near 1 keeps only ~3 digits.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("epsilon", "v_prediction")
_EMPTY_WEIGHT = 1e-12  # a sample whose weights sum to (almost) nothing contributes 0, not 0/0


def _coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) per sample, shaped to broadcast over a `(B, ...)` latent."""
    abar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps.long()]
    shape = (-1,) + (1,) * (ndim - 1)
    return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 - ᾱ_t)·ε (diffusers' `add_noise`, ldm's `q_sample`)."""
    a, s = _coefficients(alphas_cumprod, timesteps, latents.ndim)
    return a * latents.float() + s * noise.float()


def prediction_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction: str,
                      alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """What the UNet should output: the noise (`epsilon`) or v = sqrt(ᾱ_t)·ε - sqrt(1 - ᾱ_t)·x_0
    (`v_prediction`; needs `alphas_cumprod`)."""
    if prediction == "epsilon":
        return noise.float()
    if prediction != "v_prediction":
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    if alphas_cumprod is None:
        raise ValueError("v-prediction needs the model's alphas_cumprod")
    a, s = _coefficients(alphas_cumprod, timesteps, latents.ndim)
    return a * noise.float() - s * latents.float()


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample `(B,)`, in float32.

    `weight` (e.g. `(B, 1, h, w)` from the images' alpha, broadcast over channels) makes it the weighted mean
    Σw·err / Σw: scale-free, so a weight map only moves emphasis, never the loss level, and all-ones weights
    give the plain mean. A sample whose weights sum to ~0 gives 0 (no gradient) instead of NaN."""
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, err.ndim))
    if weight is None:
        return err.mean(dim=dims)
    w = weight.to(err.device, torch.float32).expand_as(err)
    return (err * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(_EMPTY_WEIGHT)
