"""`Backend` on diffusers' UNet/VAE/noise schedule and transformers' CLIP text encoder, no host."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image
from transformers import CLIPTextModel

from ...core.backend import LatentDist, ModelInfo, TrainingOptions, frozen, visiting
from ...core.embedding import SINGLE, check_vectors
from ...core.errors import Interrupted, ModelError
from ...core.training.loss import add_noise, per_sample_loss, prediction_target
from . import splice

logger = logging.getLogger(__name__)

# Preview samplers under the names A1111's txt2img uses; the first is the default.
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "DDIM": (DDIMScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
}


class StandaloneBackend:
    """One SD1.x/SD2.x model held in memory: UNet, VAE, CLIP text encoder and a noise schedule.

    Conditioning (`encode_text`'s result) is the text encoder's last hidden state `(B, 77, dim)` in
    the model dtype; SD2's diffusers text encoder already ends at OpenCLIP's penultimate layer."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        scheduler_config: dict[str, Any],
        info: ModelInfo,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        # This backend owns its model and never trains a weight of it (only the vectors passed in
        # do): freeze once, as the diffusers example does, so no caller can leave gradients on it.
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        self.info = info
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.weight_dtype = self.dtype  # the Backend contract's name (the UNet's dtype; loading casts all three)
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if self.noise_scheduler.config.prediction_type != info.prediction:
            raise ModelError(
                f"scheduler prediction_type {self.noise_scheduler.config.prediction_type!r} "
                f"does not match the model's {info.prediction!r}"
            )
        # OpenCLIP (SD2) pads with id 0; SD1's CLIP tokenizer (and A1111) pads with EOS.
        self.pad_id = 0 if info.family == "sd2" else splice.EOS
        self._embedding = splice.install(text_encoder)
        self._vae_home: torch.device | None = None  # set while the VAE is offloaded
        self._warned_truncation = False

    # ----------------------------------------------------------------- text

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def embedding_dim(self) -> int:
        return int(self._embedding.embedding_dim)

    def token_rows(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows of the token-embedding table, as a detached float32 copy on `self.device`."""
        index = torch.tensor(list(token_ids), dtype=torch.long, device=self._embedding.weight.device)
        rows = self._embedding.weight.detach()[index].to(self.device, torch.float32).clone()
        return {SINGLE: rows}

    def _vectors(self, vectors: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        if not vectors:
            return None
        return check_vectors(vectors, {SINGLE: self.embedding_dim})[SINGLE]

    def encode_text(
        self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        vec = self._vectors(vectors)
        n = 0 if vec is None else int(vec.shape[0])
        ids, slots, truncated = splice.batch_ids(list(prompts), trigger, n, self.pad_id, self.device)
        if any(truncated) and not self._warned_truncation:
            self._warned_truncation = True  # once per model: prompts repeat every step
            logger.warning(
                "A prompt is longer than %d tokens (after expanding %r to %d vectors); the rest is "
                "ignored: %r",
                splice.CONTENT, trigger, n, next(p for p, t in zip(prompts, truncated) if t),
            )
        if vec is None or not bool((slots >= 0).any()):
            return self.text_encoder(ids).last_hidden_state
        with self._embedding.splicing(slots, vec):
            return self.text_encoder(ids).last_hidden_state

    # --------------------------------------------------------------- images

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        vae_device = next(self.vae.parameters()).device
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(vae_device, self.vae.dtype)).latent_dist
        scale = float(self.vae.config.scaling_factor)
        return LatentDist(
            mean=(dist.mean.float() * scale).to(self.device),
            std=(dist.std.float() * scale).to(self.device),
        )

    def training_loss(
        self, latents: torch.Tensor, cond: Any, noise: torch.Tensor, timesteps: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The schedule runs in float32 (core's loss); only the UNet casts to the model dtype.
        latents = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        timesteps = timesteps.to(self.device).long()
        abar = self.noise_scheduler.alphas_cumprod
        noisy = add_noise(latents, noise, timesteps, abar)
        pred = self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=cond.to(self.dtype)).sample
        target = prediction_target(latents, noise, timesteps, self.info.prediction, abar)
        return per_sample_loss(pred, target, weight)

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
        if sampler and sampler not in SAMPLERS:
            raise ModelError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        scheduler_cls, extra = SAMPLERS[sampler or next(iter(SAMPLERS))]
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if width % scale or height % scale or width <= 0 or height <= 0:
            raise ValueError(f"preview size {width}x{height} must be positive multiples of {scale}")
        forked = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=forked), visiting(self.vae, self._vae_home):
            cond = self.encode_text([prompt], trigger, vectors)
            neg = self.encode_text([negative_prompt], trigger, vectors)
            # A fresh sampler each time: set_timesteps() mutates it. No tokenizer: we pass embeddings.
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=None,
                unet=self.unet,
                scheduler=scheduler_cls.from_config(self.scheduler_config, **extra),
                safety_checker=None,
                feature_extractor=None,
                image_encoder=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            result = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=neg,
                num_inference_steps=steps,
                guidance_scale=cfg_scale,
                width=width,
                height=height,
                # A CPU generator gives the same preview on every device for a seed.
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="pil",
                callback_on_step_end=_stop_check(should_stop, steps) if should_stop else None,
            )
        return result.images[0]

    def samplers(self) -> list[str]:
        return list(SAMPLERS)

    # -------------------------------------------------------------- session

    @contextlib.contextmanager
    def training_session(self, options: TrainingOptions) -> Iterator[None]:
        unet_ckpt = bool(self.unet.is_gradient_checkpointing)
        saved_procs = [(m, m.attn_processors) for m in (self.unet, self.vae)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(self.unet, self.vae, self.text_encoder))

            def restore() -> None:
                for module, procs in saved_procs:
                    module.set_attn_processor(procs)
                if unet_ckpt:
                    self.unet.enable_gradient_checkpointing()
                else:
                    self.unet.disable_gradient_checkpointing()
                if self._vae_home is not None:
                    self.vae.to(self._vae_home)
                    self._vae_home = None

            stack.callback(restore)
            processor = AttnProcessor2_0() if options.attention_optimizations else AttnProcessor()
            for module, _ in saved_procs:
                module.set_attn_processor(processor)
            if options.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
            else:
                self.unet.disable_gradient_checkpointing()
            if options.offload_vae:  # latents are cached by now; a CPU model just stays put
                self._vae_home = next(self.vae.parameters()).device
                self.vae.to("cpu")
            yield


def _stop_check(should_stop: Callable[[], bool], steps: int) -> Callable[..., dict]:
    """A diffusers step-end callback that ends sampling when `should_stop()` says so (no decode of a half
    denoised image: the caller wants none)."""

    def check(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        if should_stop():
            raise Interrupted(f"Sampling interrupted after step {i + 1} of {steps}.")
        return kwargs

    return check
