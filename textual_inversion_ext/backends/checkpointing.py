"""Gradient checkpointing for UNets whose blocks call a module-level `checkpoint(func, inputs, params, flag)`
(ldm/sgm's signature, kept by Forge's `backend.nn.unet`), while their weights are frozen.

sgm's own `checkpoint` asks autograd for the gradient of every block weight (there is none once frozen);
Forge's raises NotImplementedError. Replacing the function by torch's non-reentrant checkpoint and switching
the blocks' flags on gives checkpointing that needs gradients for the inputs only. Imports the block modules by
name only: the host's modules stay in the backend that names them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

FLAGS = ("use_checkpoint", "checkpoint")


def torch_checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Any, flag: bool) -> Any:
    """The blocks' `checkpoint(func, inputs, params, flag)` on torch's non-reentrant checkpoint."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


@contextlib.contextmanager
def block_checkpointing(unet: torch.nn.Module, module_names: Sequence[str], on: bool = True) -> Iterator[None]:
    """Within the block, every block of `unet` checkpoints (`on`) or none does (`on` False: e.g. ldm's configs
    ask for its CheckpointFunction, which fails on frozen weights); the modules' functions and the flags are
    restored afterwards."""
    modules = [importlib.import_module(name) for name in module_names] if on else []
    saved_fns = [(module, module.checkpoint) for module in modules]
    saved_flags = [(block, attr, value) for block in unet.modules() for attr in FLAGS
                   if isinstance(value := block.__dict__.get(attr), bool)]
    try:
        for module in modules:
            module.checkpoint = torch_checkpoint
        for block, attr, _ in saved_flags:
            setattr(block, attr, on)
        yield
    finally:
        for module, fn in saved_fns:
            module.checkpoint = fn
        for block, attr, value in saved_flags:
            setattr(block, attr, value)
