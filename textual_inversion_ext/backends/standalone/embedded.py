"""Models with random weights built from bundled configs: the embedded default and benchmarks.

Nothing is downloaded; the same variant and seed always give the same weights (and short hash)."""

from __future__ import annotations

import hashlib
import logging

import torch

from ...core.backend import ModelInfo
from ...core.embedding import SDXL_KEYS, SINGLE
from .backend import StandaloneBackend
from .base import DiffusersBackend
from .memory import trim_memory
from .models import ModelConfig, build_random, build_random_text_encoder_2, build_random_vae, cast, model_config
from .sdxl import StandaloneSDXLBackend

logger = logging.getLogger(__name__)

VARIANTS = ("tiny", "tiny-real-clip", "tiny-sdxl", "tiny-sdxl-real")
FAMILIES = ("sd1", "sd2", "sdxl")


def model_info(config: ModelConfig, name: str, short_hash: str | None) -> ModelInfo:
    """What the trainer is told about a model built from `config` (encoder widths from its text configs)."""
    if config.text_encoder_2 is None:
        encoders = {SINGLE: int(config.text_encoder["hidden_size"])}
    else:
        encoders = dict(zip(SDXL_KEYS, (int(config.text_encoder["hidden_size"]),
                                        int(config.text_encoder_2["hidden_size"]))))
    return ModelInfo(
        family=config.family,
        encoders=encoders,
        resolution=int(config.resolution),
        name=name,
        short_hash=short_hash,
        prediction=str(config.scheduler.get("prediction_type", "epsilon")),
        latent_channels=int(config.unet.get("in_channels", 4)),
        vae_scale=2 ** (len(config.vae["block_out_channels"]) - 1),
    )


def _backend(config: ModelConfig, label: str, seed: int, device: str | torch.device,
             dtype: torch.dtype) -> DiffusersBackend:
    modules = list(build_random(config, seed))
    if config.text_encoder_2 is not None:
        modules.append(build_random_text_encoder_2(config, seed))
    for module in modules:
        cast(module, dtype)
        module.to(device)
    trim_memory()  # the float32 build, freed by the cast
    # A generated model has no file: hash what determines its weights (config + seed).
    digest = hashlib.sha256(f"{label}\n{seed}\n{config.digest()}".encode()).hexdigest()
    info = model_info(config, f"{label}-seed{seed}", digest[:10])
    def vae_source() -> dict[str, torch.Tensor]:  # the same seed builds the same VAE
        return build_random_vae(config, seed).state_dict()

    if config.text_encoder_2 is not None:
        unet, vae, text_encoder, text_encoder_2 = modules
        return StandaloneSDXLBackend(unet, vae, text_encoder, text_encoder_2, config.scheduler, info, vae_source)
    unet, vae, text_encoder = modules
    return StandaloneBackend(unet, vae, text_encoder, config.scheduler, info, vae_source)


def embedded_config(variant: str = "tiny") -> ModelConfig:
    """The config of an embedded-default variant (see `embedded_default`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown embedded model variant {variant!r}; use one of {', '.join(VARIANTS)}")
    config = model_config("tiny-sdxl" if variant.startswith("tiny-sdxl") else "tiny")
    if variant == "tiny-real-clip":
        # Real-shape CLIP ViT-L/14 text encoder (123 M params, random weights); the UNet's
        # cross-attention must take its 768-wide output.
        config.text_encoder = model_config("sd1").text_encoder
        config.unet["cross_attention_dim"] = config.text_encoder["hidden_size"]
    elif variant == "tiny-sdxl-real":
        # SDXL's real encoder widths (768, 1280; projection 1280) so files have SDXL's shapes, with only two
        # layers each to stay quick; the UNet takes their concatenation and the pooled width.
        for key, width in (("text_encoder", 768), ("text_encoder_2", 1280)):
            getattr(config, key).update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                                        projection_dim=width)
        config.unet["cross_attention_dim"] = 768 + 1280
        config.unet["projection_class_embeddings_input_dim"] = 1280 + 6 * config.unet["addition_time_embed_dim"]
    return config


def embedded_default(
    variant: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DiffusersBackend:
    """A tiny model with random weights: trains and previews in seconds on a CPU.

    "tiny": SD1-shaped, 128 px, small UNet (32/64 channels) with cross-attention, 8x VAE, 2-layer 64-wide CLIP
    text encoder with the real 49408-token vocabulary and 77 positions. "tiny-real-clip": the same
    UNet/VAE with a real-shape CLIP ViT-L text encoder. "tiny-sdxl": SDXL-shaped (two text encoders, 32 and
    64 wide, a UNet with size conditioning); "tiny-sdxl-real": the same with SDXL's encoder widths 768/1280.
    They learn nothing about real images; they are for demos, tests and checking a set-up end to end."""
    return _backend(embedded_config(variant), f"embedded-{variant}", seed, device, dtype)


def random_model(
    family: str = "sd1",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DiffusersBackend:
    """A full-size SD1.5-, SD2.x- or SDXL-shaped model with random weights, for speed/memory benchmarks."""
    if family not in FAMILIES:
        raise ValueError(f"random_model supports {', '.join(map(repr, FAMILIES))}, not {family!r}")
    return _backend(model_config(family), f"random-{family}", seed, device, dtype)
