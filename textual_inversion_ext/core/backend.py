"""The contract between the core trainer and a Stable Diffusion model.

Vectors are always passed as `{encoder_key: (n, dim) tensor}` (see `core.embedding`): one key for
SD1/SD2, `clip_l` + `clip_g` for SDXL, so SDXL fits without changing the trainer. Conditioning is
opaque to the core: whatever `encode_text` returns, `training_loss` and `preview` accept (SDXL will
put its pooled output and size vector in there). `SampleGeometry` tells a backend how each training image was
cut (SDXL's size conditioning); backends that do not use it ignore it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1" | "sd2" | "sdxl"
    encoders: dict[str, int]  # encoder key -> token-embedding width, e.g. {"default": 768}
    resolution: int  # native training size in pixels (512 SD1, 768 SD2-v, 1024 SDXL)
    name: str  # shown to the user and stored as sd_checkpoint_name
    short_hash: str | None  # stored as sd_checkpoint (A1111: first 10 hex chars of the sha256)
    prediction: str = "epsilon"  # "epsilon" | "v_prediction"
    latent_channels: int = 4
    vae_scale: int = 8  # pixels per latent cell

    @property
    def embedding_suffix(self) -> str:
        """The file type new embeddings get: with two encoders (SDXL) `.safetensors` holding clip_l + clip_g,
        which A1111, Forge, ComfyUI and kohya all load; with one, A1111's `.pt`."""
        return ".safetensors" if len(self.encoders) > 1 else ".pt"


@dataclass(frozen=True)
class SampleGeometry:
    """How one training image was made, in pixels, as SDXL's micro-conditioning (and kohya) records it.

    `original`: the source image's (h, w); `crop`: top-left (y, x) of the kept box in the source scaled to
    cover the target; `target`: the (h, w) trained at (its bucket). A mirrored copy keeps the same values."""

    original: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]

    @classmethod
    def uncropped(cls, height: int, width: int) -> SampleGeometry:
        """A whole image generated (or trained) at (height, width): previews use this."""
        return cls((height, width), (0, 0), (height, width))

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's `add_time_ids` order: original h, w, crop y, x, target h, w."""
        return (*self.original, *self.crop, *self.target)


@dataclass
class LatentDist:
    """Scaled latent mean and std of a batch of images (std 0 = deterministic encoder)."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass(frozen=True)
class TrainingOptions:
    """How the backend should hold the model while the embedding trains."""

    gradient_checkpointing: bool = False
    attention_optimizations: bool = True
    offload_vae: bool = False  # move the VAE to RAM once latents are cached


@runtime_checkable
class Backend(Protocol):
    info: ModelInfo
    device: torch.device
    # The dtype the frozen UNet and text encoder are loaded in (fp16/bf16 on GPU, fp32 on CPU as a rule); the
    # run's autocast follows it (`core.training.precision`). The trainable vectors are always fp32.
    weight_dtype: torch.dtype

    @property
    def num_train_timesteps(self) -> int: ...

    def token_rows(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows of each encoder's token-embedding table for BPE ids (no BOS/EOS): `(len, dim)`."""

    def encode_text(self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
                    geometry: Sequence[SampleGeometry] | None = None) -> Any:
        """Conditioning for `prompts`, with every occurrence of `trigger` replaced by `vectors`.

        Must be differentiable with respect to `vectors`. `geometry`: one per prompt, how its image was cut
        (None: unknown; a backend that conditions on size then assumes whole images at its resolution)."""

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        """Latent distribution of `pixels` (B, 3, H, W) in [-1, 1], already scaled for the UNet."""

    def training_loss(
        self, latents: torch.Tensor, cond: Any, noise: torch.Tensor, timesteps: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample denoising loss `(B,)` for `latents` noised with `noise` at `timesteps`; `weight`
        `(B, 1, h, w)` (e.g. from the images' alpha) makes it a weighted mean (see `training.loss`)."""

    def preview(
        self,
        prompt: str,
        trigger: str,
        vectors: dict[str, torch.Tensor],
        *,
        seed: int,
        steps: int,
        width: int,
        height: int,
        cfg_scale: float,
        negative_prompt: str = "",
        sampler: str = "",
        should_stop: Callable[[], bool] | None = None,
    ) -> Image.Image:
        """Generate one image with the given vectors (never cached conditioning); `sampler` is one of
        `samplers()`, empty = the model's default. `should_stop` is checked between sampling steps: when it
        returns True, sampling ends and `core.errors.Interrupted` is raised."""

    def samplers(self) -> list[str]:
        """Sampler names `preview` accepts (as the host's txt2img names them)."""

    def training_session(self, options: TrainingOptions) -> contextlib.AbstractContextManager[None]:
        """Freeze every model weight, apply `options`; restore everything on exit (also on error)."""


@contextlib.contextmanager
def visiting(module: torch.nn.Module, home: torch.device | None) -> Iterator[None]:
    """Bring an offloaded `module` back to `home` for the block, then to the CPU again; `home` None (not
    offloaded): leave it where it is."""
    if home is None:
        yield
        return
    module.to(home)
    try:
        yield
    finally:
        module.to("cpu")


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Set requires_grad False on every parameter of `modules`; restore each flag afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
