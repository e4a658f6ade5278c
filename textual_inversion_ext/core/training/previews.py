"""Preview images: one fixed seed and fixed prompts, rendered with given vectors (never cached
conditioning), during training and for the comparison grid."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from ..backend import Backend
from ..data.templates import PromptBuilder
from ..fileio import atomic_path
from .train_params import TrainParams


@dataclass(frozen=True)
class PreviewSettings:
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    negative_prompt: str = ""
    sampler: str = ""  # empty = the model's default

    @classmethod
    def from_params(cls, params: TrainParams, size: tuple[int, int]) -> PreviewSettings:
        """The run's preview settings; width/height 0 = `size` (the training size)."""
        return cls(params.preview_seed, params.preview_steps, params.preview_cfg,
                   params.preview_width or size[0], params.preview_height or size[1],
                   params.preview_negative, params.preview_sampler)

    def render(self, backend: Backend, prompt: str, trigger: str, vectors: dict[str, torch.Tensor],
               should_stop: Callable[[], bool] | None = None) -> Image.Image:
        """`should_stop`: checked by the backend between sampling steps (it raises `Interrupted`)."""
        stop = {"should_stop": should_stop} if should_stop is not None else {}  # older backends lack it
        with torch.no_grad():
            return backend.preview(prompt, trigger, {k: v.detach().clone() for k, v in vectors.items()},
                                   seed=self.seed, steps=self.steps, width=self.width, height=self.height,
                                   cfg_scale=self.cfg_scale, negative_prompt=self.negative_prompt,
                                   sampler=self.sampler, **stop)


def preview_prompts(params: TrainParams, template_lines: list[str], name: str, caption: str) -> list[str]:
    """One prompt per non-empty line of the preview prompt, else one built from the template and `caption`
    (fixed by the seed; no tag shuffling or dropout, so every preview uses the same text)."""
    lines = [line.strip() for line in params.preview_prompt.splitlines() if line.strip()]
    return lines or [PromptBuilder(template_lines, name).render(caption, random.Random(params.seed))]


def save_png(image: Image.Image, path: Path) -> Path:
    """Write atomically, keeping the generation parameters the host's sampler reported (its infotext)."""
    info = PngImagePlugin.PngInfo()
    if isinstance(image.info.get("parameters"), str):
        info.add_text("parameters", image.info["parameters"])
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
