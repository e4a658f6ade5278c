"""Loss on a dataset with fixed noise, timesteps and prompts: comparable across steps (see `validation`)."""

from __future__ import annotations

import torch

from ..backends.protocol import Backend
from .dataset import TrainingSet
from .validation import ValidationSet


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
    return ValidationSet(backend, data, name, template_lines, timesteps_per_image=timesteps_per_image,
                         seed=seed).loss(vectors)
