"""Validation loss, best step and the overtraining warning.

The per-step training loss is too noisy to tell when to stop (random image, timestep and noise every
step). The validation loss fixes all three per image: the same images, prompts, noise and evenly
spread timesteps at every evaluation, independent of the training seed, so it is comparable across
steps and across runs on the same data.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import torch

from ..backend import Backend, SampleGeometry
from ..data.dataset import TrainingSet, derive_seed, stack_weights
from ..data.templates import PromptBuilder
from ..errors import DatasetError
from .train_params import TrainParams

# Independent of the training seed on purpose: two runs with different seeds get the same set.
VALIDATION_SEED = 0x5EED
# A rise smaller than this share of the loss is not called overtraining: on a small model the fixed-noise
# loss wobbles by a few 0.01 % while the embedding barely moves (measured on the quality benchmark's model).
MIN_RELATIVE_RISE = 1e-3


def split_indices(count: int, fraction: float) -> tuple[list[int], list[int]]:
    """(training, held-out) image indices: every k-th image is held out, so the choice does not depend
    on the seed and spreads over the (usually name-sorted) folder."""
    if fraction <= 0:
        return list(range(count)), []
    held = max(1, round(count * fraction))
    if count - held < 1:
        raise DatasetError(f"A validation split of {fraction:g} leaves no training image out of {count}; "
                           "add images or lower the split.")
    stride = count / held
    val = sorted({min(count - 1, int(stride * k + stride / 2)) for k in range(held)})
    train = [i for i in range(count) if i not in set(val)]
    return train, val


# Counting one forward pass without gradients as half a training sample (forward + backward, the backward at
# least as costly) overestimates validation (measured on CPU: 0.2-0.45 for SD1.5 at 256 px, ~0.4 for the tiny model),
# so the budget holds without timing anything.
FORWARD_COST = 0.5
# Per pass, shrink the set to this many samples before spreading the passes out (a smaller set is a coarser
# estimate of the loss; fewer passes a coarser curve).
MIN_SAMPLES = 8


def count_passes(start: int, end: int, every: int) -> int:
    """Validations in a run from `start` to `end`: the start, every multiple of `every`, and the end."""
    if every <= 0 or end <= start:
        return 0
    return 1 + end // every - start // every + (0 if end % every == 0 else 1)


@dataclass(frozen=True)
class ValidationPlan:
    """When and on how much the validation loss is measured in one run (`plan_validation`)."""

    every: int  # at the start, at multiples of `every` and at the end; 0 = no validation
    samples: int  # (image, timestep) pairs per pass
    full: int  # images × timesteps, what was asked for
    passes: int
    share: float  # estimated validation cost / training cost
    note: str


def plan_validation(*, start: int, end: int, samples_per_step: int, images: int, timesteps: int, every: int,
                    budget: float) -> ValidationPlan:
    """Fit the validation into `budget` × the training cost (both counted in forward samples, see
    FORWARD_COST): first fewer samples per pass (down to MIN_SAMPLES), then a longer interval, then fewer
    samples again; a run that cannot afford a check at the start and the end skips validation. Counting
    rather than timing keeps the plan, and so the run, reproducible. `budget` 0 = no limit."""
    full = images * timesteps
    if every <= 0 or full <= 0:
        return ValidationPlan(0, 0, full, 0, 0.0, "Validation: off.")
    steps = max(1, end - start)
    train_cost = steps * max(1, samples_per_step)

    def plan(n: int, samples: int, why: str) -> ValidationPlan:
        passes = count_passes(start, end, n)
        share = passes * samples * FORWARD_COST / train_cost
        text = (f"Validation: {samples} sample(s) (of {images} image(s) × {timesteps} timestep(s)) at step {start}, "
                f"every {n} steps and at the end: {passes} passes, about {share:.0%} of the training time{why}.")
        return ValidationPlan(n, samples, full, passes, share, text)

    if budget <= 0:
        return plan(every, full, " (no budget)")
    allowed = budget * train_cost / FORWARD_COST  # forward samples this run may spend on validation
    if count_passes(start, end, every) * full <= allowed:
        return plan(every, full, "")
    why = f", fitted to the {budget:.0%} validation budget"
    samples = min(full, max(MIN_SAMPLES, int(allowed // count_passes(start, end, every))))
    n = every
    if count_passes(start, end, n) * samples > allowed:
        # About the smallest interval that fits, then up until it does (count_passes falls with n, not strictly:
        # the end may be a multiple or not); past the end only the start and the end are left.
        n = max(every, math.ceil(steps / max(1, allowed // samples - 2)))
        while count_passes(start, end, n) * samples > allowed and n <= end:
            n += max(1, n // 50)
        samples = min(samples, int(allowed // count_passes(start, end, n)))
    if samples < 1:
        return ValidationPlan(0, 0, full, 0, 0.0, (
            f"Validation: skipped — {steps} step(s) are too few to check even one sample at the start and the end "
            f"within the {budget:.0%} validation budget (set the budget to 0 to validate anyway)."))
    return plan(n, samples, why)


def plan_for(params: TrainParams, start: int, end: int, images: int) -> ValidationPlan:
    """The run's plan from its parameters (validation from `start` to `end` on `images` images)."""
    return plan_validation(start=start, end=end, samples_per_step=params.batch_size * params.grad_accum,
                           images=images, timesteps=params.val_timesteps, every=params.val_every,
                           budget=params.val_budget)


@dataclass
class _Sample:
    image: int
    latent: torch.Tensor  # (C, h, w): the image's mean latent
    text: str
    noise: torch.Tensor  # (C, h, w)
    timestep: int
    weight: torch.Tensor | None = None  # (1, h, w) loss weight from the alpha, as in training
    geometry: SampleGeometry | None = None  # how the image was cut (size conditioning), as in training


