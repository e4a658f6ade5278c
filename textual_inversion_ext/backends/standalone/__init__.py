"""The standalone backend: Stable Diffusion 1.x/2.x on diffusers + transformers, without a host.

`embedded_default()` builds a tiny model from bundled configs (no download), `random_model()` a
full-size one with random weights, `load_checkpoint()` a user's single-file `.safetensors`/`.ckpt`.
"""

from __future__ import annotations

from .backend import StandaloneBackend
from .embedded import embedded_default, random_model
from .loading import load_checkpoint
from .sdxl import StandaloneSDXLBackend

__all__ = ["StandaloneBackend", "StandaloneSDXLBackend", "embedded_default", "load_checkpoint", "random_model"]
