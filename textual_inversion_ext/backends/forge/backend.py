"""`Backend` on `shared.sd_model` as Forge loaded it (SD1/SD2/SDXL; no second copy).

Forge keeps the model in `forge_objects` (UNet/CLIP/VAE patchers moved by its memory manager) and encodes text
with one `ClassicTextProcessingEngine` per encoder; each engine's embedding database splices a registered
embedding's `.vec` (SDXL: a dict indexed by clip_l / clip_g) into the token embeddings with `torch.cat`, so
registering our trainable vectors there gives Forge's own parsing, emphasis and clip-skip with gradients.
Forge's `get_learned_conditioning`/`encode_first_stage` run under `torch.inference_mode()`, so the engines,
the VAE's posterior and the raw UNet are called here directly. Noising, target and loss are core's, from the
ᾱ of the sigmas Forge samples with (`predictor.sigmas`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from ...core.backend import LatentDist, ModelInfo, SampleGeometry, TrainingOptions, frozen
from ...core.embedding import SDXL_KEYS, SINGLE, check_vectors
from ...core.errors import ModelError
from ...core.training.loss import add_noise, per_sample_loss, prediction_target
from ..checkpointing import block_checkpointing

logger = logging.getLogger(__name__)

UNET_BLOCK_MODULES = ("backend.nn.unet",)  # its blocks call this module's `checkpoint`
PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction"}


def check_supported(sd_model: Any) -> str:
    """The family ("sd1" | "sd2" | "sdxl") of Forge's loaded model, or a ModelError saying why it cannot train."""
    if sd_model is None or not hasattr(sd_model, "forge_objects"):  # Forge's FakeInitialModel at start-up
        raise ModelError("Forge has not loaded a checkpoint yet: it loads the selected one at the first generation "
                         "(Train loads it too).")
    unet = sd_model.forge_objects.unet.model.diffusion_model
    inpainting = int(getattr(getattr(unet, "config", None), "in_channels", 4) or 4) != 4
    if getattr(sd_model, "is_sdxl", False):
        if not (hasattr(sd_model, "text_processing_engine_l") and hasattr(sd_model, "text_processing_engine_g")):
            raise ModelError("This SDXL-family model has no clip_l + clip_g text encoders of SDXL base: an SDXL "
                             "refiner? Refiners only refine; load an SDXL base-family checkpoint to train.")
        family = "sdxl"
    elif getattr(sd_model, "is_sd2", False):
        family = "sd2"
    elif getattr(sd_model, "is_sd1", False):
        family = "sd1"
    else:
        raise ModelError(f"{type(sd_model).__name__} models (SD3, Flux, ...) cannot be trained: Textual Inversion "
                         "here supports SD1.x, SD2.x and SDXL-family checkpoints.")
    if inpainting:
        raise ModelError("Inpainting models are not supported for training; load the base checkpoint (the "
                         "embedding works with the inpainting model afterwards).")
    return family


def _same_storage(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on an inference tensor's memory (created outside inference mode, so it is not one)."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def normal_tensors(*modules: torch.nn.Module) -> int:
    """Replace the modules' parameters and buffers that are inference tensors by ordinary tensors on the same
    memory; how many.

    Forge loads (and moves) models under `torch.inference_mode()`, and autograd can neither save an inference
    tensor for the backward nor track its version: a frozen weight used in a differentiable op would fail the
    step. Each replacement views the same storage (no copy: a clone would keep a second model alive wherever
    Forge still holds the loaded tensors) and sits in the same slot, as Forge's own patchers set weights. Not
    undone: an ordinary tensor serves inference just as well."""
    # old tensor's id -> (old, new): a tensor shared by two modules stays shared (the old one is kept referenced
    # until the end so that its id cannot be reused meanwhile)
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in modules:
        for sub in module.modules():
            for slots in (sub._parameters, sub._buffers):
                for name, tensor in list(slots.items()):
                    if tensor is None or not (id(tensor) in replaced or tensor.is_inference()):
                        continue
                    if id(tensor) not in replaced:
                        copy = _same_storage(tensor)
                        is_param = isinstance(tensor, torch.nn.Parameter)
                        new = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad) if is_param else copy
                        replaced[id(tensor)] = (tensor, new)
                    slots[name] = replaced[id(tensor)][1]
    return len(replaced)


