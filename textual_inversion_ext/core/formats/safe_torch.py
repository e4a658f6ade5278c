"""Loading torch pickles (.pt/.bin/.optim) without ever running code from the file.

Only torch's restricted unpickler (`weights_only=True`) ever reads these files; its refusals are turned
into UnsafeFileError messages that name what the file tried to import.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import EmbeddingFormatError, UnsafeFileError
from ..fileio import atomic_path

logger = logging.getLogger(__name__)

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|Unsupported (?:class|global):? ([\w.]+)")


def _refusal(path: Path, names: list[str]) -> UnsafeFileError:
    listed = ", ".join(sorted(set(names)))
    return UnsafeFileError(
        f"Refused to load {path.name}: unpickling it would import {listed}, which is not part of plain "
        "tensor data and could run arbitrary code on this machine. It was not loaded; only use "
        "embedding files from sources you trust."
    )


def load_torch_file(path: Path) -> Any:
    """`torch.load` a .pt/.bin/.optim file onto the CPU with torch's restricted unpickler.

    Raises UnsafeFileError for files that would import anything beyond tensor data (the message names
    it), EmbeddingFormatError for empty or damaged ones.
    """
    if path.stat().st_size == 0:
        raise EmbeddingFormatError(f"{path.name} is empty (0 bytes).")
    try:
        with _legacy_classes_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        match = _REFUSED_GLOBAL.search(message)
        if match:
            raise _refusal(path, [match.group(1) or match.group(2)]) from exc
        if "Weights only load failed" in message:
            detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
            raise UnsafeFileError(
                f"Refused to load {path.name}: it uses pickle features that safe loading does not allow "
                f"({detail}). Re-save it with torch.save (or as .safetensors) where you trust it."
            ) from exc
        raise EmbeddingFormatError(f"{path.name} is damaged or not a torch file ({message[:200]}).") from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise EmbeddingFormatError(
            f"{path.name} is damaged, truncated or not a torch file ({str(exc)[:200]})."
        ) from exc


def _legacy_classes_allowed() -> contextlib.AbstractContextManager[None]:
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: such files are refused
        return contextlib.nullcontext()
    from torch.nn.modules.container import ParameterDict

    return torch.serialization.safe_globals([ParameterDict])


def save_torch_file(obj: Any, path: Path) -> None:
    """torch.save through a temp file so a crash never leaves half a file under `path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    logger.debug("wrote %s", path)
