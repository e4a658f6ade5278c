"""The last save of a run never loses the trained vectors: when the target cannot be written (read-only folder,
full disk, a folder in the way) they go to the run's log folder, else to the system's temp folder, and the note
says where."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import TrainingError, WriteError

logger = logging.getLogger(__name__)

# What a failed write raises: OSError (our atomic writes make it a WriteError); RuntimeError from writers in
# native code (torch, safetensors) that report a full disk that way.
WRITE_FAILURES = (OSError, RuntimeError)


def save_with_fallback(save: Callable[[Path], None], target: Path, log_dir: Path) -> tuple[Path, str | None]:
    """`save(target)`; if that fails, `save()` to the fallbacks in turn. Returns the path written and, when it is
    not `target`, a note for the user. TrainingError (from the target's error) when nothing could be written."""
    try:
        save(target)
        return target, None
    except WRITE_FAILURES as exc:
        failure = exc
        problem = str(exc) if isinstance(exc, WriteError) else f"Could not write {target}: {exc}."
        logger.error("The trained embedding could not be saved. %s", problem)
    for folder in fallback_folders(log_dir, target.stem):
        path = folder / target.name
        try:
            save(path)
        except WRITE_FAILURES as exc:
            logger.error("Nor to %s: %s", path, exc)
            if folder != log_dir:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # the empty temp folder made for it
            continue
        note = (f"{problem} The trained embedding was saved to {path} instead; move it to {target} once that is "
                "solved.")
        logger.warning(note)
        return path, note
    raise TrainingError(f"{problem} Nor could the trained embedding be saved in the run's log folder or the temp "
                        f"folder; the latest snapshot in {log_dir / 'embeddings'} is what is left.") from failure


def fallback_folders(log_dir: Path, stem: str) -> Iterator[Path]:
    """The run's log folder, then a fresh folder in the system's temp folder (made only when it comes to that)."""
    yield log_dir
    try:
        yield Path(tempfile.mkdtemp(prefix=f"tiext-{stem[:40]}-"))
    except OSError as exc:
        logger.error("No temp folder for a fallback save: %s", exc)
