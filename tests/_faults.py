"""A backend wrapper that injects a fault at chosen training-loss calls (trainer error-path tests)."""

from __future__ import annotations

from collections.abc import Container

import torch


class FaultyBackend:
    """The wrapped backend, whose training loss is NaN (`fault="nan"`) or raises (`fault="raise"`) at the
    training calls numbered in `bad_calls` (from 1). Validation calls (under no_grad) are not counted."""

    def __init__(self, inner, bad_calls: Container[int], fault: str = "nan") -> None:
        self._inner, self.bad_calls, self.fault, self.calls = inner, bad_calls, fault, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def training_loss(self, *args, **kwargs):
        loss = self._inner.training_loss(*args, **kwargs)
        if not torch.is_grad_enabled():  # the validation loss: not a training call
            return loss
        self.calls += 1
        if self.calls not in self.bad_calls:
            return loss
        if self.fault == "nan":
            return loss * float("nan")
        raise RuntimeError("injected failure")
