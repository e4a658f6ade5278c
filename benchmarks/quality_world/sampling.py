"""Batched DDIM sampling with classifier-free guidance: `backend.preview` makes one image per call,
far too slow for scoring hundreds. Same scheduler config and conditioning path as the preview."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from textual_inversion_ext.backends.standalone import StandaloneBackend


@torch.no_grad()
def generate(backend: StandaloneBackend, prompts: list[str], *, trigger: str = "",
             vectors: dict[str, torch.Tensor] | None = None, seed: int = 0, steps: int = 20,
             cfg_scale: float = 3.0, batch: int = 64) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1]. Image i's starting noise depends on (seed, i) only, so the
    same prompt list and seed give the same images for any embedding: snapshots differ only by it."""
    vectors = vectors or {}
    size = backend.info.resolution // backend.info.vae_scale
    shape = (len(prompts), backend.info.latent_channels, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        cond = backend.encode_text(chunk, trigger, vectors)
        uncond = backend.encode_text([""] * len(chunk), trigger, vectors)
        scheduler = DDIMScheduler.from_config(backend.scheduler_config)
        scheduler.set_timesteps(steps)
        latents = noise[i : i + batch].to(backend.device) * scheduler.init_noise_sigma
        both = torch.cat([uncond, cond])
        for t in scheduler.timesteps:
            eps = backend.unet(torch.cat([latents, latents]), t, encoder_hidden_states=both).sample
            eps_u, eps_c = eps.chunk(2)
            latents = scheduler.step(eps_u + cfg_scale * (eps_c - eps_u), t, latents).prev_sample
        images = backend.vae.decode(latents / backend.vae.config.scaling_factor).sample
        out.append(images.clamp(-1, 1).cpu())
    return torch.cat(out)
