"""A linear "diffusion model" implementing the Backend protocol, for trainer tests that need the
conditioning to matter a lot.

On the embedded tiny model (random weights) and on the quality benchmark's small pretrained model the
embedding moves the fixed-noise loss by well under 1 %, so a real overtraining curve cannot be
provoked there in a unit test. Here the embedding's mean vector *is* the predicted image: its first
four numbers paint the left half of the latent, the last four the right half, and the loss is the
distance to the image's latent. Training on one image pulls the vectors towards it, so a held-out
image that shares the left half but has a darker right half is first helped, then hurt — textbook
overtraining, deterministic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from textual_inversion_ext.core.backend import LatentDist, ModelInfo
from textual_inversion_ext.core.tokens import VOCAB_SIZE
from textual_inversion_ext.core.training.loss import per_sample_loss

DIM, LATENT = 8, 8  # embedding width; latent side (64 px images, 8x "VAE")


class LinearBackend:
    info = ModelInfo(family="sd1", encoders={"default": DIM}, resolution=64, name="linear", short_hash="1inear0000")
    device = torch.device("cpu")
    weight_dtype = torch.float32
    num_train_timesteps = 1000

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB_SIZE, DIM, generator=gen) * 0.1
        # code (8) -> latent (4, 8, 8): code[:4] fills the left half per channel, code[4:] the right half
        decoder = torch.zeros(4, LATENT, LATENT, DIM)
        for channel in range(4):
            decoder[channel, :, : LATENT // 2, channel] = 1
            decoder[channel, :, LATENT // 2 :, 4 + channel] = 1
        self.decoder = decoder.view(-1, DIM)

    def token_rows(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"default": self.table[torch.tensor(list(token_ids), dtype=torch.long)].clone()}

    def encode_text(self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
                    geometry: object = None) -> torch.Tensor:
        code = vectors["default"].mean(0)
        return torch.stack([code if trigger in p else torch.zeros_like(code) for p in prompts])

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        small = F.adaptive_avg_pool2d(pixels.float(), LATENT)
        latent = torch.cat([small, small.mean(1, keepdim=True)], 1)
        return LatentDist(latent, torch.zeros_like(latent))

    def training_loss(self, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # The clean-latent error: what a diffusion loss measures once noise and timestep are factored out,
        # so one training image gives a smooth curve.
        predicted = (cond @ self.decoder.T).view_as(latents)
        return per_sample_loss(predicted, latents, weight)

    def preview(self, prompt: str, trigger: str, vectors: dict[str, torch.Tensor], *, seed: int, steps: int,
                width: int, height: int, cfg_scale: float, negative_prompt: str = "", sampler: str = "",
                should_stop=None) -> Image.Image:
        latent = (self.encode_text([prompt], trigger, vectors) @ self.decoder.T).view(4, LATENT, LATENT)
        rgb = ((latent[:3].clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(rgb).resize((width, height))

    def samplers(self) -> list[str]:
        return ["linear"]

    def training_session(self, options) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
