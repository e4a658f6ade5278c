"""`Backend` on `shared.sd_model` as the A1111 host loaded it (SD1/SD2/SDXL; no second copy).

Text goes through the host's own hijacked text encoder(s) (`text.py`): the trainable vectors are
registered as a host `Embedding` whose `.vec` (SDXL: a dict with clip_l and clip_g, as a loaded SDXL
embedding) the hijack splices in with `torch.cat`, so prompt parsing, emphasis, clip-skip and padding are
exactly what inference uses, and gradients reach the vectors. The UNet is the model's own `apply_model`;
noising, the eps/v target and the loss are core's (`core.training.loss`), from the model's float32 ᾱ
table, as for the standalone backend.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from ...core.backend import LatentDist, ModelInfo, SampleGeometry, TrainingOptions, frozen, visiting
from ...core.embedding import check_vectors
from ...core.errors import Interrupted, ModelError
from ...core.training.loss import add_noise, per_sample_loss, prediction_target
from ..checkpointing import block_checkpointing
from .text import SDXLText, SingleEncoderText

logger = logging.getLogger(__name__)


def check_supported(sd_model: Any, cmd_opts: Any) -> str:
    """The model family ("sd1" | "sd2" | "sdxl"), or a ModelError saying why this model/launch cannot train
    (an SDXL refiner is refused when its text encoders are looked up: `text.SDXLText`)."""
    if getattr(cmd_opts, "lowvram", False):
        raise ModelError("Training is not possible with --lowvram (the host refuses it too: the UNet is "
                         "streamed block by block, which backpropagation cannot follow). Restart without "
                         "--lowvram; --medvram works.")
    if sd_model is None:
        raise ModelError("No Stable Diffusion model is loaded; choose a checkpoint first.")
    if hasattr(sd_model, "forge_objects"):
        raise ModelError("This is a Forge model; the A1111 backend cannot train on it.")
    if getattr(sd_model, "is_sdxl", False):
        unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        if getattr(unet, "in_channels", 4) != 4:  # the host sets conditioning_key "crossattn" on every SDXL
            raise ModelError("SDXL inpainting models are not supported for training; load an SDXL base-family "
                             "checkpoint (the embedding works with the inpainting model afterwards).")
        return "sdxl"
    key = getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn")
    if key in ("hybrid", "concat"):
        raise ModelError("Inpainting and instruct-pix2pix models are not supported for training; load the "
                         "base SD1.x/SD2.x checkpoint.")
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    raise ModelError(f"Unsupported model type {type(sd_model).__name__}: only SD1.x, SD2.x and SDXL can be "
                     "trained.")


def latent_distribution(model: Any, pixels: torch.Tensor, device: torch.device) -> Any:
    """The VAE's posterior (`.mean`, `.std`, unscaled) of `pixels`. ldm's `encode_first_stage` returns it (with
    --medvram the host's hook on the VAE's `encode` brings the VAE over); sgm's (SDXL) samples and scales it,
    so the posterior comes from sgm's `AutoencoderKL.encode`, the method its inference wrapper samples."""
    if not getattr(model, "is_sdxl", False):
        return model.encode_first_stage(pixels)
    from sgm.models.autoencoder import AutoencoderKL

    vae = model.first_stage_model
    if not isinstance(vae, AutoencoderKL):
        raise ModelError(f"Unexpected SDXL VAE type {type(vae).__name__}: cannot encode the training images.")
    home = next(vae.parameters()).device
    with visiting(vae, device if home != device else None):  # --medvram-sdxl keeps it in RAM between uses
        return AutoencoderKL.encode(vae, pixels)


SGM_BLOCK_MODULES = ("sgm.modules.attention", "sgm.modules.diffusionmodules.openaimodel")


