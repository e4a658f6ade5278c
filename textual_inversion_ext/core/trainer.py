"""The training loop: only the embedding's vectors learn; the model stays frozen.

One readable loop in the spirit of diffusers' example, with the fixes the host lacks: the
template line is drawn every step, flips are real, clipping runs after unscaling, a NaN guard
keeps the last good vectors, and the embedding is saved on every way out (finish, interrupt,
error). Randomness is derived from (seed, step) so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends.protocol import Backend, TrainingOptions
from . import formats
from .dataset import BatchOrder, TrainingSet, derive_seed
from .embedding import Embedding
from .errors import TrainingError
from .fileio import atomic_path
from .metrics import LossCsv, Progress, StepTimer
from .schedule import LRSchedule
from .templates import PromptBuilder
from .train_params import TrainParams

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]
ArtifactCallback = Callable[[str, Path], None]  # ("snapshot" | "preview", path), as soon as it is written


@dataclass
class RunPaths:
    """Where a run writes: the final embedding, and a per-run log folder for everything else."""

    final: Path
    log_dir: Path

    @property
    def snapshots(self) -> Path:
        return self.log_dir / "embeddings"

    @property
    def previews(self) -> Path:
        return self.log_dir / "images"

    @property
    def loss_csv(self) -> Path:
        return self.log_dir / "textual_inversion_loss.csv"


@dataclass
class TrainResult:
    status: str  # "finished" | "interrupted" | "nan" | "error"
    step: int
    final_path: Path
    message: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)


@dataclass
class _State:
    vectors: dict[str, torch.Tensor]
    good: dict[str, torch.Tensor]  # last vectors known to be finite
    good_step: int
    step: int


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. CPU autocast is opt-in: it is rarely faster there."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train(
    backend: Backend,
    embedding: Embedding,
    data: TrainingSet,
    params: TrainParams,
    paths: RunPaths,
    *,
    template_lines: list[str],
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
    optimizer_state: dict | None = None,
    on_artifact: ArtifactCallback | None = None,
) -> TrainResult:
    """Train `embedding` in place (its vectors and step are updated) and save it to `paths.final`."""
    stop = stop or threading.Event()
    device = backend.device
    schedule = LRSchedule(params.learn_rate, params.max_steps, embedding.step)
    clip_schedule = (
        LRSchedule(params.clip_grad_value, params.max_steps, embedding.step)
        if params.clip_grad_mode != "disabled"
        else None
    )
    if embedding.step >= schedule.end_step:
        raise TrainingError(
            f"'{embedding.name}' is already at step {embedding.step}; the schedule ends at step "
            f"{schedule.end_step}. Raise max steps or extend the learning-rate schedule."
        )
    lr_scale = params.batch_size * params.grad_accum if params.scale_lr else 1
    amp_dtype = autocast_dtype(params.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    vectors = {k: v.detach().to(device, torch.float32).clone().requires_grad_(True)
               for k, v in embedding.vectors.items()}
    optimizer = torch.optim.AdamW(list(vectors.values()), lr=schedule.rate_at(embedding.step) * lr_scale,
                                  weight_decay=0.0)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        logger.info("Resuming with the saved optimizer state")
    state = _State(vectors, _copy(vectors), embedding.step, embedding.step)
    prompts = PromptBuilder(template_lines, embedding.name, params.shuffle_tags, params.tag_dropout)
    pinned = params.pin_memory and device.type == "cuda"
    if pinned:
        data.pin()
    batches = _MicroBatches(backend, data, params, prompts, embedding.name, scaler, amp_dtype, pinned)
    steps_per_epoch = max(1, batches.order.batches_per_epoch // params.grad_accum)
    preview_prompt = params.preview_prompt or prompts.render(data.captions[0], random.Random(params.seed))
    result = TrainResult("finished", embedding.step, paths.final, "")
    csv_log = LossCsv(paths.loss_csv) if params.csv_every else None
    timer = StepTimer()
    pending: list[tuple[int, torch.Tensor, float]] = []  # losses not yet read back (avoids a sync per step)
    # Reading losses back syncs the GPU; on CPU it is free, so check every step there.
    check_every = 1 if device.type == "cpu" else 8
    options = TrainingOptions(params.gradient_checkpointing, params.attention_optimizations, params.offload_vae)

    def save(path: Path) -> None:
        embedding.vectors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.good.items()}
        embedding.step = state.good_step
        formats.save_embedding(embedding, path)
        # After a NaN the optimizer's moments are newer than (and maybe poisoned like) the kept vectors.
        if params.save_optimizer_state and state.good_step == state.step:
            formats.save_optimizer_state(embedding, path, optimizer.state_dict())

    try:
        with backend.training_session(options):
            while state.step < schedule.end_step:
                if stop.is_set():
                    result.status, result.message = "interrupted", f"Interrupted at step {state.step}."
                    break
                step = state.step
                lr = schedule.rate_at(step) * lr_scale
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, epoch = batches.accumulate(step, vectors)
                scaler.unscale_(optimizer)  # clip real gradients, not loss-scaled ones (host bug)
                if clip_schedule is not None:
                    clip = clip_schedule.rate_at(step)
                    if params.clip_grad_mode == "value":
                        torch.nn.utils.clip_grad_value_(list(vectors.values()), clip)
                    else:
                        torch.nn.utils.clip_grad_norm_(list(vectors.values()), clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step = step + 1
                pending.append((state.step, loss_sum, lr))
                timer.tick()

                due_csv = csv_log is not None and state.step % params.csv_every == 0
                due_save = params.save_every and state.step % params.save_every == 0
                due_preview = params.preview_every and state.step % params.preview_every == 0
                last = state.step >= schedule.end_step
                if due_csv or due_save or due_preview or last or state.step % check_every == 0:
                    if _drain(pending, result, state, vectors):
                        break
                    if due_csv:
                        csv_log.write(state.step, (state.step - 1) // steps_per_epoch,
                                      (state.step - 1) % steps_per_epoch, result.losses[-1][1], lr)
                    if due_save:
                        snap = paths.snapshots / f"{embedding.name}-{state.step}.pt"
                        save(snap)
                        result.snapshots.append(snap)
                        if on_artifact:
                            on_artifact("snapshot", snap)
                    if due_preview:
                        image = _preview(backend, embedding.name, state, params, preview_prompt, paths, data)
                        result.previews.append(image)
                        if on_artifact:
                            on_artifact("preview", image)
                    if progress and result.losses:
                        progress(Progress(state.step, schedule.end_step, result.losses[-1][1], lr,
                                          timer.s_per_step, timer.eta(schedule.end_step - state.step), epoch))
        _drain(pending, result, state, vectors)  # an interrupt can leave steps not yet read back
    except BaseException as exc:
        try:
            _drain(pending, result, state, vectors)
        except Exception:  # the device may be unusable now; the last good vectors are still saved
            logger.exception("Could not read back the last losses")
        result.status = "error"
        result.message = f"{type(exc).__name__}: {exc}"
        save(paths.final)
        logger.error("Training stopped by an error at step %d; embedding saved to %s", state.good_step,
                     paths.final)
        if isinstance(exc, Exception):
            raise TrainingError(f"Training stopped at step {state.good_step} by {result.message}. "
                                f"The embedding was saved to {paths.final}.") from exc
        raise
    finally:
        if csv_log:
            csv_log.close()
    save(paths.final)
    result.step = state.good_step
    if result.status == "finished":
        result.message = f"Finished at step {state.good_step}."
    result.message += f" Embedding saved to {paths.final}."
    return result


class _MicroBatches:
    """Draws the micro-batches of one optimizer step and accumulates their gradients.

    Everything random comes from generators seeded by (seed, step), so a step can be replayed."""

    def __init__(self, backend: Backend, data: TrainingSet, params: TrainParams, prompts: PromptBuilder,
                 trigger: str, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
                 non_blocking: bool = False) -> None:
        self.backend, self.data, self.params, self.prompts, self.trigger = backend, data, params, prompts, trigger
        self.scaler, self.amp_dtype, self.non_blocking = scaler, amp_dtype, non_blocking
        self.order = BatchOrder(data.buckets, params.batch_size, params.seed)

    def accumulate(self, step: int, vectors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Backward over `grad_accum` micro-batches; returns the step's loss (not synced) and epoch."""
        p, device = self.params, self.backend.device
        rng = random.Random(derive_seed(p.seed, step))
        gen = torch.Generator().manual_seed(derive_seed(p.seed, step, 1))
        loss_sum = torch.zeros((), device=device)
        epoch = 0
        for micro in range(p.grad_accum):
            epoch, indices = self.order.batch(step * p.grad_accum + micro)
            flips = [rng.random() < p.flip_p for _ in indices]
            texts = [self.prompts.render(self.data.captions[i], rng) for i in indices]
            latents = torch.stack([self.data.latent(i, f, p.latent_sampling, gen)
                                   for i, f in zip(indices, flips)])
            if self.non_blocking:  # stack made a fresh tensor: pin it so the copy can overlap compute
                latents = latents.pin_memory()
            latents = latents.to(device, non_blocking=self.non_blocking)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            timesteps = torch.randint(0, self.backend.num_train_timesteps, (len(indices),), generator=gen)
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                cond = self.backend.encode_text(texts, self.trigger, vectors)
                loss = self.backend.training_loss(latents, cond, noise, timesteps.to(device)).mean()
            loss = loss / p.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum, epoch


