"""Validation loss, best step and the overtraining warning.

The per-step training loss is too noisy to tell when to stop (random image, timestep and noise every
step). The validation loss fixes all three per image: the same images, prompts, noise and evenly
spread timesteps at every evaluation, independent of the training seed, so it is comparable across
steps and across runs on the same data.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import torch

from ..backend import Backend
from ..data.dataset import TrainingSet, derive_seed
from ..data.templates import PromptBuilder
from ..errors import DatasetError

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


@dataclass
class _Item:
    latent: torch.Tensor  # (T, C, h, w): the image's mean latent, once per timestep
    text: str
    noise: torch.Tensor  # (T, C, h, w)
    timesteps: torch.Tensor  # (T,)


class ValidationSet:
    """Fixed (latent, prompt, noise, timesteps) per image; `loss(vectors)` is deterministic."""

    def __init__(self, backend: Backend, data: TrainingSet, trigger: str, template_lines: list[str], *,
                 timesteps_per_image: int = 4, seed: int = VALIDATION_SEED) -> None:
        self.backend, self.trigger = backend, trigger
        prompts = PromptBuilder(template_lines, trigger)
        n_t = backend.num_train_timesteps
        k = timesteps_per_image
        # Midpoints of k equal bins cover the whole noise range, from nearly clean to nearly pure noise.
        steps = torch.tensor([int((j + 0.5) * n_t / k) for j in range(k)])
        self.items: list[_Item] = []
        for i in range(len(data)):
            mean = data.latents[i][False].mean
            gen = torch.Generator().manual_seed(derive_seed(seed, i, 7))
            self.items.append(_Item(
                latent=mean.unsqueeze(0).expand(k, *mean.shape),
                text=prompts.render(data.captions[i], random.Random(derive_seed(seed, i))),
                noise=torch.randn((k, *mean.shape), generator=gen),
                timesteps=steps,
            ))

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def loss(self, vectors: dict[str, torch.Tensor], amp_dtype: torch.dtype | None = None) -> float:
        """Mean denoising loss over every image × timestep (one sync at the end)."""
        device = self.backend.device
        total = torch.zeros((), device=device)
        count = 0
        for item in self.items:
            n = len(item.timesteps)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                cond = self.backend.encode_text([item.text] * n, self.trigger, vectors)
                loss = self.backend.training_loss(item.latent.to(device), cond, item.noise.to(device),
                                                  item.timesteps.to(device))
            total += loss.float().sum()
            count += n
        return float(total) / max(1, count)


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
