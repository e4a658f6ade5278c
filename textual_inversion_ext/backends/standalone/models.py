"""Bundled model configs and building diffusers/transformers modules from them (no downloads)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ...core.errors import ModelError

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
BUNDLED = ("sd1", "sd2", "tiny", "sdxl", "tiny-sdxl")


@dataclass
class ModelConfig:
    """Configs of one model: diffusers UNet/VAE/scheduler configs and transformers CLIP text configs.

    `text_encoder_2`: SDXL's second text encoder (OpenCLIP bigG, `CLIPTextModelWithProjection`); None for
    SD1/SD2. SDXL's `text_encoder` is its CLIP ViT-L."""

    family: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        # Only SDXL has the key, so SD1/SD2 digests (the embedded models' short hashes) stay as they were.
        extra = {} if self.text_encoder_2 is None else {"text_encoder_2": copy.deepcopy(self.text_encoder_2)}
        return {
            "family": self.family,
            "resolution": self.resolution,
            **{k: copy.deepcopy(getattr(self, k)) for k in COMPONENTS},
            **extra,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def model_config(source: str | Path | dict[str, Any]) -> ModelConfig:
    """A bundled config by name (see `BUNDLED`), a JSON file of the same shape, or a dict."""
    if isinstance(source, dict):
        data = copy.deepcopy(source)
        origin = "the given config dict"
    elif isinstance(source, str) and source in BUNDLED:
        text = resources.files(f"{__package__}.configs").joinpath(f"{source}.json").read_text("utf-8")
        data, origin = json.loads(text), f"bundled config {source!r}"
    else:
        path = Path(source)
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"Cannot read model config {path}: {exc}") from exc
        origin = str(path)
    missing = [k for k in ("family", "resolution", *COMPONENTS) if k not in data]
    if missing:
        raise ModelError(
            f"Model config from {origin} lacks {', '.join(missing)}; see standalone/configs/sd1.json."
        )
    if data["family"] == "sdxl" and not data.get("text_encoder_2"):
        raise ModelError(f"Model config from {origin} is SDXL but lacks text_encoder_2; see standalone/configs/"
                         "tiny-sdxl.json.")
    return ModelConfig(**{k: data[k] for k in ("family", "resolution", *COMPONENTS)},
                       text_encoder_2=data.get("text_encoder_2"))


def fix_random_init(vae: AutoencoderKL, text_encoder: torch.nn.Module, generator: torch.Generator) -> None:
    """Make randomly initialised modules behave like trained ones where it matters.

    transformers initialises the final LayerNorm with bias 0, so every output token has mean ~0 and
    A1111-style emphasis rescaling (dividing by the mean) goes NaN (STANDALONE-NOTES). A random VAE
    has a posterior std of ~1, which would drown its latents (std ~0.25) in sampling noise; trained
    VAEs are nearly deterministic, so give the log-variance a low constant."""
    _fix_final_norm(text_encoder, generator)
    _fix_vae(vae)


def _fix_vae(vae: AutoencoderKL) -> None:
    """A nearly deterministic posterior, as trained VAEs have (see `fix_random_init`); uses no randomness."""
    with torch.no_grad():
        if vae.quant_conv is not None:
            latent = vae.config.latent_channels
            vae.quant_conv.weight[latent:].zero_()
            vae.quant_conv.bias[latent:].fill_(-8.0)  # std = exp(-4) ~ 0.02


def cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast weights in place. Plain `nn.Module.to`: diffusers' `to()` warns about "modules to keep in
    float32" on every dtype cast, even when there are none (diffusers 0.42)."""
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        torch.nn.Module.to(module, dtype=dtype)


def build_random(config: ModelConfig, seed: int) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """UNet, VAE and CLIP text encoder with random weights; same config + seed -> same weights.

    Built on CPU in float32 so the weights do not depend on the target device. diffusers' default
    initialisation has no zero-initialised output layers, so the embedding gets a real gradient."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config.unet)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(config.vae)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_encoder))
    fix_random_init(vae, text_encoder, torch.Generator().manual_seed(seed + 3))
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder


def build_random_vae(config: ModelConfig, seed: int) -> AutoencoderKL:
    """The VAE of `build_random(config, seed)` alone, the same weights (so it can be rebuilt after release)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(config.vae)
    _fix_vae(vae)
    return vae.eval()


def build_random_text_encoder_2(config: ModelConfig, seed: int) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder with random weights (seeded apart from `build_random`'s modules)."""
    if config.text_encoder_2 is None:
        raise ModelError(f"A {config.family} config has no text_encoder_2.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_encoder_2))
    _fix_final_norm(text_encoder_2, torch.Generator().manual_seed(seed + 5))
    return text_encoder_2.eval()


def _fix_final_norm(text_encoder: torch.nn.Module, generator: torch.Generator) -> None:
    """A trained-looking final LayerNorm (see `fix_random_init`)."""
    owner = getattr(text_encoder, "text_model", text_encoder)  # transformers >= 5.6 has no `.text_model`
    norm = owner.final_layer_norm
    with torch.no_grad():
        dim = norm.bias.shape[0]
        norm.bias.copy_(0.5 + 0.3 * torch.randn(dim, generator=generator))
        norm.weight.copy_(1.0 + 0.2 * torch.randn(dim, generator=generator))