class A1111Backend:
    """The host's loaded model. Build it under the host's model (its checks run in __init__)."""

    def __init__(self, sd_model: Any | None = None) -> None:
        from modules import devices, shared  # host import: only in this package

        model = shared.sd_model if sd_model is None else sd_model
        family = check_supported(model, shared.cmd_opts)
        self.model = model
        self.device = torch.device(devices.device)
        prediction = {"eps": "epsilon", "v": "v_prediction"}.get(getattr(model, "parameterization", "eps"))
        if prediction is None:
            raise ModelError(f"Unsupported parameterization {model.parameterization!r} (eps or v only).")
        resolution = {"sdxl": 1024, "sd2": 768 if prediction == "v_prediction" else 512}.get(family, 512)
        self.text = SDXLText(model, resolution) if family == "sdxl" else SingleEncoderText(model)
        # What the host really loaded (fp16 unless --no-half; it halves the UNet and text encoder together).
        # A token table, not the UNet: with the host's fp8 option the UNet's layers are stored in fp8 while
        # computing in fp16; the table is never fp8.
        self.weight_dtype = next(iter(self.text.tables().values())).weight.dtype
        info = getattr(model, "sd_checkpoint_info", None)
        self.info = ModelInfo(
            family=family,
            encoders=dict(self.text.encoders),
            resolution=resolution,
            name=str(getattr(info, "model_name", None) or "unknown model"),
            short_hash=getattr(info, "shorthash", None),
            prediction=prediction,
        )
        self._host_embedding: Any = None  # our registered host Embedding (kept; .vec updated per call)
        self._replaced: tuple[str, Any] | None = None  # (name, DB entry we displaced) restored after a session
        self._vae_home: torch.device | None = None
        self._in_session = False  # inside training_session: our embedding stays registered until it ends

    # ----------------------------------------------------------------- text

    @property
    def num_train_timesteps(self) -> int:
        # ldm keeps num_timesteps; sgm (SDXL) only the ᾱ table the host attaches (`extend_sdxl`).
        return int(getattr(self.model, "num_timesteps", 0) or len(self.model.alphas_cumprod))

    def token_rows(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = {}
        for key, table in self.text.tables().items():
            index = torch.tensor(list(token_ids), dtype=torch.long, device=table.weight.device)
            rows[key] = table.weight.detach()[index].to(self.device, torch.float32).clone()
        return rows

    def _host_vec(self, vectors: dict[str, torch.Tensor]) -> Any:
        return self.text.host_vec(check_vectors(vectors, self.info.encoders))

    def _register(self, trigger: str, vec: Any) -> None:
        """Make the host's embedding DB splice `vec` for `trigger` (re-registered if a reload replaced it)."""
        from modules import sd_hijack
        from modules.textual_inversion.textual_inversion import Embedding

        db = sd_hijack.model_hijack.embedding_db
        emb = self._host_embedding
        if emb is None or emb.name != trigger:
            if self._replaced is None:
                self._replaced = (trigger, db.word_embeddings.get(trigger))
            emb = self._host_embedding = Embedding(vec, trigger)
        emb.vec = vec
        parts = list(vec.values()) if isinstance(vec, dict) else [vec]
        emb.vectors = int(parts[0].shape[0])  # the hijack reserves this many token slots
        emb.shape = sum(int(p.shape[1]) for p in parts)  # as the host's loader: 2048 for SDXL
        if db.word_embeddings.get(trigger) is not emb:
            db.register_embedding_by_name(emb, self.model, trigger)

    def _unregister(self) -> None:
        """Put back the DB entry our trainable embedding displaced (the file's, or nothing)."""
        if self._replaced is None:
            return
        from modules import sd_hijack

        name, previous = self._replaced
        db = sd_hijack.model_hijack.embedding_db
        if db.word_embeddings.get(name) is self._host_embedding:
            db.register_embedding_by_name(previous, self.model, name)
        self._replaced = None
        self._host_embedding = None

    def encode_text(self, prompts: Sequence[str], trigger: str, vectors: dict[str, torch.Tensor],
                    geometry: Sequence[SampleGeometry] | None = None) -> Any:
        if vectors:
            self._register(trigger, self._host_vec(vectors))
        return self.text.encode(prompts, geometry)

    # --------------------------------------------------------------- images

    def encode_images(self, pixels: torch.Tensor) -> LatentDist:
        vae = self.model.first_stage_model
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            dist = latent_distribution(self.model, pixels.to(self.device, dtype), self.device)
            if dtype == torch.float16 and not bool(torch.isfinite(dist.mean).all()):
                # SDXL's VAE overflows in fp16 (the host's "revert VAE to 32-bit" does the same for images).
                logger.warning("The VAE gave NaN/inf latents in fp16: encoding these images in fp32.")
                vae.to(torch.float32)
                try:
                    dist = latent_distribution(self.model, pixels.to(self.device, torch.float32), self.device)
                finally:
                    vae.to(dtype)
        scale = float(self.model.scale_factor)
        return LatentDist(mean=(dist.mean.float() * scale).to(self.device),
                          std=(dist.std.float() * scale).to(self.device))

    def training_loss(self, latents: torch.Tensor, cond: Any, noise: torch.Tensor,
                      timesteps: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        latents = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        t = timesteps.to(self.device).long()
        # Per sample, unlike ldm's p_losses (which averages the batch): the trainer weights/masks samples.
        # ᾱ as loaded: `alphas_cumprod` itself may be downcast or rescaled by the last txt2img (a preview).
        abar = getattr(m, "alphas_cumprod_original", None)
        abar = m.alphas_cumprod if abar is None else abar
        noisy = add_noise(latents, noise, t, abar)
        pred = m.apply_model(noisy, t, cond)
        return per_sample_loss(pred, prediction_target(latents, noise, t, self.info.prediction, abar), weight)

    def preview(self, prompt: str, trigger: str, vectors: dict[str, torch.Tensor], *, seed: int, steps: int,
                width: int, height: int, cfg_scale: float, negative_prompt: str = "",
                sampler: str = "", should_stop: Callable[[], bool] | None = None) -> Image.Image:
        from modules import processing

        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.model, prompt=prompt, negative_prompt=negative_prompt, seed=int(seed),
            steps=int(steps), width=int(width), height=int(height), cfg_scale=float(cfg_scale),
            do_not_save_samples=True, do_not_save_grid=True, do_not_reload_embeddings=True,
            **({"sampler_name": sampler} if sampler else {}),
        )
        # The host caches conds by prompt text, not by vectors: fresh caches so a preview never reuses one.
        p.cached_c = [None, None]
        p.cached_uc = [None, None]
        try:
            if vectors:
                self._register(trigger, self._host_vec(vectors))
            return host_txt2img(p, should_stop, visiting(self.model.first_stage_model, self._vae_home))
        finally:
            if not self._in_session:  # e.g. the comparison grid after training: leave the host's DB as it was
                self._unregister()

    def samplers(self) -> list[str]:
        """The host's txt2img samplers (hidden ones excluded, as in its dropdown)."""
        from modules import sd_samplers

        return list(sd_samplers.visible_sampler_names())

    # -------------------------------------------------------------- session

    @contextlib.contextmanager
    def training_session(self, options: TrainingOptions) -> Iterator[None]:
        from modules import sd_hijack, sd_hijack_checkpoint, shared

        m = self.model
        with contextlib.ExitStack() as stack:
            stack.callback(self._unregister)
            self._in_session = True
            stack.callback(setattr, self, "_in_session", False)
            stack.enter_context(frozen(m.model, m.cond_stage_model, m.first_stage_model))
            # ldm's configs ask for its CheckpointFunction, which fails once the weights are frozen: off; for
            # ldm, checkpointing comes from the host's `sd_hijack_checkpoint` (torch's), for sgm (SDXL) from ours.
            sdxl_checkpointing = options.gradient_checkpointing and self.info.family == "sdxl"
            stack.enter_context(block_checkpointing(m.model, SGM_BLOCK_MODULES, on=sdxl_checkpointing))
            if options.gradient_checkpointing and not sdxl_checkpointing and not sd_hijack_checkpoint.stored:
                sd_hijack_checkpoint.add()
                stack.callback(sd_hijack_checkpoint.remove)
            if not options.attention_optimizations:
                # The host's plain attention; its configured optimization comes back afterwards.
                sd_hijack.undo_optimizations()
                stack.callback(sd_hijack.model_hijack.apply_optimizations)
            if options.offload_vae and self.device.type != "cpu":
                # "Move VAE and CLIP to RAM": latents are cached, so the VAE can go; CLIP cannot, the
                # gradient flows through it every step.
                parallel = shared.parallel_processing_allowed
                shared.parallel_processing_allowed = False  # no live-preview decoding without the VAE
                self._vae_home = next(m.first_stage_model.parameters()).device
                m.first_stage_model.to("cpu")

                def vae_back(home: torch.device = self._vae_home) -> None:
                    m.first_stage_model.to(home)
                    self._vae_home = None
                    shared.parallel_processing_allowed = parallel

                stack.callback(vae_back)
            yield


def host_txt2img(p: Any, should_stop: Callable[[], bool] | None, *contexts: Any) -> Image.Image:
    """The first image of the host's txt2img `p` (A1111's or Forge's `process_images`), run under `contexts`,
    closed afterwards and stopped when `should_stop()` turns True (Interrupted)."""
    from modules import processing

    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        stack.enter_context(contextlib.closing(p))
        stopped = stack.enter_context(_host_interrupt(should_stop))
        processed = processing.process_images(p)
    if stopped.is_set():
        raise Interrupted("Sampling interrupted.")
    if not processed.images:
        raise ModelError("The host returned no preview image (interrupted?).")
    return processed.images[0]


@contextlib.contextmanager
def _host_interrupt(should_stop: Callable[[], bool] | None, poll_s: float = 0.1) -> Iterator[threading.Event]:
    """While sampling: when `should_stop()` turns True, press the host's Interrupt (its samplers check
    `shared.state.interrupted` every step). Yields an event set when that happened."""
    stopped, done = threading.Event(), threading.Event()
    if should_stop is None:
        yield stopped
        return
    from modules import shared

    def watch() -> None:
        while not done.wait(poll_s):
            if should_stop():
                stopped.set()
                shared.state.interrupted = True  # = state.interrupt(); cleared by the next state.begin()
                return

    watcher = threading.Thread(target=watch, name="tiext-preview-stop", daemon=True)
    watcher.start()
    try:
        yield stopped
    finally:
        done.set()
        watcher.join()
