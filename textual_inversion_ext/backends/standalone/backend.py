"""`Backend` on diffusers' UNet/VAE/noise schedule and transformers' CLIP text encoder, no host."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ...core.backend import ModelInfo, SampleGeometry
from ...core.embedding import SINGLE
from . import splice
from .base import SAMPLERS, DiffusersBackend, VaeSource

logger = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "StandaloneBackend"]


class StandaloneBackend(DiffusersBackend):
    """One SD1.x/SD2.x model held in memory: UNet, VAE, CLIP text encoder and a noise schedule.

    Conditioning (`encode_text`'s result) is the text encoder's last hidden state `(B, 77·k, dim)` in the
    model dtype, k = the batch's most 75-token chunks (1 for short prompts); SD2's diffusers text encoder
    already ends at OpenCLIP's penultimate layer."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        scheduler_config: dict[str, Any],
        info: ModelInfo,
        vae_source: VaeSource | None = None,
    ) -> None:
        # OpenCLIP (SD2) pads with id 0; SD1's CLIP tokenizer (and A1111) pads with EOS.
        pad_id = 0 if info.family == "sd2" else splice.EOS
        super().__init__(unet, vae, {SINGLE: (text_encoder, pad_id)}, scheduler_config, info, vae_source)
        self.text_encoder = text_encoder
        self.pad_id = pad_id

    @property
    def embedding_dim(self) -> int:
        return int(self.encoders[SINGLE].table.embedding_dim)

    def encode_text(
        self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
        geometry: Sequence[SampleGeometry] | None = None,
    ) -> torch.Tensor:
        """SD1/SD2 have no size conditioning: `geometry` is ignored. Prompts over 75 tokens are encoded in
        chunks (splice.prompt_chunks), the result is then (B, 77·k, dim)."""
        return self._encode(SINGLE, prompts, trigger, self._checked(vectors), lambda out: out.last_hidden_state)

    def _unet_kwargs(self, cond: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.to(self.dtype)}

    def _pipeline(self, scheduler: Any) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=None, unet=self.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )

    def _prompt_kwargs(self, cond: torch.Tensor, neg: torch.Tensor) -> dict[str, Any]:
        if cond.shape != neg.shape:  # different chunk counts: guidance runs both in one UNet batch
            cond, neg = splice.pad_to_match(cond, neg, self.encode_text([""], "", {}))
        return {"prompt_embeds": cond, "negative_prompt_embeds": neg}