class ValidationSet:
    """Fixed (latent, prompt, noise, timestep) samples; `loss(vectors)` is deterministic.

    All images × `timesteps_per_image` evenly spread timesteps, or, with `samples` fewer than that, a fixed
    stratified subset: `samples` timesteps spread over the whole noise range, dealt out over evenly spread
    images. Forward passes are batched (`batch_size` samples of one latent size each)."""

    def __init__(self, backend: Backend, data: TrainingSet, trigger: str, template_lines: list[str], *,
                 timesteps_per_image: int = 4, seed: int = VALIDATION_SEED, samples: int | None = None,
                 batch_size: int = 8) -> None:
        self.backend, self.trigger, self.batch_size = backend, trigger, max(1, batch_size)
        prompts = PromptBuilder(template_lines, trigger)
        n_t, n_img, k = backend.num_train_timesteps, len(data), timesteps_per_image
        if samples is None or samples >= n_img * k:
            # Midpoints of k equal bins cover the whole noise range, from nearly clean to nearly pure noise.
            chosen = [(i, int((j + 0.5) * n_t / k)) for i in range(n_img) for j in range(k)]
        else:
            images = [int((j + 0.5) * n_img / min(n_img, samples)) for j in range(min(n_img, samples))]
            bins = list(range(samples))
            random.Random(seed).shuffle(bins)  # no tie between an image and a noise level
            chosen = sorted((images[r % len(images)], int((bins[r] + 0.5) * n_t / samples)) for r in range(samples))
        self.samples: list[_Sample] = []
        for i, group in itertools.groupby(chosen, key=lambda c: c[0]):
            steps = [t for _, t in group]
            mean = data.latents[i][False].mean
            gen = torch.Generator().manual_seed(derive_seed(seed, i, 7))
            noise = torch.randn((len(steps), *mean.shape), generator=gen)
            text = prompts.render(data.captions[i], random.Random(derive_seed(seed, i)))
            weight = data.latents[i][False].weight
            cut = data.geometry[i] if data.geometry else None
            self.samples += [_Sample(i, mean, text, noise[j], t, weight, cut) for j, t in enumerate(steps)]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def images(self) -> int:
        return len({s.image for s in self.samples})

    def batches(self) -> list[list[_Sample]]:
        """The samples in forward-pass batches, one latent size per batch (fixed, so every pass is alike)."""
        by_shape: dict[tuple[int, ...], list[_Sample]] = {}
        for sample in self.samples:
            by_shape.setdefault(tuple(sample.latent.shape), []).append(sample)
        return [group[i:i + self.batch_size] for group in by_shape.values()
                for i in range(0, len(group), self.batch_size)]

    @torch.no_grad()
    def loss(self, vectors: dict[str, torch.Tensor], amp_dtype: torch.dtype | None = None) -> float:
        """Mean denoising loss over every sample (one sync at the end)."""
        device = self.backend.device
        total = torch.zeros((), device=device)
        for batch in self.batches():
            latents = torch.stack([s.latent for s in batch]).to(device)
            noise = torch.stack([s.noise for s in batch]).to(device)
            timesteps = torch.tensor([s.timestep for s in batch], device=device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                cuts = [s.geometry for s in batch]
                cond = self.backend.encode_text([s.text for s in batch], self.trigger, vectors,
                                                None if None in cuts else cuts)
                weight = stack_weights([s.weight for s in batch])  # alpha weights: the loss training minimizes
                loss = self.backend.training_loss(latents, cond, noise, timesteps,
                                                  None if weight is None else weight.to(device))
            total += loss.float().sum()
        return float(total) / max(1, len(self.samples))


@dataclass
class Evaluation:
    step: int
    val_loss: float
    train_loss: float | None  # mean training loss since the previous evaluation


@dataclass
class ValidationTracker:
    """Best step (lowest validation loss) and the overtraining signal: the validation loss rose
    `patience` evaluations in a row (by at least MIN_RELATIVE_RISE in all) while the training loss over the
    same span fell."""

    patience: int = 3
    history: list[Evaluation] = field(default_factory=list)
    best: Evaluation | None = None
    overtraining_step: int | None = None  # first step the warning fired

    def add(self, step: int, val_loss: float, train_loss: float | None) -> tuple[bool, str | None]:
        """Record an evaluation; returns (is_new_best, warning text when the warning fires now)."""
        ev = Evaluation(step, val_loss, train_loss)
        self.history.append(ev)
        new_best = self.best is None or val_loss < self.best.val_loss
        if new_best:
            self.best = ev
        if self.overtraining_step is None and self._overtraining():
            self.overtraining_step = step
            span = self.history[-(self.patience + 1):]
            return new_best, (
                f"Overtraining: the validation loss rose {self.patience} evaluations in a row "
                f"({span[0].val_loss:.5f} at step {span[0].step} → {val_loss:.5f} at step {step}) while the "
                f"training loss fell. The best step so far is {self.best.step}.")
        return new_best, None

    def _overtraining(self) -> bool:
        span = self.history[-(self.patience + 1):]
        if len(span) < self.patience + 1:
            return False
        rising = all(b.val_loss > a.val_loss for a, b in itertools.pairwise(span))
        clear = span[-1].val_loss - span[0].val_loss >= MIN_RELATIVE_RISE * abs(span[0].val_loss)
        first, last = span[0].train_loss, span[-1].train_loss
        return rising and clear and first is not None and last is not None and last < first
