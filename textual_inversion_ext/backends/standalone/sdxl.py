"""`Backend` for SDXL on diffusers + transformers: two CLIP text encoders (clip_l, clip_g), a UNet with size
conditioning, and a VAE kept in float32 (STANDALONE-NOTES, SDXL)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ...core.backend import ModelInfo, SampleGeometry
from ...core.embedding import SDXL_KEYS
from ...core.errors import ModelError
from . import splice
from .base import DiffusersBackend, VaeSource
from .models import cast

logger = logging.getLogger(__name__)

CLIP_L, CLIP_G = SDXL_KEYS


@dataclass
class SDXLConditioning:
    """What SDXL's UNet is conditioned on, for a batch of B prompts."""

    context: torch.Tensor  # (B, 77·k, 2048): penultimate hidden states of clip_l and clip_g, concatenated
    pooled: torch.Tensor  # (B, 1280): clip_g's projected text embedding
    time_ids: torch.Tensor  # (B, 6): original (h, w), crop (y, x), target (h, w)


class StandaloneSDXLBackend(DiffusersBackend):
    """One SDXL model held in memory. `text_encoder` is its CLIP ViT-L (clip_l), `text_encoder_2` its OpenCLIP
    bigG with projection (clip_g); `encode_text` returns an `SDXLConditioning`."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        scheduler_config: dict[str, Any],
        info: ModelInfo,
        vae_source: VaeSource | None = None,
    ) -> None:
        if info.family != "sdxl" or set(info.encoders) != set(SDXL_KEYS):
            raise ModelError(f"StandaloneSDXLBackend needs an SDXL model with encoders {SDXL_KEYS}, "
                             f"got {info.family} {sorted(info.encoders)}.")
        # SDXL's VAE overflows in fp16: it stays float32 whatever the weights (as diffusers' force_upcast).
        cast(vae, torch.float32)
        # The first tokenizer pads with the end token, the second (and A1111 for clip_g) with id 0.
        super().__init__(unet, vae, {CLIP_L: (text_encoder, splice.EOS), CLIP_G: (text_encoder_2, 0)},
                         scheduler_config, info, vae_source)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def _time_ids(self, count: int, geometry: Sequence[SampleGeometry] | None) -> torch.Tensor:
        if geometry is None:  # unknown: whole images at the model's resolution
            side = self.info.resolution
            geometry = [SampleGeometry.uncropped(side, side)] * count
        if len(geometry) != count:
            raise ValueError(f"{len(geometry)} geometries for {count} prompts")
        return torch.tensor([g.as_tuple() for g in geometry], dtype=torch.float32, device=self.device)

    def encode_text(
        self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
        geometry: Sequence[SampleGeometry] | None = None,
    ) -> SDXLConditioning:
        vectors = self._checked(vectors)
        # Both encoders' penultimate layer, as diffusers' SDXL pipeline and A1111 take it; prompts over 75 tokens
        # in chunks (both encoders chunk alike: one tokenizer), the pooled output from the first chunk as A1111.
        hidden_l = self._encode(CLIP_L, prompts, trigger, vectors, lambda out: out.hidden_states[-2],
                                output_hidden_states=True)
        hidden_g, pooled = self._encode(CLIP_G, prompts, trigger, vectors,
                                        lambda out: (out.hidden_states[-2], out.text_embeds), output_hidden_states=True)
        context = torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1)
        return SDXLConditioning(context, pooled, self._time_ids(len(prompts), geometry))

    def _unet_kwargs(self, cond: SDXLConditioning) -> dict[str, Any]:
        return {
            "encoder_hidden_states": cond.context.to(self.dtype),
            "added_cond_kwargs": {"text_embeds": cond.pooled.to(self.dtype), "time_ids": cond.time_ids.to(self.dtype)},
        }

    def _pipeline(self, scheduler: Any) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=None,
            tokenizer_2=None, unet=self.unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )

    def _prompt_kwargs(self, cond: SDXLConditioning, neg: SDXLConditioning) -> dict[str, Any]:
        # The pipeline builds the same time ids from width/height (crop 0) as `encode_text` did for the preview.
        if cond.context.shape != neg.context.shape:  # different chunk counts: guidance runs both in one UNet batch
            padded = splice.pad_to_match(cond.context, neg.context, self.encode_text([""], "", {}).context)
            cond, neg = (replace(c, context=x) for c, x in zip((cond, neg), padded))
        return {"prompt_embeds": cond.context, "pooled_prompt_embeds": cond.pooled,
                "negative_prompt_embeds": neg.context, "negative_pooled_prompt_embeds": neg.pooled}
