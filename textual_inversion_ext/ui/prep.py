"""The Preprocess sub-tab, caption editor and dataset check as plain functions (no gradio).

`blocks.py` wires them; values in, messages and plain lists out, like `handlers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import dataset_ops
from ..core.data import captions
from ..core.data.preprocess import PreprocessParams
from .controls import ControlSpec, params_from_values
from .outcome import Outcome, run_guarded

logger = logging.getLogger(__name__)

PER_PAGE = 24


def preprocess_defaults(service: Any, specs: Sequence[ControlSpec]) -> list[Any]:
    """The form's initial values: the declared defaults, width/height = the loaded model's native size."""
    size = None
    try:
        size = service.native_size()
    except Exception:  # the tab must load even when the model cannot be asked
        logger.exception("Cannot read the model's native size")
    values = []
    for spec in specs:
        values.append(size if size and spec.name in ("width", "height") else spec.default)
    return values


def start_preprocess(service: Any, specs: Sequence[ControlSpec], values: Sequence[Any]) -> Outcome:
    def go() -> str:
        params = params_from_values(PreprocessParams, specs, values)
        job = service.start_preprocess(params)
        return f"Started preprocessing '{job.name}' (job {job.id}); progress below."

    message, error = run_guarded("Preprocess", go)
    return Outcome(error or message, error is None)


def preprocess_status(status: dict[str, Any]) -> str:
    """The Preprocess tab's status box: the latest preprocess job (a training job shows as busy)."""
    if status.get("id") is None:
        return "No preprocessing has run yet."
    if status.get("kind") != "preprocess":
        state = "running" if status.get("active") else status.get("status", "?")
        return f"Training '{status.get('name', '?')}': {state}." if status.get("active") else ""
    head = f"Preprocess '{status.get('name', '?')}': {status.get('status', '?')}"
    if status.get("total") is not None:
        head += f" · {status.get('done') or 0}/{status['total']} file(s)"
    lines = [head, status.get("message") or ""]
    problems = (status.get("result") or {}).get("problems") or []
    if problems:
        lines.append("Skipped or failed:")
        lines += [f"  {p}" for p in problems]
    return "\n".join(line for line in lines if line)


def check_dataset(service: Any, folder: str | None, subject: str | None, resolution: Any = 0) -> str:
    """The Train tab's 'Check dataset' report: summary line first, then one line per finding."""
    if not folder or not str(folder).strip():
        return "Enter the dataset folder to check."
    size = int(resolution or 0)
    record, error = run_guarded("Dataset check", service.check_dataset, str(folder).strip(), subject or "", size, size)
    return error or dataset_ops.report_text(record)


def check_summary(service: Any, folder: str, subject: str = "", resolution: int = 0) -> str | None:
    """The one-line summary shown when training starts; None when the check cannot run (the start says why)."""
    try:
        return service.check_dataset(folder, subject, resolution, resolution)["summary"]
    except Exception as exc:
        logger.debug("Pre-training check skipped: %s", exc)
        return None


# ------------------------------------------------------------------ caption editor


@dataclass
class CaptionView:
    gallery: list[tuple[str, str]]  # (thumbnail path, label): thumbnails only, never full-size images
    images: list[str]  # the page's image paths, in gallery order
    info: str
    page: int = 1
    pages: int = 1
    errors: list[str] = field(default_factory=list)


def caption_page(service: Any, folder: str | None, page: Any = 1, per_page: int = PER_PAGE) -> CaptionView:
    if not folder or not str(folder).strip():
        return CaptionView([], [], "Enter a folder of images (e.g. the preprocess destination).")
    try:
        number = max(1, int(page or 1))
    except (TypeError, ValueError):
        number = 1
    record, error = run_guarded("Caption list", service.caption_page, str(folder).strip(), number, per_page)
    if error:
        return CaptionView([], [], error)
    gallery, images, errors = [], [], []
    for item in record["items"]:
        if item["error"]:
            errors.append(f"{item['name']}: {item['error']}")
        if item["thumbnail"]:
            label = item["caption"] if item["has_caption"] else "(no caption)"
            gallery.append((item["thumbnail"], f"{item['name']}: {label}"))
            images.append(item["image"])
    info = f"Page {record['page']} of {record['pages']} · {record['total']} image(s)"
    if errors:
        info += "\n" + "\n".join(errors[:10])
    return CaptionView(gallery, images, info, record["page"], record["pages"], errors)


def caption_of(images: Sequence[str] | None, index: Any) -> tuple[str, str]:
    """The image path and caption for the gallery item clicked."""
    try:
        image = list(images or [])[int(index)]
    except (TypeError, ValueError, IndexError):
        return "", ""
    try:
        return image, captions.read_caption(image)
    except Exception as exc:
        return image, f"(caption unreadable: {exc})"


def current_caption(image: str | None) -> str | None:
    """The selected image's caption as it is on disk now (after a save, bulk edit or undo); None: none selected."""
    if not image:
        return None
    return caption_of([image], 0)[1]


def save_caption(service: Any, folder: str | None, image: str | None, text: str | None) -> str:
    if not image:
        return "Click an image first."
    root = str(folder).strip() if folder and str(folder).strip() else str(Path(image).parent)
    record, error = run_guarded("Save caption", lambda: service.caption_edit(root, "set", image=image, text=text or ""))
    return error or record["message"]


def bulk(service: Any, folder: str | None, op: str, **args: Any) -> str:
    """replace / strip_subject / prepend / append / undo over the whole folder (undoable)."""
    if not folder or not str(folder).strip():
        return "Enter the folder first."
    record, error = run_guarded(f"Caption {op}", lambda: service.caption_edit(str(folder).strip(), op, **args))
    return error or record["message"]


def tag_table(service: Any, folder: str | None) -> str:
    if not folder or not str(folder).strip():
        return "Enter the folder first."
    tags, error = run_guarded("Tag frequency", service.caption_tags, str(folder).strip())
    if error:
        return error
    return "\n".join(f"{n:5d}  {tag}" for tag, n in tags) or "No comma-separated tags in the captions."
