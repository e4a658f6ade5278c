"""Loading torch pickles (.pt/.bin/.optim) without ever running code from the file.

Two gates: first our own scan of the pickle opcodes refuses any import outside plain tensors (so the
message names the refused global on every torch version), then `torch.load(weights_only=True)`, torch's
restricted unpickler, does the actual loading. A file is never unpickled with the full pickle machinery.
"""

from __future__ import annotations

import io
import logging
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import EmbeddingFormatError, UnsafeFileError
from ..fileio import atomic_path

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save writes this class for embeddings made with torch 1.11 (the original TI repo); it only
# holds tensors, so it may be reconstructed.
_PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"
_ALLOWED_EXACT = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.Size",
    "torch.device",
    "_codecs.encode",  # how protocol-2 pickles spell a bytes object
    "builtins.set",
    "__builtin__.set",
    "builtins.frozenset",
    "__builtin__.frozenset",
    _PARAMETER_DICT,
}
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", *_PUT_OPS}


def _is_allowed(name: str) -> bool:
    if name in _ALLOWED_EXACT:
        return True
    module, _, attr = name.rpartition(".")
    if module in {"torch", "torch.storage"} and attr.endswith("Storage"):
        return True
    # dtypes, e.g. "torch.float16" in _rebuild_tensor_v3 pickles
    return module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)


def pickle_globals(blob: bytes, max_pickles: int = 5) -> list[str]:
    """Every global a pickle stream would import ("module.name"), "<unknown>" where it cannot tell.

    Scans consecutive pickles because torch's legacy (non-zip) format is a sequence of five of them
    (followed by raw tensor bytes, which must not be parsed as opcodes).
    Raises EmbeddingFormatError if the bytes are not a pickle at all.
    """
    found: list[str] = []
    stream = io.BytesIO(blob)
    for index in range(max_pickles):
        if stream.tell() >= len(blob):
            break
        recent: list[str | None] = []  # values pushed lately: STACK_GLOBAL takes the last two
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in {"GLOBAL", "INST"}:
                    found.append(str(arg).replace(" ", ".", 1))
                elif name == "STACK_GLOBAL":
                    module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                    found.append(f"{module}.{attr}" if module and attr else "<unknown>")
                elif name in {"EXT1", "EXT2", "EXT4"}:
                    found.append("<copyreg extension>")
                if name in _STRING_OPS:
                    recent.append(str(arg))
                elif name in _GET_OPS:
                    recent.append(memo.get(int(arg)))
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in _PUT_OPS:
                    memo[int(arg)] = recent[-1] if recent else None
                elif name not in _NO_PUSH_OPS:
                    recent.append(None)
                if name == "STOP":
                    break
        except Exception as exc:  # truncated or not a pickle
            if index == 0:
                raise EmbeddingFormatError(f"not a readable pickle ({exc})") from exc
            break  # legacy files continue with raw tensor bytes after the pickles
    return found


def _main_pickle(path: Path, head: bytes) -> bytes:
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    raise EmbeddingFormatError(f"{path.name} is a zip file without data.pkl: not a torch file.")
                return archive.read(min(names, key=len))
        except zipfile.BadZipFile as exc:
            raise EmbeddingFormatError(
                f"{path.name} is a damaged or truncated torch file ({exc}); copy it again or use a backup."
            ) from exc
    return path.read_bytes()


def _refusal(path: Path, names: list[str]) -> UnsafeFileError:
    listed = ", ".join(sorted(set(names)))
    return UnsafeFileError(
        f"Refused to load {path.name}: unpickling it would import {listed}, which is not part of plain "
        "tensor data and could run arbitrary code on this machine. It was not loaded; only use "
        "embedding files from sources you trust."
    )


def load_torch_file(path: Path) -> Any:
    """`torch.load` a .pt/.bin/.optim file safely onto the CPU.

    Raises UnsafeFileError for files that would run code, EmbeddingFormatError for damaged ones.
    """
    with path.open("rb") as fh:
        head = fh.read(8)
    if not head:
        raise EmbeddingFormatError(f"{path.name} is empty (0 bytes).")
    blob = _main_pickle(path, head)
    try:
        names = pickle_globals(blob)
    except EmbeddingFormatError as exc:
        raise EmbeddingFormatError(f"{path.name} is damaged or not a torch file: {exc}") from exc
    refused = [n for n in names if not _is_allowed(n)]
    if refused:
        raise _refusal(path, refused)

    legacy_classes: list[type] = []
    if _PARAMETER_DICT in names and hasattr(torch.serialization, "safe_globals"):
        from torch.nn.modules.container import ParameterDict

        legacy_classes.append(ParameterDict)
    try:
        if legacy_classes:
            with torch.serialization.safe_globals(legacy_classes):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        match = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", message)
        if match:
            raise _refusal(path, [match.group(1) or match.group(2)]) from exc
        if "Weights only load failed" in message and "WeightsUnpickler error" in message:
            detail = message.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
            raise UnsafeFileError(
                f"Refused to load {path.name}: it uses pickle features that safe loading does not allow "
                f"({detail}). Re-save it with torch.save (or as .safetensors) where you trust it."
            ) from exc
        raise EmbeddingFormatError(f"{path.name} is damaged or not a torch file ({message[:200]}).") from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise EmbeddingFormatError(
            f"{path.name} is damaged, truncated or not a torch file ({str(exc)[:200]})."
        ) from exc


def save_torch_file(obj: Any, path: Path) -> None:
    """torch.save through a temp file so a crash never leaves half a file under `path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    logger.debug("wrote %s", path)
