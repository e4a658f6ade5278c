"""Loss on the training images with fixed noise, timesteps and prompts: comparable across steps."""

from __future__ import annotations

import random

import torch

from ..backends.protocol import Backend
from .dataset import TrainingSet, derive_seed
from .templates import PromptBuilder


@torch.no_grad()
def fixed_loss(
    backend: Backend,
    data: TrainingSet,
    name: str,
    vectors: dict[str, torch.Tensor],
    template_lines: list[str],
    *,
    seed: int = 0,
    timesteps_per_image: int = 4,
) -> float:
    """Mean denoising loss over every image × a fixed, evenly spread set of timesteps."""
    prompts = PromptBuilder(template_lines, name)
    n_t = backend.num_train_timesteps
    # Evenly spread timesteps (midpoints of equal bins) cover the whole noise range.
    ts = [int((k + 0.5) * n_t / timesteps_per_image) for k in range(timesteps_per_image)]
    total, count = 0.0, 0
    for i in range(len(data)):
        latent = data.latents[i][False].mean.unsqueeze(0).to(backend.device)
        text = prompts.render(data.captions[i], random.Random(derive_seed(seed, i)))
        cond = backend.encode_text([text] * len(ts), name, vectors)
        gen = torch.Generator().manual_seed(derive_seed(seed, i, 7))
        noise = torch.randn((len(ts), *latent.shape[1:]), generator=gen).to(backend.device)
        t = torch.tensor(ts, device=backend.device)
        loss = backend.training_loss(latent.expand(len(ts), -1, -1, -1), cond, noise, t)
        total += float(loss.sum())
        count += len(ts)
    return total / count
