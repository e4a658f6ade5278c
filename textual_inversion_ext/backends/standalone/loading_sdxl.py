"""SDXL single-file checkpoints (sgm/A1111 layout): telling base from refiner, and their text encoders.

The UNet and VAE keep the ldm layout of SD1/SD2 and go through the same diffusers converters
(loading.py). Only the conditioner is new: `conditioner.embedders.0.transformer.` holds CLIP ViT-L in
transformers' own layout (clip_l), `conditioner.embedders.1.model.` OpenCLIP ViT-bigG (clip_g), which
diffusers' `convert_open_clip_checkpoint` turns into a `CLIPTextModelWithProjection` state dict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextModelWithProjection

from ...core.errors import ModelError

logger = logging.getLogger(__name__)

PREFIX = "conditioner.embedders."
CLIP_L = PREFIX + "0.transformer."
CLIP_G = PREFIX + "1.model."
REFINER_G = PREFIX + "0.model."  # the refiner's only text encoder


def is_sdxl(keys: Iterable[str], name: str) -> bool:
    """True for an SDXL base conditioner (clip_l + clip_g), False for none; ModelError for a refiner or
    a conditioner missing one of its encoders."""
    keys = list(keys)
    if not any(k.startswith(PREFIX) for k in keys):
        return False
    has_l = any(k.startswith(CLIP_L) for k in keys)
    has_g = any(k.startswith(CLIP_G) for k in keys)
    if not has_l and any(k.startswith(REFINER_G) for k in keys):
        raise ModelError(
            f"{name} is an SDXL refiner (its only text encoder, {REFINER_G}*, is OpenCLIP bigG; there is no "
            "CLIP ViT-L). Embeddings are trained on the base model and work with the refiner's clip_g only: "
            "train on SDXL base 1.0 (or a fine-tune of it); the same embedding file then also loads with "
            "the refiner."
        )
    if not (has_l and has_g):
        missing = [what for what, ok in ((f"clip_l {CLIP_L}*", has_l), (f"clip_g {CLIP_G}*", has_g)) if not ok]
        raise ModelError(
            f"{name} has SDXL conditioner keys ({PREFIX}*) but no {' or '.join(missing)}: it is not a "
            "complete SDXL base checkpoint. Use the full single-file .safetensors as the web UI loads it."
        )
    return True


def clip_l_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clip_l as a transformers `CLIPTextModel` state dict (keys under `text_model.`)."""
    return convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_L)})


def clip_g_state(state: dict[str, torch.Tensor], model: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """clip_g as a `CLIPTextModelWithProjection` state dict; `model` (meta is fine) gives its width."""
    width = model.config.hidden_size
    projection = state.get(CLIP_G + "text_projection")
    # diffusers splits OpenCLIP's fused qkv at the projection's first dimension: it must be the width.
    if projection is not None and projection.shape[0] != width:
        raise ModelError(
            f"The checkpoint's clip_g text projection is {tuple(projection.shape)}, but the clip_g config has "
            f"width {width}. Is it a fine-tune with a different architecture? Pass config=... describing it."
        )
    return convert_open_clip_checkpoint(model, {k: v for k, v in state.items() if k.startswith(CLIP_G)},
                                        prefix=CLIP_G)
