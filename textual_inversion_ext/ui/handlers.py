"""The tabs' actions as plain functions: plain values in, plain values (mostly messages) out.

No gradio here, so they are tested without it; `blocks.py` only wires them to components. Errors a
user can act on (TIError, which includes the service's "already training" refusal) come back as
messages; anything else is logged with its traceback and shown as one line.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import create_hints, formats
from ..core.create import CreateParams
from ..core.create_hints import Hint
from ..core.errors import TIError
from ..core.templates import load_template
from ..core.train_params import TrainParams
from .controls import ControlSpec, params_from_values

logger = logging.getLogger(__name__)


def _whole(value: Any, default: int = 0) -> int:
    """A form number (gradio hands floats, or None for an empty box) as an int."""
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _guarded(what: str, fn: Any, *args: Any) -> list[Hint]:
    """Hints from `fn`; a failure (e.g. open_clip missing) becomes one note instead of breaking typing."""
    try:
        return list(fn(*args))
    except Exception as exc:
        logger.warning("Cannot compute the %s hints: %s", what, exc)
        return [Hint(create_hints.INFO, f"Cannot check the {what}: {exc}")]


def hints_html(hints: Iterable[Hint]) -> str:
    """Notes for a gr.HTML: one line per hint, warnings with the `tiext-warn` class."""
    parts = []
    for hint in hints:
        if hint.is_warning:
            parts.append(f"<div class='tiext-note tiext-warn'>⚠ {html.escape(hint.text)}</div>")
        else:
            parts.append(f"<div class='tiext-note'>{html.escape(hint.text)}</div>")
    return "".join(parts)


def init_text_info(text: str) -> str:
    """Live count under the init text: 'N tokens → suggested vectors N' (and how tokens map to vectors)."""
    return "; ".join(h.text for h in _guarded("init text", create_hints.init_text_hints, text or "", 0))


def name_info(name: str) -> str:
    """Live check of the name: valid as a file/trigger word, its own token count as plain text, word warning."""
    return "; ".join(h.text for h in _guarded("name", create_hints.name_hints, name or ""))


def existing_embeddings(service: Any) -> tuple[list[str], list[str] | None]:
    """(names, file names) of the existing embeddings; ([], None) when they cannot be listed."""
    try:
        entries = service.list_embeddings()
    except Exception:  # a broken folder must not break the tab
        logger.exception("Cannot list embeddings")
        return [], None
    return [e["name"] for e in entries], [e["file"] for e in entries]


def name_note(service: Any, name: str) -> list[Hint]:
    """The Create tab's name hints, with the existing embeddings (for the collision warning)."""
    if not name or not str(name).strip():
        return []
    names, files = existing_embeddings(service)
    return _guarded("name", create_hints.name_hints, str(name), names, files)


def init_note(name: str, init_text: str, num_vectors: Any = 0, init_mode: str = "pool",
              template: str | None = None) -> list[Hint]:
    """The Create tab's init-text hints, plus a warning when the training template (default: TrainParams'
    default) with this many vectors exceeds the 75-token prompt budget (0 vectors = one per token)."""
    text, vectors = init_text or "", max(0, _whole(num_vectors))
    out = _guarded("init text", create_hints.init_text_hints, text, vectors, init_mode or "pool")

    def budget() -> list[Hint]:
        lines = load_template(template or TrainParams().template)
        hints = create_hints.prompt_budget(lines, create_hints.vectors_for(text, vectors), (), name or "")
        return [h for h in hints if h.is_warning]

    return out + _guarded("prompt budget", budget)


def lr_note(learn_rate: str, batch_size: Any, grad_accum: Any, scale_lr: bool) -> list[Hint]:
    """The Train tab's effective learning rate (scaled by batch × accumulation when scaling is on)."""
    return [create_hints.effective_lr(str(learn_rate or ""), _whole(batch_size, 1), _whole(grad_accum, 1),
                                      bool(scale_lr))]


def embedding_names(service: Any) -> list[str]:
    try:
        return [e["name"] for e in service.list_embeddings()]
    except Exception:  # a broken folder must not break the tab
        logger.exception("Cannot list embeddings")
        return []


@dataclass
class Outcome:
    message: str
    ok: bool


def _run(action: str, fn: Any, *args: Any) -> tuple[Any, str | None]:
    """Call `fn`; a TIError becomes its message, anything else a logged one-liner."""
    try:
        return fn(*args), None
    except TIError as exc:
        return None, str(exc)
    except Exception as exc:
        logger.exception("%s failed", action)
        return None, f"{action} failed: {type(exc).__name__}: {exc} (details in the console log)."


def create(service: Any, specs: Sequence[ControlSpec], values: Sequence[Any]) -> tuple[Outcome, list[str]]:
    """Create an embedding from the Create tab's values; returns the outcome and the new name list."""
    def go() -> str:
        params = params_from_values(CreateParams, specs, values)
        return service.create(params).message

    message, error = _run("Create", go)
    return Outcome(error or message, error is None), embedding_names(service)


def start_training(service: Any, name: str | None, data_dir: str | None, specs: Sequence[ControlSpec],
                   values: Sequence[Any], subject: str = "") -> Outcome:
    """Start training; the dataset check's summary line comes first (`subject`: words captions should not name)."""
    if not name:
        return Outcome("Choose an embedding to train (create one in the Create embedding tab).", False)
    if not data_dir or not str(data_dir).strip():
        return Outcome("Enter the dataset folder: images, with optional <image>.txt captions.", False)

    def go() -> str:
        from .prep import check_summary

        params = params_from_values(TrainParams, specs, values)
        summary = check_summary(service, str(data_dir).strip(), subject or "", params.resolution)
        job = service.start_training(name, str(data_dir).strip(), params)
        started = f"Started training '{job.name}' (job {job.id}); progress below. Closing the page does not stop it."
        lines = [f"Dataset check: {summary}." if summary else None, budget_warning(service, name, data_dir, params)]
        return "\n".join([*(line for line in lines if line), started])

    message, error = _run("Train", go)
    return Outcome(error or message, error is None)


def budget_warning(service: Any, name: str, data_dir: Any, params: TrainParams) -> str | None:
    """The prompt-budget warning for this run (template + the dataset's captions + the embedding's vectors),
    or None when the prompts fit or it cannot be told (it never stops a start)."""
    try:
        embedding = formats.load_embedding(service.embedding_path(name)).embedding
        hints = create_hints.prompt_budget(load_template(params.template), embedding.num_vectors,
                                           create_hints.dataset_captions(str(data_dir).strip()), embedding.name)
    except Exception as exc:
        logger.debug("No prompt-budget check: %s", exc)
        return None
    return " ".join(h.text for h in hints if h.is_warning) or None


def interrupt(service: Any) -> Outcome:
    status, error = _run("Interrupt", service.interrupt)
    if error:
        return Outcome(error, False)
    return Outcome(status.get("message") or "Interrupt requested.", bool(status.get("active")))