def _copy(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vectors.items()}


def _drain(pending: list[tuple[int, torch.Tensor, float]], result: TrainResult, state: _State,
           vectors: dict[str, torch.Tensor]) -> bool:
    """Read pending losses back (one sync for many steps) and advance the last-good copy.

    Returns True, with the result marked "nan", when a loss or the vectors stopped being finite:
    the last good vectors are then what gets saved."""
    if not pending:
        return False
    values = torch.stack([t for _, t, _ in pending]).float().cpu().tolist()
    steps = [s for s, _, _ in pending]
    pending.clear()
    problem = None
    for s, value in zip(steps, values):
        if not math.isfinite(value):
            problem = (s, "NaN" if math.isnan(value) else "infinite")
            break
        result.losses.append((s, value))
    if problem is None and not all(bool(torch.isfinite(v).all()) for v in vectors.values()):
        problem = (steps[-1], "non-finite in the vectors")
    if problem is None:
        state.good = _copy(vectors)
        state.good_step = state.step
        return False
    result.status = "nan"
    result.message = (f"The loss became {problem[1]} at step {problem[0]}; training stopped and the last "
                      f"good vectors (step {state.good_step}) were kept. Lower the learning rate or check "
                      "the dataset.")
    return True


def _preview(backend: Backend, name: str, state: _State, params: TrainParams, prompt: str, paths: RunPaths,
             data: TrainingSet) -> Path:
    width, height = data.buckets[0]
    with torch.no_grad():
        image = backend.preview(prompt, name, _copy(state.vectors), seed=params.preview_seed,
                                steps=params.preview_steps, width=width, height=height,
                                cfg_scale=params.preview_cfg, negative_prompt=params.preview_negative)
    path = paths.previews / f"{name}-{state.step}.png"
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