@contextlib.contextmanager
def residual_safe_norms(module: torch.nn.Module) -> Iterator[int]:
    """Forge's transformer blocks add to their residual stream in place (`x += n`) right after a LayerNorm has
    saved that same tensor for the backward, which autograd refuses ("modified by an inplace operation"). While
    gradients are recorded, each LayerNorm here normalises a copy of its input instead (a few activations per
    block; a no-op for inference). Yields how many norms are covered."""
    def copy_input(_norm: torch.nn.Module, args: tuple) -> tuple | None:
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            return (args[0].clone(), *args[1:])
        return None

    handles = [m.register_forward_pre_hook(copy_input) for m in module.modules()
               if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def _token_table(engine: Any) -> torch.nn.Embedding:
    slot = engine.text_encoder.transformer.text_model.embeddings.token_embedding
    return getattr(slot, "wrapped", slot)  # under Forge's CLIPEmbeddingForTextualInversion


class ForgeBackend:
    """Forge's loaded model. Build it under Forge's model (its checks run in __init__)."""

    def __init__(self, sd_model: Any | None = None) -> None:
        from backend import memory_management  # Forge's own package: only in this backend
        from modules import shared

        model = shared.sd_model if sd_model is None else sd_model
        family = check_supported(model)
        self.model = model
        self.objects = model.forge_objects
        self.memory = memory_management
        self.device = torch.device(memory_management.get_torch_device())
        if family == "sdxl":
            self.engines = {"clip_l": model.text_processing_engine_l, "clip_g": model.text_processing_engine_g}
        else:
            self.engines = {SINGLE: model.text_processing_engine}
        kmodel = self.objects.unet.model
        self.unet = kmodel.diffusion_model
        self.predictor = kmodel.predictor
        # Forge computes in `computation_dtype` whatever the storage (fp8/NF4 layers are cast per op).
        self.weight_dtype = kmodel.computation_dtype
        prediction = PREDICTIONS.get(getattr(self.predictor, "prediction_type", "epsilon"))
        if prediction is None:
            raise ModelError(f"Unsupported prediction type {self.predictor.prediction_type!r} (eps or v only).")
        resolution = {"sdxl": 1024, "sd2": 768 if prediction == "v_prediction" else 512}.get(family, 512)
        info = getattr(model, "sd_checkpoint_info", None)
        self.info = ModelInfo(
            family=family,
            encoders={key: int(_token_table(engine).weight.shape[1]) for key, engine in self.engines.items()},
            resolution=resolution,
            name=str(getattr(info, "model_name", None) or "unknown model"),
            short_hash=getattr(info, "shorthash", None),
            prediction=prediction,
        )
        self._registered: dict[str, tuple[Any, Any]] = {}  # engine key -> (our Embedding, entry it displaced)
        self._in_session = False

    def _load(self, patcher: Any, module: torch.nn.Module) -> None:
        """Forge's memory manager puts the model where it computes (and applies its patches, e.g. LoRA); what it
        moved under inference mode is made usable by autograd again."""
        self.memory.load_model_gpu(patcher)
        converted = normal_tensors(module)
        if converted:
            logger.debug("%d inference tensors of %s made ordinary", converted, type(module).__name__)

    # ----------------------------------------------------------------- text

    @property
    def num_train_timesteps(self) -> int:
        return len(self.predictor.sigmas)

    def _alphas_cumprod(self) -> torch.Tensor:
        """ᾱ of the sigmas Forge samples with (they may be rescaled to zero terminal SNR by its settings)."""
        sigmas = self.predictor.sigmas.float().to(self.device)
        return 1.0 / (sigmas * sigmas + 1.0)

    def token_rows(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = {}
        for key, engine in self.engines.items():
            table = _token_table(engine)
            index = torch.tensor(list(token_ids), dtype=torch.long, device=table.weight.device)
            rows[key] = table.weight.detach()[index].to(self.device, torch.float32).clone()
        return rows

    def _register(self, trigger: str, vectors: dict[str, torch.Tensor]) -> None:
        """Each engine's database splices our vectors for `trigger` (as it would a loaded file's)."""
        from backend.text_processing.textual_inversion import Embedding

        vectors = check_vectors(vectors, self.info.encoders)
        vec: Any = vectors[SINGLE] if SINGLE in vectors else {key: vectors[key] for key in SDXL_KEYS}
        for key, engine in self.engines.items():
            db = engine.embeddings
            ours, displaced = self._registered.get(key, (None, None))
            if ours is None or ours.name != trigger:
                displaced = db.word_embeddings.get(trigger)
                ours = Embedding(vec, trigger)
                self._registered[key] = (ours, displaced)
            ours.vec = vec
            ours.vectors = int(next(iter(vectors.values())).shape[0])
            ours.shape = sum(int(v.shape[1]) for v in vectors.values())
            if db.word_embeddings.get(trigger) is not ours:  # a reload replaced it
                db.register_embedding_by_name(ours, trigger)

    def _unregister(self) -> None:
        for key, (ours, displaced) in self._registered.items():
            db = self.engines[key].embeddings
            if db.word_embeddings.get(ours.name) is ours:
                db.register_embedding_by_name(displaced, ours.name)
        self._registered.clear()

    def encode_text(self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
                    geometry: Sequence[SampleGeometry] | None = None) -> dict[str, torch.Tensor]:
        if vectors:
            self._register(trigger, vectors)
        self._load(self.objects.clip.patcher, self.objects.clip.cond_stage_model)
        prompts = list(prompts)
        with torch.inference_mode(False), torch.enable_grad():
            if SINGLE in self.engines:
                return {"crossattn": self.engines[SINGLE](prompts)}
            cond_l = self.engines["clip_l"](prompts)
            cond_g, pooled = self.engines["clip_g"](prompts)
            return {"crossattn": torch.cat([cond_l, cond_g], dim=2),
                    "vector": torch.cat([pooled, self._size_embedding(len(prompts), geometry).to(pooled)], dim=1)}

    def _size_embedding(self, count: int, geometry: Sequence[SampleGeometry] | None) -> torch.Tensor:
        """SDXL's size conditioning per sample, with the model's own `embedder` (original h, w, crop top, left,
        target h, w: Forge's order); Forge's txt2img uses one size for the whole batch."""
        if geometry is None:
            geometry = [SampleGeometry.uncropped(self.info.resolution, self.info.resolution)] * count
        if len(geometry) != count:
            raise ValueError(f"{len(geometry)} geometries for {count} prompts")
        rows = [torch.flatten(torch.cat([self.model.embedder(torch.Tensor([v])) for v in g.as_tuple()]))
                for g in geometry]
        return torch.stack(rows)

    # --------------------------------------------------------------- images

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        """Forge's VAE posterior (its `regulation` hook hands it back instead of a sample), scaled and shifted
        by the VAE's own `process_in`."""
        vae = self.objects.vae
        self.memory.load_model_gpu(vae.patcher)
        with torch.no_grad():
            posterior = vae.first_stage_model.encode(pixels.to(vae.device, vae.vae_dtype), lambda p: p)
            mean = vae.first_stage_model.process_in(posterior.mean.float())
            std = vae.first_stage_model.process_in(posterior.mean.float() + posterior.std.float()) - mean
        return LatentDist(mean=mean.to(self.device), std=std.to(self.device))

    def training_loss(self, latents: torch.Tensor, cond: dict[str, torch.Tensor], noise: torch.Tensor,
                      timesteps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        self._load(self.objects.unet, self.unet)
        abar = self._alphas_cumprod()
        latents = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        t = timesteps.to(self.device).long()
        dtype = self.weight_dtype
        noisy = add_noise(latents, noise, t, abar)
        extra = {"y": cond["vector"].to(dtype)} if "vector" in cond else {}
        with torch.inference_mode(False):
            pred = self.unet(noisy.to(dtype), t.float(), context=cond["crossattn"].to(dtype), **extra).float()
        return per_sample_loss(pred, prediction_target(latents, noise, t, self.info.prediction, abar), weight)

    def preview(self, prompt: str, trigger: str, vectors: dict[str, torch.Tensor], *, seed: int, steps: int,
                width: int, height: int, cfg_scale: float, negative_prompt: str = "",
                sampler: str = "", should_stop: Callable[[], bool] | None = None) -> Image.Image:
        from modules import processing

        from ..a1111.backend import host_txt2img  # the same processing and `shared.state` interrupt in both hosts

        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.model, prompt=prompt, negative_prompt=negative_prompt, seed=int(seed),
            steps=int(steps), width=int(width), height=int(height), cfg_scale=float(cfg_scale),
            do_not_save_samples=True, do_not_save_grid=True,
            **({"sampler_name": sampler} if sampler else {}),
        )
        p.cached_c = [None] * len(p.cached_c)  # conds are cached by prompt text, not by vectors
        p.cached_uc = [None] * len(p.cached_uc)
        try:
            if vectors:
                self._register(trigger, {k: v.detach() for k, v in vectors.items()})
            return host_txt2img(p, should_stop)
        finally:
            if not self._in_session:
                self._unregister()

    def samplers(self) -> list[str]:
        from modules import sd_samplers

        return list(sd_samplers.visible_sampler_names())

    # -------------------------------------------------------------- session

    @contextlib.contextmanager
    def training_session(self, options: TrainingOptions) -> Iterator[None]:
        clip_model = self.objects.clip.cond_stage_model
        vae_model = self.objects.vae.first_stage_model
        with contextlib.ExitStack() as stack:
            stack.callback(self._unregister)
            self._in_session = True
            stack.callback(setattr, self, "_in_session", False)
            # ordinary tensors first: `frozen` restores the flags of the Parameter objects it saw
            normal_tensors(self.unet, clip_model, vae_model)
            stack.enter_context(frozen(self.unet, clip_model, vae_model))
            stack.enter_context(residual_safe_norms(self.unet))
            # Forge's blocks raise on checkpointing; ours (torch's) when asked, none otherwise.
            stack.enter_context(block_checkpointing(self.unet, UNET_BLOCK_MODULES, on=options.gradient_checkpointing))
            if not options.attention_optimizations:
                logger.info("Forge chooses its attention itself (--attention-* flags); the setting is not applied.")
            yield
