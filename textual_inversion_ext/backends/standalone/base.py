"""What the standalone backends (SD1/SD2 and SDXL) share: a frozen diffusers UNet + VAE, one or two CLIP text
encoders with vectors spliced into their token tables, the noise schedule, the loss, previews and sessions.

A subclass says how text becomes conditioning (`encode_text`), how the UNet takes it (`_unet_kwargs`) and which
diffusers pipeline draws previews (`_pipeline`, `_prompt_kwargs`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

from ...core.backend import LatentDist, ModelInfo, SampleGeometry, TrainingOptions, frozen, visiting
from ...core.embedding import check_vectors
from ...core.errors import Interrupted, ModelError
from ...core.training.loss import add_noise, per_sample_loss, prediction_target
from . import splice
from .memory import lean_geglu, trim_memory

logger = logging.getLogger(__name__)

# The VAE's weights again, as a state dict (from the checkpoint file, or rebuilt from a config and seed).
VaeSource = Callable[[], dict[str, torch.Tensor]]

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


@dataclass(frozen=True)
class TextEncoder:
    """One CLIP text encoder of the model, its splicing token table and the id its tokenizer pads with."""

    module: torch.nn.Module
    table: splice.SplicingEmbedding
    pad_id: int


class DiffusersBackend:
    """The shared part of `StandaloneBackend` and `StandaloneSDXLBackend` (see the module docstring)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: dict[str, tuple[torch.nn.Module, int]],
        scheduler_config: dict[str, Any],
        info: ModelInfo,
        vae_source: VaeSource | None = None,
    ) -> None:
        """`text_encoders`: encoder key (as in `info.encoders`) -> (transformers text model, pad id).
        `vae_source` gives the VAE's weights again: with it, a training session on the CPU frees them while the
        cached latents make the VAE idle and loads them back for previews and afterwards (`_release_vae`)."""
        self.unet = unet
        self.vae = vae
        # This backend owns its model and never trains a weight of it (only the vectors passed in
        # do): freeze once, as the diffusers example does, so no caller can leave gradients on it.
        for module in (unet, vae, *(m for m, _ in text_encoders.values())):
            module.requires_grad_(False)
        self.info = info
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.weight_dtype = self.dtype  # the Backend contract's name (the UNet's dtype)
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if self.noise_scheduler.config.prediction_type != info.prediction:
            raise ModelError(
                f"scheduler prediction_type {self.noise_scheduler.config.prediction_type!r} "
                f"does not match the model's {info.prediction!r}"
            )
        # The schedule's ᾱ table where the loss needs it, once (not a host-to-device copy at every step).
        self._alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.encoders = {key: TextEncoder(module, splice.install(module), pad)
                         for key, (module, pad) in text_encoders.items()}
        self._vae_home: torch.device | None = None  # set while the VAE is offloaded
        self._vae_source = vae_source
        self._vae_released: dict[str, tuple[torch.Size, torch.dtype]] | None = None  # while its weights are freed
        self._vae_idle = False  # in a training session that freed the VAE: free it again after a preview

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.unet, self.vae, *(e.module for e in self.encoders.values()))

    # ----------------------------------------------------------------- text

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def token_rows(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows of each encoder's token-embedding table, as detached float32 copies on `self.device`."""
        rows = {}
        for key, enc in self.encoders.items():
            index = torch.tensor(list(token_ids), dtype=torch.long, device=enc.table.weight.device)
            # Indexing copies already: no clone (a whole-vocabulary read would hold a third copy).
            rows[key] = enc.table.weight.detach()[index].to(self.device, torch.float32)
        return rows

    def _checked(self, vectors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The vectors, checked against every encoder's width; {} for none."""
        if not vectors:
            return {}
        return check_vectors(vectors, {key: int(e.table.embedding_dim) for key, e in self.encoders.items()})

    def _encode(self, key: str, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
                pick: Callable[[Any], Any], **kwargs: Any) -> Any:
        """Encoder `key` over `prompts` in 75-token chunks, `trigger` replaced by `vectors[key]` (differentiably);
        `pick` takes what is wanted from the encoder's output (see `splice.encode_prompts`)."""
        enc = self.encoders[key]
        return splice.encode_prompts(enc.module, enc.table, enc.pad_id, prompts, trigger, vectors.get(key), pick,
                                     **kwargs)

    def encode_text(self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
                    geometry: Sequence[SampleGeometry] | None = None) -> Any:
        raise NotImplementedError

    # --------------------------------------------------------------- images

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        self._reload_vae()
        vae_device = next(self.vae.parameters()).device
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(vae_device, self.vae.dtype)).latent_dist
        scale = float(self.vae.config.scaling_factor)
        return LatentDist(
            mean=(dist.mean.float() * scale).to(self.device),
            std=(dist.std.float() * scale).to(self.device),
        )

    def _unet_kwargs(self, cond: Any) -> dict[str, Any]:
        """The UNet's conditioning arguments from `encode_text`'s result, in the model dtype."""
        raise NotImplementedError

    def training_loss(
        self, latents: torch.Tensor, cond: Any, noise: torch.Tensor, timesteps: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The schedule runs in float32 (core's loss); only the UNet casts to the model dtype.
        latents = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        timesteps = timesteps.to(self.device).long()
        abar = self._alphas_cumprod
        noisy = add_noise(latents, noise, timesteps, abar)
        pred = self.unet(noisy.to(self.dtype), timesteps, **self._unet_kwargs(cond)).sample
        target = prediction_target(latents, noise, timesteps, self.info.prediction, abar)
        return per_sample_loss(pred, target, weight)

    # -------------------------------------------------------------- preview

    def _pipeline(self, scheduler: Any) -> DiffusionPipeline:
        """A diffusers pipeline on the loaded modules, without tokenizers (prompts arrive as embeddings)."""
        raise NotImplementedError

    def _prompt_kwargs(self, cond: Any, neg: Any) -> dict[str, Any]:
        """The pipeline's embedding arguments for `encode_text` results of the prompt and the negative prompt."""
        raise NotImplementedError

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
        whole = [SampleGeometry.uncropped(height, width)]  # a generated image: nothing cut off
        with torch.no_grad(), torch.random.fork_rng(devices=forked), self._vae_visit(), \
                visiting(self.vae, self._vae_home):
            cond = self.encode_text([prompt], trigger, vectors, whole)
            neg = self.encode_text([negative_prompt], trigger, vectors, whole)
            # A fresh sampler each time: set_timesteps() mutates it.
            pipe = self._pipeline(scheduler_cls.from_config(self.scheduler_config, **extra))
            pipe.set_progress_bar_config(disable=True)
            latents = pipe(
                **self._prompt_kwargs(cond, neg),
                num_inference_steps=steps,
                guidance_scale=cfg_scale,
                width=width,
                height=height,
                # A CPU generator gives the same preview on every device for a seed.
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="latent",
                callback_on_step_end=_stop_check(should_stop, steps) if should_stop else None,
            ).images
            # Decoded here, in the VAE's own dtype (SDXL's stays float32 under fp16 weights).
            vae_dtype = next(self.vae.parameters()).dtype
            pixels = self.vae.decode(latents.to(vae_dtype) / float(self.vae.config.scaling_factor)).sample
            return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]

    def samplers(self) -> list[str]:
        return list(SAMPLERS)

    # ------------------------------------------------------------ VAE memory

    def _release_vae(self) -> bool:
        """Free the VAE's weights (the module and its Parameter objects stay, emptied) when it sits in RAM and
        `vae_source` can give them back: training reads cached latents, so in RAM the VAE is dead weight
        (SDXL's float32 VAE: 319 MiB). On a GPU `offload_vae` moves it to RAM instead. True if released."""
        if self._vae_released is not None:
            return True
        if self._vae_source is None or self._vae_home is not None or self.device.type != "cpu":
            return False
        params = dict(self.vae.named_parameters())
        if any(p.device.type != "cpu" for p in params.values()):
            return False
        self._vae_released = {name: (p.shape, p.dtype) for name, p in params.items()}
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype)
        trim_memory()
        logger.debug("VAE weights freed for the session (cached latents)")
        return True

    def _reload_vae(self) -> None:
        """Put the released VAE's weights back from `vae_source` (as they were: same shapes and dtypes)."""
        if self._vae_released is None:
            return
        assert self._vae_source is not None
        state = self._vae_source()
        for name, p in self.vae.named_parameters():
            shape, dtype = self._vae_released[name]
            value = state.get(name)
            if value is None or value.shape != shape:
                raise ModelError(f"The VAE's weights could not be loaded again: {name} is "
                                 f"{'missing' if value is None else tuple(value.shape)}, expected {tuple(shape)}.")
            p.data = value.to("cpu", dtype)
        del state
        self._vae_released = None

    @contextlib.contextmanager
    def _vae_visit(self) -> Iterator[None]:
        """The VAE's weights for the block (a preview during a session), freed again afterwards."""
        self._reload_vae()
        try:
            yield
        finally:
            if self._vae_idle:
                self._release_vae()

    # -------------------------------------------------------------- session

    @contextlib.contextmanager
    def training_session(self, options: TrainingOptions) -> Iterator[None]:
        unet_ckpt = bool(self.unet.is_gradient_checkpointing)
        saved_procs = [(m, m.attn_processors) for m in (self.unet, self.vae)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(*self.modules))

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
                self._vae_idle = False
                trim_memory()  # the steps' freed activations first, so the VAE reuses that memory
                try:
                    self._reload_vae()
                except (ModelError, OSError) as exc:  # the file changed or went: it stays freed until needed
                    logger.warning("The VAE stays unloaded after training (%s); it is loaded again when needed.", exc)

            stack.callback(restore)
            processor = AttnProcessor2_0() if options.attention_optimizations else AttnProcessor()
            for module, _ in saved_procs:
                module.set_attn_processor(processor)
            if options.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
            else:
                self.unet.disable_gradient_checkpointing()
            self._vae_idle = self._release_vae()
            if not self._vae_idle and options.offload_vae:  # latents are cached by now
                self._vae_home = next(self.vae.parameters()).device
                self.vae.to("cpu")
            # The UNet's feed-forward without a kept copy of gelu(gate): the same gradients, less memory.
            stack.enter_context(lean_geglu(self.unet))
            yield


def _stop_check(should_stop: Callable[[], bool], steps: int) -> Callable[..., dict]:
    """A diffusers step-end callback that ends sampling when `should_stop()` says so (no decode of a half
    denoised image: the caller wants none)."""

    def check(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        if should_stop():
            raise Interrupted(f"Sampling interrupted after step {i + 1} of {steps}.")
        return kwargs

    return check
