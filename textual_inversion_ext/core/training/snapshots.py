"""A run's snapshots: listing them across runs and promoting one to be the embedding users load."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import formats
from ..embedding import Embedding
from ..errors import UnsafeFileError
from ..fileio import atomic_write_text
from .grid import snapshot_files, snapshot_step
from .records import recorded_step, sidecar_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    run: str  # the run's log folder name (its start time)
    val_loss: float | None  # from the sidecar, when it was measured at that step
    best: bool  # the run's best step by validation loss

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "step": self.step, "run": self.run, "val_loss": self.val_loss,
                "best": self.best}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def list_snapshots(log_root: Path, name: str) -> list[Snapshot]:
    """Every snapshot of `name` under `<log_root>/<name>/<run>/embeddings/`, newest run first."""
    base = Path(log_root) / name
    runs = sorted((d for d in base.iterdir() if d.is_dir()), reverse=True) if base.is_dir() else []
    out = []
    for run in runs:
        record = _read_json(run / "run.json")
        validation = {int(s): v for s, v in record.get("validation") or []}
        for path in snapshot_files(run / "embeddings", name):
            step = snapshot_step(path) or 0
            saved = _read_json(sidecar_path(path)).get("saved", {})
            val = validation.get(step, saved.get("val_loss") if saved.get("step") == step else None)
            out.append(Snapshot(path, step, run.name, val, record.get("best_step") == step))
    return out


def _checked_training_state(emb: Embedding, snapshot: Path) -> formats.TrainingState | None:
    """The snapshot's `.optim` as the safe loader reads it, or None when missing, damaged, stale or hostile (then it
    is left out with a warning: a resume from the promoted file starts a fresh optimizer)."""
    try:
        return formats.load_training_state(emb, snapshot)
    except UnsafeFileError as exc:
        logger.warning("Not promoting the optimizer state of %s: %s", snapshot.name, exc)
        return None


def promote(snapshot: Path, target: Path) -> Path:
    """Write `snapshot`'s vectors to `target` (its format from the suffix) under the target's name, with
    its optimizer state and a sidecar saying where it came from. Atomic: `target` is replaced at once."""
    snapshot = Path(snapshot)
    emb = formats.load_embedding(snapshot).embedding
    emb.step = recorded_step(emb, snapshot)
    emb.name = Path(target).stem  # the trigger word is the file stem, not the snapshot's `<name>-<step>`
    formats.save_embedding(emb, target)
    state = _checked_training_state(emb, snapshot)
    if state is not None:  # re-written from what the safe loader read: nothing else of the file travels
        formats.save_optimizer_state(emb, target, state.optimizer, state.scaler)
    else:
        formats.optim_path(target).unlink(missing_ok=True)  # a stale state would not match these vectors
    record = _read_json(sidecar_path(snapshot))
    record["promoted_from"] = str(snapshot)
    atomic_write_text(sidecar_path(target), json.dumps(record, indent=2))
    logger.info("Promoted %s (step %d) to %s", snapshot.name, emb.step, target)
    return target


