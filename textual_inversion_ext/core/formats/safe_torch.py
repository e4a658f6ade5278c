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
from ..fileio import atomic_path, write_error
from .pickle_scan import opcode_name, refused_globals

logger = logging.getLogger(__name__)

# Fallback when scanning finds nothing: the global named in torch's own refusal message.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)")
_UNSUPPORTED_OPCODE = re.compile(r"Unsupported operand (\d+)")


def _refusal(path: Path, names: list[str]) -> UnsafeFileError:
    listed = ", ".join(names)
    return UnsafeFileError(
        f"Refused to load {path.name}: unpickling it would import {listed}, which is not part of plain "
        "tensor data and could run arbitrary code on this machine. It was not loaded; only use "
        "embedding files from sources you trust."
    )


def _refused(path: Path, message: str) -> EmbeddingFormatError:
    """Name what a refused file tried to reach: its disallowed globals, else torch's reason in words
    (a byte that is no pickle opcode at all means damage, not danger)."""
    names = refused_globals(path)  # torch stops at the first opcode it rejects, often before the global
    match = _REFUSED_GLOBAL.search(message)
    if not names and match:
        names = [match.group(1) or match.group(2)]
    if names:
        return _refusal(path, names)
    opcode = _UNSUPPORTED_OPCODE.search(message)
    if opcode:
        name = opcode_name(int(opcode.group(1)))
        if name is None:
            return EmbeddingFormatError(f"{path.name} is damaged or not a torch file (byte {opcode.group(1)} "
                                        "where a pickle opcode should be).")
        detail = f"the pickle opcode {name}, which torch's safe loader does not read"
    else:
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0][:200]
    return UnsafeFileError(
        f"Refused to load {path.name}: it uses pickle features that safe loading does not allow "
        f"({detail}). Re-save it with torch.save (or as .safetensors) where you trust it."
    )


def load_torch_file(path: Path) -> Any:
    """`torch.load` a .pt/.bin/.optim file onto the CPU with torch's restricted unpickler.

    Raises UnsafeFileError for files that would import anything beyond tensor data (the message names
    it), EmbeddingFormatError for every other failure (empty, truncated, damaged, absurd sizes).
    """
    if path.stat().st_size == 0:
        raise EmbeddingFormatError(f"{path.name} is empty (0 bytes).")
    try:
        with _legacy_classes_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" in message or _REFUSED_GLOBAL.search(message):
            raise _refused(path, message) from exc
        raise EmbeddingFormatError(f"{path.name} is damaged or not a torch file ({message[:200]}).") from exc
    except MemoryError as exc:  # a damaged size field asking for more than the machine has
        raise EmbeddingFormatError(
            f"{path.name} is damaged: it declares more data than fits in memory, far more than an embedding holds."
        ) from exc
    except Exception as exc:  # struct.error, AssertionError, RuntimeError, ...: torch's reader on bad bytes
        detail = str(exc).strip()[:200] or type(exc).__name__
        raise EmbeddingFormatError(f"{path.name} is damaged, truncated or not a torch file ({detail}).") from exc


def _legacy_classes_allowed() -> contextlib.AbstractContextManager[None]:
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: such files are refused
        return contextlib.nullcontext()
    from torch.nn.modules.container import ParameterDict

    return torch.serialization.safe_globals([ParameterDict])


def save_torch_file(obj: Any, path: Path) -> None:
    """torch.save through a temp file so a crash never leaves half a file under `path`."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # how torch reports a failed write (e.g. a full disk): say which file
            raise write_error(path, exc) from exc
    logger.debug("wrote %s", path)
