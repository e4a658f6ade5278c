"""Train presets: every Train field saved as JSON under a name, and loaded back (validated)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from ... import __version__
from ..errors import TIError
from ..fileio import atomic_write_text
from ..params import from_record, to_record
from .train_params import TrainParams

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[\w][\w .()+-]{0,99}$")


def _file(folder: Path, name: str) -> Path:
    name = (name or "").strip()
    if not _NAME.match(name):
        raise TIError(f"Preset name {name!r}: use letters, digits, spaces and . _ - + ( ), up to 100 characters.")
    return Path(folder) / f"{name}.json"


def save_preset(folder: Path, name: str, params: TrainParams, extra: dict[str, Any] | None = None) -> Path:
    """Write `<folder>/<name>.json` atomically (overwrites a preset of that name). `extra`: fields outside
    TrainParams that the Train tab also keeps (e.g. the dataset folder)."""
    path = _file(folder, name)
    data = {"tool": "textual_inversion_ext", "version": __version__, "kind": "train",
            "params": to_record(params), "extra": dict(extra or {})}
    atomic_write_text(path, json.dumps(data, indent=2))
    logger.info("Saved preset %s", path)
    return path


def load_preset(folder: Path, name: str) -> tuple[TrainParams, dict[str, Any]]:
    """(params, extra) of a saved preset; unknown or invalid fields are an error naming them."""
    path = _file(folder, name)
    if not path.is_file():
        raise TIError(f"No preset named {name!r} in {folder}.")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise TIError(f"Cannot read preset {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise TIError(f"{path} is not a Train preset (no 'params' object).")
    try:
        params = from_record(TrainParams, {**to_record(TrainParams()), **data["params"]})
    except (TIError, TypeError) as exc:
        raise TIError(f"Preset {name!r}: {exc}") from exc
    return params, dict(data.get("extra") or {})


def list_presets(folder: Path) -> list[str]:
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
