"""Loss weights from transparency: A1111's "Use PNG alpha channel as loss weight".

Opaque pixels count fully, transparent ones not at all, so a subject cut out onto a transparent
background teaches the subject and not the white its RGB is composited onto (`images.ALPHA_BACKGROUND`).
The alpha is cropped and resized by the very call that crops the RGB (same box, same filter), then
area-averaged onto the latent grid.

Where the host differs (and why we do): it subtracts the map's minimum before scaling it to mean 1, so a
uniformly half-transparent image weighs like an opaque one and an all-opaque or all-transparent RGBA image
gives 0/0 = NaN; here the weight is alpha / 255 and the loss is the weighted mean (`training.loss`), an
image with nothing visible is skipped with a reason, and palette/colour-key transparency counts too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import images

if TYPE_CHECKING:  # torch only where weights are made, so the dataset check stays light
    import torch

# Mean weight below this (0.1 % of the image effectively visible): nothing to learn from, so the image is
# skipped instead of training on a loss of ~0/~0.
MIN_COVERAGE = 1e-3
TRANSPARENT_REASON = ("(almost) fully transparent: with 'Use PNG alpha channel as loss weight' nothing in it "
                      "would be learned")


def alpha_of(img: Image.Image) -> Image.Image | None:
    """The alpha band (mode "L") of a decoded image; None when no pixel is transparent at all."""
    if images.has_hidden_alpha(img) or img.mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA")  # palette / colour-key transparency becomes a real alpha band
    if "A" not in img.getbands():
        return None
    alpha = img.getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def load_alpha(path: str | os.PathLike[str]) -> Image.Image | None:
    """The upright (EXIF-rotated, like `images.load_rgb`) alpha band of an image file, or None."""
    path = Path(path)
    with Image.open(path) as img:
        img.load()
        return alpha_of(images.exif_transpose(img, path))


def pixel_weight(alpha: Image.Image | None, size: tuple[int, int]) -> torch.Tensor | None:
    """Weight `(1, H, W)` in [0, 1] at the training size `size` (w, h), cropped exactly like the RGB."""
    import torch

    if alpha is None:
        return None
    cropped = images.resize_and_crop(alpha, size)
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).unsqueeze(0)


def latent_weight(pixel: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """A pixel weight averaged over each latent cell: `(1, h, w)` float32."""
    import torch.nn.functional as F

    if pixel is None:
        return None
    return F.adaptive_avg_pool2d(pixel.unsqueeze(0), latent_hw)[0].contiguous()


def coverage(alpha: Image.Image | None) -> float:
    """How much of the image is visible: the mean opacity, 0..1 (1 without transparency)."""
    return 1.0 if alpha is None else float(np.asarray(alpha, dtype=np.float32).mean()) / 255.0


def too_transparent(pixel: torch.Tensor | None) -> bool:
    """True for a weight map with (almost) nothing visible: training skips the image."""
    return pixel is not None and float(pixel.mean()) < MIN_COVERAGE
