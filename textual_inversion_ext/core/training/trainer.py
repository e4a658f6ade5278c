"""The training loop: only the embedding's vectors learn; the model stays frozen.

One readable loop in the spirit of diffusers' example, with the fixes the host lacks: the
template line is drawn every step, flips are real, clipping runs after unscaling, a NaN guard
keeps the last good vectors, and the embedding is saved on every way out (finish, interrupt,
error). Randomness is derived from (seed, step) so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import formats
from ..backend import Backend, TrainingOptions
from ..data.dataset import BatchOrder, TrainingSet, derive_seed
from ..data.templates import PromptBuilder
from ..embedding import Embedding
from ..errors import TrainingError
from . import health
from .fallback import save_with_fallback
from .grid import snapshot_step
from .metrics import LossCsv, Progress, StepTimer
from .precision import Precision, resolve_precision
from .previews import PreviewSettings, preview_prompts, save_png
from .records import sidecar_path
from .schedule import LRSchedule
from .train_params import TrainParams
from .validation import ValidationPlan, ValidationSet, ValidationTracker, plan_for

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]
ArtifactCallback = Callable[[str, Path], None]  # ("snapshot" | "preview", path), as soon as it is written
SavedCallback = Callable[[Path, dict[str, Any]], None]  # after every embedding save: (path, facts of the run)


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
    snapshots: list[Path] = field(default_factory=list)  # kept snapshots (regular and best), by step
    previews: list[Path] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None  # lowest validation loss
    best_loss: float | None = None
    best_path: Path | None = None  # its snapshot
    start_path: Path | None = None  # the starting vectors (the comparison grid's baseline column)
    norms: list[tuple[int, float]] = field(default_factory=list)  # (step, largest norm ratio)
    warnings: list[str] = field(default_factory=list)
    recoveries: list[str] = field(default_factory=list)  # non-finite losses rolled back
    early_stopped: bool = False
    validation_plan: ValidationPlan | None = None  # when and on how much validation ran


@dataclass
class _State:
    vectors: dict[str, torch.Tensor]
    good: dict[str, torch.Tensor]  # last vectors known to be finite
    good_optim: dict[str, Any]  # the optimizer state that goes with them
    good_step: int
    step: int


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
    on_saved: SavedCallback | None = None,
    validation_data: TrainingSet | None = None,
    scaler_state: dict | None = None,
    precision: Precision | None = None,
) -> TrainResult:
    """Train `embedding` in place (its vectors and step are updated) and save it to `paths.final`.

    `validation_data`: held-out images for the validation loss; None = the training images. `scaler_state`: the
    GradScaler state saved with `optimizer_state` (fp16 runs). `precision`: as `resolve_precision` decided it
    (None = decide here)."""
    run = _Run(backend, embedding, data, params, paths, template_lines, progress, stop or threading.Event(),
               optimizer_state, on_artifact, on_saved, validation_data, scaler_state, precision)
    return run.run()


class _Run:
    """One training run's state and its steps; `run()` is the loop."""

    def __init__(self, backend: Backend, embedding: Embedding, data: TrainingSet, params: TrainParams,
                 paths: RunPaths, template_lines: list[str], progress: ProgressCallback | None,
                 stop: threading.Event, optimizer_state: dict | None, on_artifact: ArtifactCallback | None,
                 on_saved: SavedCallback | None, validation_data: TrainingSet | None,
                 scaler_state: dict | None = None, precision: Precision | None = None) -> None:
        self.backend, self.embedding, self.data, self.p, self.paths = backend, embedding, data, params, paths
        self.progress, self.stop, self.on_artifact, self.on_saved = progress, stop, on_artifact, on_saved
        p, device = params, backend.device
        self.schedule = LRSchedule(p.learn_rate, p.max_steps, embedding.step)
        self.clip_schedule = (LRSchedule(p.clip_grad_value, p.max_steps, embedding.step)
                              if p.clip_grad_mode != "disabled" else None)
        if embedding.step >= self.schedule.end_step:
            raise TrainingError(
                f"'{embedding.name}' is already at step {embedding.step}; the schedule ends at step "
                f"{self.schedule.end_step}. Raise max steps or extend the learning-rate schedule.")
        _check_sampler(backend, p.preview_sampler)
        self.start_step = embedding.step
        self.lr_scale = p.batch_size * p.grad_accum if p.scale_lr else 1
        self.lr_factor = 1.0  # halved by every recovery from a non-finite loss
        self.precision = precision or resolve_precision(p, backend)
        self.amp_dtype = self.precision.autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.grad_scaler)
        if scaler_state and self.scaler.is_enabled():  # the loss scale an uninterrupted fp16 run would have now
            self.scaler.load_state_dict(scaler_state)
        vectors = {k: v.detach().to(device, torch.float32).clone().requires_grad_(True)
                   for k, v in embedding.vectors.items()}
        self.optimizer = torch.optim.AdamW(list(vectors.values()), lr=self._lr(embedding.step), weight_decay=0.0)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
            logger.info("Resuming with the saved optimizer state")
        self.state = _State(vectors, _copy(vectors), copy.deepcopy(self.optimizer.state_dict()), embedding.step,
                            embedding.step)
        prompts = PromptBuilder(template_lines, embedding.name, p.shuffle_tags, p.tag_dropout)
        self.pinned = p.pin_memory and device.type == "cuda"
        if self.pinned:
            data.pin()
        self.batches = _MicroBatches(backend, data, p, prompts, embedding.name, self.scaler, self.amp_dtype,
                                     self.pinned)
        self.steps_per_epoch = max(1, self.batches.order.batches_per_epoch // p.grad_accum)
        self.previews = preview_prompts(p, template_lines, embedding.name, data.captions[0])
        self.preview_settings = PreviewSettings.from_params(p, data.buckets[0])
        val_data = validation_data or data
        self.val_plan = plan_for(p, embedding.step, self.schedule.end_step, len(val_data))
        logger.info(self.val_plan.note)
        self.val_set = (ValidationSet(backend, val_data, embedding.name, template_lines,
                                      timesteps_per_image=p.val_timesteps, samples=self.val_plan.samples,
                                      batch_size=max(4, 2 * p.batch_size)) if self.val_plan.every else None)
        self.tracker = ValidationTracker(p.overtrain_patience)
        self.medians: dict[str, float] = {}
        self.result = TrainResult("finished", embedding.step, paths.final, "", validation_plan=self.val_plan)
        self.csv = LossCsv(paths.loss_csv) if p.csv_every else None
        self.timer = StepTimer()
        self.pending: list[tuple[int, torch.Tensor, float]] = []  # losses not yet read back (no sync per step)
        self.since_val: list[float] = []  # training losses since the last validation
        self.unreported: list[tuple[int, float]] = []  # validation points not yet sent to `progress`
        self.saved: set[Path] = set()
        self.fallback_note: str | None = None  # where the final save went instead of `paths.final`
        self.best_only: Path | None = None  # a snapshot kept only because it was the best step
        self.norm_warned = False
        self.epoch = 0

    def _lr(self, step: int) -> float:
        return self.schedule.rate_at(step) * self.lr_scale * self.lr_factor

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        p, state, result = self.p, self.state, self.result
        # Reading losses back syncs the GPU; on CPU it is free, so check every step there.
        check_every = 1 if self.backend.device.type == "cpu" else 8
        options = TrainingOptions(p.gradient_checkpointing, p.attention_optimizations, p.offload_vae)
        try:
            with self.backend.training_session(options):
                self.medians = health.vocabulary_median_norms(self.backend)
                result.start_path = self._snapshot(state.step)
                if self.val_set is not None:
                    self._validate(state.step)
                while state.step < self.schedule.end_step:
                    if self.stop.is_set():
                        result.status, result.message = "interrupted", f"Interrupted at step {state.step}."
                        break
                    self._step()
                    s = state.step
                    due = (s % check_every == 0 or s >= self.schedule.end_step
                           or any(every and s % every == 0 for every in (p.csv_every, p.save_every,
                                                                         p.preview_every, self.val_plan.every)))
                    if due and self._checks():
                        break
            self._drain()  # an interrupt can leave steps not yet read back
        except BaseException as exc:
            self._fail(exc)
            raise TrainingError(f"Training stopped at step {state.good_step} by {result.message}. "
                                f"{self._where_saved()}") from exc
        finally:
            if self.csv:
                self.csv.close()
        self._save_final()
        return self._finish()

    def _step(self) -> None:
        p, state, vectors = self.p, self.state, self.state.vectors
        step = state.step
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, self.epoch = self.batches.accumulate(step, vectors)
        self.scaler.unscale_(self.optimizer)  # clip real gradients, not loss-scaled ones (host bug)
        if self.clip_schedule is not None:
            clip = self.clip_schedule.rate_at(step)
            if p.clip_grad_mode == "value":
                torch.nn.utils.clip_grad_value_(list(vectors.values()), clip)
            else:
                torch.nn.utils.clip_grad_norm_(list(vectors.values()), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if p.norm_cap:
            health.cap_norms(vectors, self.medians, p.norm_cap)
        state.step = step + 1
        self.pending.append((state.step, loss_sum, lr))
        self.timer.tick()

    def _checks(self) -> bool:
        """Everything that needs the losses read back; True = stop the loop."""
        p, state, result = self.p, self.state, self.result
        problem = self._drain()
        if problem is not None:
            return not self._recover(*problem)
        s = state.step
        ratios = health.norm_ratios(state.good, self.medians)
        norm = health.max_ratio(ratios)
        result.norms.append((s, norm))
        self._check_norm(s, norm)
        val = None
        if self.val_set is not None and (s % self.val_plan.every == 0 or s >= self.schedule.end_step):
            val = self._validate(s)
        if self.csv is not None and s % p.csv_every == 0:
            self.csv.write(s, (s - 1) // self.steps_per_epoch, (s - 1) % self.steps_per_epoch,
                           result.losses[-1][1], self._lr(s - 1), val, norm)
        if p.save_every and s % p.save_every == 0:
            path = self._snapshot(s)
            if path == self.best_only:  # a regular snapshot now: keep it
                self.best_only = None
            result.snapshots.append(path)
        if p.preview_every and s % p.preview_every == 0:
            self._preview(s)
        if self.progress and result.losses:
            self.progress(Progress(
                s, self.schedule.end_step, result.losses[-1][1], self._lr(s - 1), self.timer.s_per_step,
                self.timer.eta(self.schedule.end_step - s), self.epoch, validation=tuple(self.unreported),
                best_step=self.tracker.best.step if self.tracker.best else None,
                norm_ratios=tuple(r for values in ratios.values() for r in values),
                warnings=tuple(result.warnings)))
            self.unreported.clear()
        if p.early_stop and self.tracker.overtraining_step is not None:
            result.early_stopped = True
            result.message = f"Stopped early at step {s}: {result.warnings[-1]}"
            return True
        return False

    # ------------------------------------------------------------------ pieces

    def _drain(self) -> tuple[int, str] | None:
        """Read pending losses back (one sync for many steps) and advance the last-good copy.

        Returns (step, what) when a loss or the vectors stopped being finite."""
        if not self.pending:
            return None
        state, result = self.state, self.result
        values = torch.stack([t for _, t, _ in self.pending]).float().cpu().tolist()
        steps = [s for s, _, _ in self.pending]
        self.pending.clear()
        for s, value in zip(steps, values):
            if not math.isfinite(value):
                return s, "NaN" if math.isnan(value) else "infinite"
            result.losses.append((s, value))
            self.since_val.append(value)
        if not all(bool(torch.isfinite(v).all()) for v in state.vectors.values()):
            return steps[-1], "non-finite in the vectors"
        if self.scaler.is_enabled() and self.scaler.get_scale() < 1.0:
            return steps[-1], "skipped: the fp16 gradient scale collapsed"
        state.good = _copy(state.vectors)
        state.good_optim = copy.deepcopy(self.optimizer.state_dict())
        state.good_step = state.step
        return None

    def _recover(self, step: int, what: str) -> bool:
        """Roll back to the last good vectors and optimizer state with half the learning rate; False when
        the allowed recoveries are used up (the run stops, keeping the last good vectors)."""
        state, result = self.state, self.result
        if len(result.recoveries) >= self.p.nan_retries:
            result.status = "nan"
            result.message = (f"The loss became {what} at step {step}; training stopped and the last good vectors "
                              f"(step {state.good_step}) were kept. Lower the learning rate or check the dataset.")
            if result.recoveries:
                result.message += f" ({len(result.recoveries)} earlier recoveries.)"
            return False
        with torch.no_grad():
            for key, vec in state.vectors.items():
                vec.copy_(state.good[key])
        self.optimizer.load_state_dict(copy.deepcopy(state.good_optim))
        if self.scaler.is_enabled():
            self.scaler.update(new_scale=2.0**16)
        self.lr_factor *= 0.5
        state.step = state.good_step
        result.losses = [(s, v) for s, v in result.losses if s <= state.good_step]
        note = (f"The loss became {what} at step {step}: rolled back to step {state.good_step} and continued "
                f"with the learning rate × {self.lr_factor:g}.")
        result.recoveries.append(note)
        result.warnings.append(note)
        logger.warning(note)
        return True

    def _check_norm(self, step: int, norm: float) -> None:
        if self.norm_warned or not self.p.norm_warn or norm <= self.p.norm_warn:
            return
        self.norm_warned = True
        note = (f"Vector norms are inflating: at step {step} the largest is {norm:.1f}× the median of the model's "
                "vocabulary. Such embeddings tend to override the rest of the prompt; lower the learning rate, "
                "keep an earlier step or set a norm cap.")
        self.result.warnings.append(note)
        logger.warning(note)

    def _validate(self, step: int) -> float:
        result = self.result
        val = self.val_set.loss(self.state.good, self.amp_dtype)
        train_mean = sum(self.since_val) / len(self.since_val) if self.since_val else None
        self.since_val.clear()
        result.validation.append((step, val))
        self.unreported.append((step, val))
        new_best, warning = self.tracker.add(step, val, train_mean)
        if warning:
            result.warnings.append(warning)
            logger.warning(warning)
        if new_best:
            result.best_step, result.best_loss = step, val
            if self.p.keep_best:
                self._keep_best(step)
        return val

    def _snapshot_path(self, step: int) -> Path:
        return self.paths.snapshots / f"{self.embedding.name}-{step}.pt"

    def _keep_best(self, step: int) -> None:
        path = self._snapshot_path(step)
        kept_anyway = path in self.saved
        previous = self.best_only
        self.result.best_path = self._snapshot(step)
        self.best_only = None if kept_anyway else path
        if previous is not None and previous != path:
            _remove_snapshot(previous)
            self.saved.discard(previous)

    def _snapshot(self, step: int) -> Path:
        """Save the current (good) vectors as `<name>-<step>.pt` once; returns its path."""
        path = self._snapshot_path(step)
        if path not in self.saved:
            self._save(path)
            self.saved.add(path)
            if self.on_artifact:
                self.on_artifact("snapshot", path)
        return path

    def _save(self, path: Path) -> None:
        state, embedding = self.state, self.embedding
        embedding.vectors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.good.items()}
        embedding.step = state.good_step
        formats.save_embedding(embedding, path)
        # After a NaN the optimizer's moments are newer than (and maybe poisoned like) the kept vectors.
        if self.p.save_optimizer_state and state.good_step == state.step:
            formats.save_optimizer_state(embedding, path, self.optimizer.state_dict(), self.scaler.state_dict())
        if self.on_saved:
            self.on_saved(path, self.facts())

    def _save_final(self) -> None:
        """The last save, on every way out: a target that cannot be written gets a fallback (see fallback.py)."""
        self.result.final_path, self.fallback_note = save_with_fallback(self._save, self.paths.final,
                                                                        self.paths.log_dir)
        if self.fallback_note:
            self.result.warnings.append(self.fallback_note)

    def _where_saved(self) -> str:
        return self.fallback_note or f"Embedding saved to {self.result.final_path}."

    def facts(self) -> dict[str, Any]:
        """What the sidecar of a saved file records about the run so far."""
        r, done = self.result, self.state.good_step - self.start_step
        elapsed = time.perf_counter() - self.timer.started
        return {
            "step": self.state.good_step, "steps_done": done, "seconds": round(elapsed, 2),
            "s_per_step": round(elapsed / done, 4) if done else None,
            "loss": r.losses[-1][1] if r.losses else None,
            "val_loss": r.validation[-1][1] if r.validation else None,
            "best_step": r.best_step, "best_val_loss": r.best_loss,
            "norm_ratio": r.norms[-1][1] if r.norms else None,
            "warnings": list(r.warnings), "recoveries": len(r.recoveries),
            # pairs the record with the vectors saved with it (`records.recorded_step`: files without a step)
            "content_hash": self.embedding.content_hash(),
        }

    def _preview(self, step: int) -> None:
        for k, prompt in enumerate(self.previews):
            image = self.preview_settings.render(self.backend, prompt, self.embedding.name, self.state.good)
            suffix = f"-{k + 1}" if len(self.previews) > 1 else ""
            path = self.paths.previews / f"{self.embedding.name}-{step}{suffix}.png"
            save_png(image, path)
            self.result.previews.append(path)
            if self.on_artifact:
                self.on_artifact("preview", path)

    def _fail(self, exc: BaseException) -> None:
        result = self.result
        try:
            self._drain()
        except Exception:  # the device may be unusable now; the last good vectors are still saved
            logger.exception("Could not read back the last losses")
        result.status = "error"
        result.message = f"{type(exc).__name__}: {exc}"
        self._save_final()
        logger.error("Training stopped by an error at step %d; embedding saved to %s", self.state.good_step,
                     result.final_path)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: saved, now let it through
            raise exc

    def _finish(self) -> TrainResult:
        result, state = self.result, self.state
        result.step = state.good_step
        result.snapshots = sorted({*result.snapshots, *([result.best_path] if result.best_path else [])},
                                  key=lambda path: snapshot_step(path) or 0)
        if result.status == "finished" and not result.early_stopped:
            result.message = f"Finished at step {state.good_step}."
        if result.best_step is not None:
            result.message += (f" Best step by validation loss: {result.best_step} "
                               f"({result.best_loss:.5f})")
            result.message += f"; its snapshot is {result.best_path}." if result.best_path else "."
        if result.recoveries:
            result.message += (f" Recovered {len(result.recoveries)}× from a non-finite loss (rolled back, "
                               f"learning rate now × {self.lr_factor:g}).")
        result.message += f" {self._where_saved()}"
        return result


def _check_sampler(backend: Backend, name: str) -> None:
    if not name:
        return
    available = backend.samplers()
    if name not in available:
        raise TrainingError(f"Unknown preview sampler {name!r}; this model offers: {', '.join(available)}.")


def _remove_snapshot(path: Path) -> None:
    """Delete a snapshot with its optimizer state and sidecar."""
    for file in (path, formats.optim_path(path), sidecar_path(path)):
        file.unlink(missing_ok=True)


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
            weight = self.data.weights(indices, flips)  # None unless alpha weighting cached maps
            if weight is not None:
                weight = weight.to(device, non_blocking=self.non_blocking)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            timesteps = torch.randint(0, self.backend.num_train_timesteps, (len(indices),), generator=gen)
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                cond = self.backend.encode_text(texts, self.trigger, vectors, self.data.geometries(indices))
                loss = self.backend.training_loss(latents, cond, noise, timesteps.to(device), weight).mean()
            loss = loss / p.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum, epoch


def _copy(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vectors.items()}
