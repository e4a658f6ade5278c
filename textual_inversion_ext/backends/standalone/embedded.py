"""Models with random weights built from bundled configs: the embedded default and benchmarks.

Nothing is downloaded; the same variant and seed always give the same weights (and short hash)."""

from __future__ import annotations

import hashlib
import logging

import torch

from ...core.backend import ModelInfo
from ...core.embedding import SINGLE
from .backend import StandaloneBackend
from .models import ModelConfig, build_random, cast, model_config

logger = logging.getLogger(__name__)

VARIANTS = ("tiny", "tiny-real-clip")


def _backend(config: ModelConfig, label: str, seed: int, device: str | torch.device,
             dtype: torch.dtype) -> StandaloneBackend:
    unet, vae, text_encoder = build_random(config, seed)
    for module in (unet, vae, text_encoder):
        cast(module, dtype)
        module.to(device)
    # A generated model has no file: hash what determines its weights (config + seed).
    digest = hashlib.sha256(f"{label}\n{seed}\n{config.digest()}".encode()).hexdigest()
    info = ModelInfo(
        family=config.family,
        encoders={SINGLE: int(config.text_encoder["hidden_size"])},
        resolution=int(config.resolution),
        name=f"{label}-seed{seed}",
        short_hash=digest[:10],
        prediction=str(config.scheduler.get("prediction_type", "epsilon")),
        latent_channels=int(config.unet.get("in_channels", 4)),
        vae_scale=2 ** (len(config.vae["block_out_channels"]) - 1),
    )
    return StandaloneBackend(unet, vae, text_encoder, config.scheduler, info)


def embedded_config(variant: str = "tiny") -> ModelConfig:
    """The config of an embedded-default variant (see `embedded_default`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown embedded model variant {variant!r}; use one of {', '.join(VARIANTS)}")
    config = model_config("tiny")
    if variant == "tiny-real-clip":
        # Real-shape CLIP ViT-L/14 text encoder (123 M params, random weights); the UNet's
        # cross-attention must take its 768-wide output.
        config.text_encoder = model_config("sd1").text_encoder
        config.unet["cross_attention_dim"] = config.text_encoder["hidden_size"]
    return config


def embedded_default(
    variant: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> StandaloneBackend:
    """A tiny SD1-shaped model with random weights: trains and previews in seconds on a CPU.

    "tiny": 128 px, small UNet (32/64 channels) with cross-attention, 8x VAE, 2-layer 64-wide CLIP
    text encoder with the real 49408-token vocabulary and 77 positions. "tiny-real-clip": the same
    UNet/VAE with a real-shape CLIP ViT-L text encoder. It learns nothing about real images; it is
    for demos, tests and checking a set-up end to end."""
    return _backend(embedded_config(variant), f"embedded-{variant}", seed, device, dtype)


def random_model(
    family: str = "sd1",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> StandaloneBackend:
    """A full-size SD1.5- (or SD2.x-) shaped model with random weights, for speed/memory benchmarks."""
    if family not in ("sd1", "sd2"):
        raise ValueError(f"random_model supports 'sd1' and 'sd2', not {family!r}")
    return _backend(model_config(family), f"random-{family}", seed, device, dtype)
