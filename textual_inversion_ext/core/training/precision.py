"""The run's precision, decided once before training from the requested choice and the loaded weights.

As in diffusers' textual-inversion example ("cast to weight_dtype"): the frozen model stays in the dtype it
was loaded in, the trainable vectors and the optimizer stay fp32, and autocast runs in the weights' dtype, so
no op sees half weights with fp32 inputs. The GradScaler is on exactly when autocast is fp16 (fp16's small
range underflows gradients; bf16 has fp32's range).

| weights   | auto      | fp32                    | fp16                | bf16                 |
|-----------|-----------|-------------------------|---------------------|----------------------|
| fp16      | fp16      | refused (load in fp32)  | fp16                | refused (load bf16)  |
| bf16      | bf16      | refused (load in fp32)  | refused (load fp16) | bf16                 |
| fp32      | fp32      | fp32                    | fp16 autocast (AMP) | bf16 autocast (AMP)  |

fp16/bf16 requested on fp32 weights is classic mixed precision (fp32 weights, half compute) and is allowed
on CPU too: CPU autocast is opt-in there (rarely faster, but it is what the user asked for). A half choice
on half weights of the other kind is refused: autocast would cast every weight at every op and the result
would be neither dtype's numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..backend import Backend
from ..params import ParameterError
from .train_params import TrainParams

logger = logging.getLogger(__name__)

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in NAMES.items()}


@dataclass(frozen=True)
class Precision:
    """How a run computes: `autocast` dtype (None = plain fp32 ops), GradScaler on or off."""

    requested: str  # the params' choice: auto | fp32 | fp16 | bf16
    weights: torch.dtype  # the frozen model's dtype (the backend's `weight_dtype`)
    autocast: torch.dtype | None
    grad_scaler: bool

    def record(self) -> dict[str, Any]:
        """For run.json: what was asked and what the run does."""
        return {"requested": self.requested, "weights": NAMES[self.weights],
                "autocast": NAMES[self.autocast] if self.autocast is not None else None,
                "grad_scaler": self.grad_scaler}


def resolve_precision(params: TrainParams, backend: Backend) -> Precision:
    """The precision of a run on `backend` for `params.precision`; a ParameterError naming both ways out when
    the choice conflicts with the dtype the model is loaded in (see the table above)."""
    requested, weights = params.precision, backend.weight_dtype
    if weights not in NAMES:
        raise ParameterError(f"The model's weights are {weights}; training supports models loaded in fp32, fp16 "
                             "or bf16. Load it in one of those (standalone: --dtype).")
    if requested not in ("auto", *DTYPES):
        raise ParameterError(f"Precision: {requested!r} is not one of auto, {', '.join(DTYPES)}.")
    loaded = NAMES[weights]
    if requested == "auto" or requested == loaded:
        autocast = None if weights == torch.float32 else weights
    elif weights != torch.float32:
        fix = "load it in fp32 (web UI: --no-half; standalone: --dtype fp32)" if requested == "fp32" else \
            f"load it in {requested} (standalone: --dtype {requested})"
        raise ParameterError(f"Precision {requested} conflicts with the model, which is loaded in {loaded}: choose "
                             f"precision auto or {loaded}, or {fix}.")
    else:  # half compute over fp32 weights: torch's usual mixed precision
        autocast = DTYPES[requested]
    device = backend.device
    if autocast == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ParameterError("Precision bf16: this GPU has no bf16 support; choose fp16 or auto (and load the "
                             "model in fp16).")
    precision = Precision(requested, weights, autocast, grad_scaler=autocast == torch.float16)
    logger.info("Precision: weights %s, autocast %s, grad scaler %s (asked: %s)", loaded,
                NAMES.get(autocast, "off"), "on" if precision.grad_scaler else "off", requested)
    return precision
