"""Keeping a frozen model's RAM/VRAM small while only the embedding trains.

- `trim_memory`: glibc keeps freed heap memory for reuse instead of returning it to the system; after loading
  a model (built in float32, then cast) or freeing the VAE, ask it to give that memory back.
- `lean_geglu`: diffusers' GEGLU (the UNet's feed-forward, `h * gelu(gate)`) keeps `gelu(gate)` for the
  backward beside its inputs; the lean form keeps only the inputs and recomputes the gelu there (the same
  ops in the same order, so the same numbers), a third less of the feed-forward's saved memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

logger = logging.getLogger(__name__)


def trim_memory() -> bool:
    """Return freed heap memory to the OS (glibc's `malloc_trim`); False where there is no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    trim(0)
    return True


class _GatedGelu(torch.autograd.Function):
    """`hidden * gelu(gate)` saving only `hidden` and `gate`; the backward recomputes `gelu(gate)` and runs the
    ops autograd would (mul's and gelu's backward), so the gradients are bitwise the same."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(hidden, gate)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        hidden, gate = ctx.saved_tensors
        grad_hidden = grad * F.gelu(gate) if ctx.needs_input_grad[0] else None
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_gate


def _lean_forward(self: GEGLU, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    hidden, gate = self.proj(hidden_states).chunk(2, dim=-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or gate.requires_grad):
        return _GatedGelu.apply(hidden, gate)
    return hidden * F.gelu(gate)


@contextlib.contextmanager
def lean_geglu(model: torch.nn.Module) -> Iterator[int]:
    """Run `model`'s diffusers GEGLU modules in the lean form for the block; yields how many were switched.
    Only plain GEGLUs on CUDA/CPU (or meta, for counting) are switched: not a subclass, nor diffusers' MPS/NPU
    special cases."""
    switched = [m for m in model.modules() if type(m) is GEGLU and "forward" not in vars(m)
                and m.proj.weight.device.type in ("cpu", "cuda", "meta")]
    for module in switched:
        module.forward = types.MethodType(_lean_forward, module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
