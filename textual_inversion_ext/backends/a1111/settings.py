"""Settings: the host's own training options, reused, plus ours (namespaced `tiext_*`).

Each one fills in a TrainParams field a request leaves out (`train_defaults`), so it changes what a
host run does; the log folder is read when a run starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SECTION = ("textual_inversion_ext", "Textual Inversion (extension)")
CATEGORY = "training"


@dataclass(frozen=True)
class Setting:
    key: str  # option key in shared.opts
    field: str | None  # TrainParams field it sets; None: not a training parameter
    default: Any
    label: str
    ours: bool  # registered by us (False: the host's own option, reused)


SETTINGS = (
    # The host's training options (section "Training"), with the host's defaults.
    Setting("unload_models_when_training", "offload_vae", False, "", ours=False),
    Setting("training_write_csv_every", "csv_every", 500, "", ours=False),
    Setting("training_xattention_optimizations", "attention_optimizations", False, "", ours=False),
    Setting("save_optimizer_state", "save_optimizer_state", False, "", ours=False),
    Setting("pin_memory", "pin_memory", False, "", ours=False),
    # Ours.
    Setting("tiext_save_every", "save_every", 500,
            "Save a snapshot of the embedding every N steps (0 = off)", ours=True),
    Setting("tiext_preview_every", "preview_every", 500,
            "Save a preview image every N steps (0 = off)", ours=True),
    Setting("tiext_preview_steps", "preview_steps", 20, "Sampling steps of a preview", ours=True),
    Setting("tiext_log_dir", None, "",
            "Log folder for runs (snapshots, previews, loss CSV); empty = <data dir>/textual_inversion_ext; "
            "never inside the embeddings folder", ours=True),
    Setting("tiext_api_roots", None, "",
            "Extra folders the REST API may read and write (datasets, preprocess outputs), separated by ';'; "
            "the data, embeddings and log folders are always allowed", ours=True),
)

API_ROOTS_WHERE = ("Settings → Textual Inversion (extension) → \"Extra folders the REST API may read and write\" "
                   "(tiext_api_roots)")


def register_options() -> None:
    """on_ui_settings: add our options (the host's own are already registered)."""
    from modules import shared

    for s in SETTINGS:
        if s.ours:
            shared.opts.add_option(s.key, shared.OptionInfo(s.default, s.label, section=SECTION,
                                                            category_id=CATEGORY))


def _opt(key: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, key, default)  # AttributeError-safe before registration


def train_defaults() -> dict[str, Any]:
    """TrainParams fields from the current settings (a request's own values win)."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        if s.field is None:
            continue
        value = _opt(s.key, s.default)
        out[s.field] = type(s.default)(value) if value is not None else s.default
    return out


def log_root(embeddings_dir: Path) -> Path:
    """The run-log folder: the setting, else `<data dir>/textual_inversion_ext`; never in the embeddings."""
    from modules import paths

    configured = str(_opt("tiext_log_dir", "") or "").strip()
    default = Path(paths.data_path) / "textual_inversion_ext"
    root = Path(os.path.expanduser(configured)) if configured else default
    if not root.is_absolute():
        root = Path(paths.data_path) / root
    emb = embeddings_dir.resolve()
    resolved = root.resolve()
    if resolved == emb or emb in resolved.parents:
        # The host loads every file under the embeddings folder: snapshots there would become triggers.
        logger.warning("Log folder %s is inside the embeddings folder %s; using %s instead", root, emb, default)
        return default
    return root


def api_roots(data_path: Path) -> list[Path]:
    """The allow-list setting's folders (`;` or new lines between them; relative ones under the data folder)."""
    configured = str(_opt("tiext_api_roots", "") or "")
    entries = (e.strip() for e in configured.replace("\n", ";").split(";"))
    return [data_path / Path(os.path.expanduser(e)) for e in entries if e]
