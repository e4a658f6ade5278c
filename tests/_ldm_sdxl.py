"""Test helper: write diffusers/transformers SDXL modules as an sgm/A1111 single-file state dict.

The inverse of what the loader does with diffusers' converters, so tests can make SDXL files shaped
like the ones users have: the UNet and VAE in the ldm layout of `_ldm_layout` (plus SDXL's
`label_emb`, the size/pooled-text embedding), clip_l under `conditioner.embedders.0.transformer.`,
clip_g as OpenCLIP under `conditioner.embedders.1.model.` (a refiner has only that encoder, at 0).
"""

from __future__ import annotations

from typing import Any

import _ldm_layout as ldm
import torch
from torch import nn

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
REFINER_G = "conditioner.embedders.0.model."
_SD2_G = "cond_stage_model.model."
_ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    extra = {k: v for k, v in state.items() if k.startswith("add_embedding.")}
    out = ldm.unet_to_ldm({k: v for k, v in state.items() if k not in extra}, config)
    for key, value in extra.items():
        head = next(h for h in _ADD_EMBEDDING if key.startswith(h))
        out[UNET + _ADD_EMBEDDING[head] + key.removeprefix(head)] = value
    return out


def clip_l_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """clip_l as sgm stores it: the HF CLIP text model (with its position_ids, as many real files)."""
    state = {k.replace("cond_stage_model.transformer.", CLIP_L, 1): v for k, v in ldm.clip_to_ldm(text_encoder).items()}
    state[CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return state


def clip_g_to_ldm(text_encoder_2: nn.Module, prefix: str = CLIP_G) -> dict[str, torch.Tensor]:
    """clip_g (a `CLIPTextModelWithProjection`) as OpenCLIP: fused qkv, `text_projection` (width, dim)."""
    layers = text_encoder_2.config.num_hidden_layers
    sd2 = ldm.open_clip_to_ldm(text_encoder_2.text_model)  # SD2 layout, plus an extra block SDXL lacks
    out = {prefix + k.removeprefix(_SD2_G): v for k, v in sd2.items() if f".resblocks.{layers}." not in k}
    out[prefix + "text_projection"] = text_encoder_2.text_projection.weight.detach().T.contiguous()
    return out


def sdxl_to_ldm(unet, vae, text_encoder, text_encoder_2, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        **unet_to_ldm(unet.state_dict(), config["unet"]),
        **ldm.vae_to_ldm(vae.state_dict(), config["vae"]),
        **clip_l_to_ldm(text_encoder),
        **clip_g_to_ldm(text_encoder_2),
    }
