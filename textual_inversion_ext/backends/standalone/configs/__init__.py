"""Bundled diffusers/transformers configs (JSON), so no model repository is ever downloaded.

A package on purpose: setuptools' `"*.json"` package data then ships these files in a wheel.

`sdxl.json` (SDXL base 1.0): `unet`/`vae` are what diffusers' own single-file code infers from
Stability's `sd_xl_base.yaml` (`create_unet_diffusers_config_from_ldm`,
`create_vae_diffusers_config_from_ldm`; scale_factor 0.13025, plus AutoencoderKL's `force_upcast`);
`text_encoder` is CLIP ViT-L/14's text model as in `sd1.json`, `text_encoder_2` OpenCLIP ViT-bigG-14's
text tower (open_clip's `ViT-bigG-14.json`: width 1280, 32 layers, 20 heads, mlp 4x, gelu, projection
1280); `scheduler` is SDXL's EulerDiscrete training schedule written as a DDPM config. Built, they
have 2.567 B (UNet), 123 M (clip_l) and 695 M (clip_g) parameters (tests/test_sdxl_loading.py).
"""

from __future__ import annotations
