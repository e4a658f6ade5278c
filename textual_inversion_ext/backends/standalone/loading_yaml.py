"""A checkpoint's architecture from the ldm/sgm `.yaml` beside it, as A1111 and Forge read it.

A1111 builds a checkpoint from `<name>.yaml` when there is one, so custom-shaped models (smaller UNets,
other VAE widths) load there. We do the same for the UNet, VAE and noise schedule, with diffusers' own
translators (`create_unet_diffusers_config_from_ldm`, `create_vae_diffusers_config_from_ldm`, what its
`from_single_file(original_config=...)` uses), merged over the family's bundled config; the text encoders
stay the bundled ones: an ldm/sgm yaml names them (CLIP ViT-L, OpenCLIP ViT-H/bigG) rather than describing
them. A yaml without a UNet section (e.g. one that only sets `parameterization`) leaves the bundled
architecture in place. Offline: the yaml is read from disk, nothing is fetched.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from ...core.errors import ModelError
from .models import ModelConfig

logger = logging.getLogger(__name__)

# Derived VAE keys we take; the rest (sample_size, Playground's latents_mean tensors) stay bundled/out.
_VAE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "latent_channels", "layers_per_block", "scaling_factor")
_SDXL_TIME_EMBEDDER = "ConcatTimestepEmbedderND"


def read_original_config(yaml_path: Path) -> dict[str, Any] | None:
    """The yaml as a dict when it describes an architecture (a UNet and a first stage), else None."""
    if not yaml_path.is_file():
        return None
    try:
        data = yaml.safe_load(yaml_path.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        what = " ".join(str(exc).split())  # yaml's messages span several lines
        raise ModelError(f"{yaml_path.name} (beside the checkpoint) is not a readable yaml file ({what}); fix or "
                         "remove it, or pass config=... describing the model.") from exc
    params = (data.get("model") or {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        return None
    has_unet = isinstance(params.get("unet_config") or params.get("network_config"), dict)
    return data if has_unet and isinstance(params.get("first_stage_config"), dict) else None


def _sdxl_time_dim(params: dict[str, Any]) -> int:
    """SDXL's size-conditioning embedding width (`outdim` of its ConcatTimestepEmbedderND embedders)."""
    for emb in (params.get("conditioner_config") or {}).get("params", {}).get("emb_models") or []:
        if str(emb.get("target", "")).endswith(_SDXL_TIME_EMBEDDER):
            return int((emb.get("params") or {}).get("outdim", 256))
    return 256


def config_from_yaml(original: dict[str, Any], base: ModelConfig, state: dict[str, torch.Tensor],
                     name: str) -> ModelConfig:
    """`base` (the family's bundled config) with the UNet, VAE and schedule the ldm/sgm yaml describes."""
    params = original["model"]["params"]
    try:
        unet = create_unet_diffusers_config_from_ldm(original, state)
        vae = create_vae_diffusers_config_from_ldm(original, state)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"{name}: the UNet/VAE sections of the yaml could not be read ({exc!r}); fix or remove "
                         "the yaml, or pass config=... describing the model.") from exc
    # sample_size is only a default for pipelines; in_channels stays the family's so that inpainting
    # models are still refused (their yaml says 9).
    unet.pop("sample_size", None)
    unet.pop("in_channels", None)
    if base.family == "sdxl":
        # diffusers tells SDXL by its context width (2048/1280); the key layout already told us.
        unet.update(addition_embed_type="text_time", class_embed_type=None,
                    addition_time_embed_dim=_sdxl_time_dim(params))
    cfg = copy.deepcopy(base)
    cfg.unet = {**cfg.unet, **unet}
    cfg.vae = {**cfg.vae, **{k: vae[k] for k in _VAE_KEYS if k in vae}}
    for ours, theirs in (("beta_start", "linear_start"), ("beta_end", "linear_end"),
                         ("num_train_timesteps", "timesteps")):
        if theirs in params:
            cfg.scheduler[ours] = type(cfg.scheduler.get(ours, params[theirs]))(params[theirs])
    logger.info("%s: UNet %s, VAE %s from its yaml", name, unet["block_out_channels"], vae["block_out_channels"])
    return cfg
