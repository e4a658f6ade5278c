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
from pathlib import Path
from typing import Any

from ..core import create_hints, formats
from ..core.create import CreateParams
from ..core.create_hints import Hint
from ..core.data.templates import load_template
from ..core.errors import TIError
from ..core.training.train_params import TrainParams
from .controls import ControlSpec, params_from_values, values_of_record
from .outcome import Outcome, run_guarded
from .prep import check_summary

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


@dataclass(frozen=True)
class LoadedModel:
    """The model behind `service.backend()` now, as the Create and Train tabs show it."""

    line: str  # "Loaded model: … — SDXL: each vector is …", or why no model can be used
    ok: bool = False
    encoders: dict[str, int] | None = None  # key -> width; None when unknown
    suffix: str | None = None  # the file type Create saves

    def html(self) -> str:
        warn = "" if self.ok else " tiext-warn"
        return f"<div class='tiext-note tiext-model{warn}'>{html.escape(self.line)}</div>"


def loaded_model(service: Any) -> LoadedModel:
    """Asked anew on each call: the host may switch checkpoints (SD1 <-> SDXL) between any two events. No usable
    model: its error as the line (the hints then count as for one encoder), never a traceback."""
    try:
        model = service.model_summary()
        line = create_hints.model_line(model["family"], model["name"], model["encoders"], model["suffix"])
    except TIError as exc:
        return LoadedModel(str(exc))
    except Exception as exc:
        logger.warning("Cannot read the loaded model: %s", exc, exc_info=True)
        return LoadedModel(f"Cannot read the loaded model: {exc}")
    return LoadedModel(line, True, dict(model["encoders"]), model["suffix"])


def init_text_info(text: str, encoders: dict[str, int] | None = None) -> str:
    """Live count under the init text: 'N tokens → suggested vectors N' (and how tokens map to vectors); with
    several `encoders` (the loaded model's, see `loaded_model`) the count per encoder."""
    return "; ".join(h.text for h in _guarded("init text", create_hints.init_text_hints, text or "", 0, "pool",
                                              encoders))


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


def name_note(service: Any, name: str, model: LoadedModel | None = None) -> list[Hint]:
    """The Create tab's name hints, with the existing embeddings (for the collision warning, which names the file
    of the loaded model's type; `model`: as `loaded_model` gives it, None = ask the service)."""
    if not name or not str(name).strip():
        return []
    names, files = existing_embeddings(service)
    suffix = (model or loaded_model(service)).suffix
    return _guarded("name", create_hints.name_hints, str(name), names, files, suffix)


def init_note(name: str, init_text: str, num_vectors: Any = 0, init_mode: str = "pool",
              template: str | None = None, encoders: dict[str, int] | None = None) -> list[Hint]:
    """The Create tab's init-text hints (counted per encoder of `encoders`, the loaded model's), plus a warning
    when the training template (default: TrainParams' default) with this many vectors exceeds the 75-token
    prompt budget (0 vectors = one per token)."""
    text, vectors = init_text or "", max(0, _whole(num_vectors))
    out = _guarded("init text", create_hints.init_text_hints, text, vectors, init_mode or "pool", encoders)

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


def create(service: Any, specs: Sequence[ControlSpec], values: Sequence[Any]) -> tuple[Outcome, list[str]]:
    """Create an embedding from the Create tab's values; returns the outcome and the new name list."""
    def go() -> str:
        params = params_from_values(CreateParams, specs, values)
        return service.create(params).message

    message, error = run_guarded("Create", go)
    return Outcome(error or message, error is None), embedding_names(service)


def start_training(service: Any, name: str | None, data_dir: str | None, specs: Sequence[ControlSpec],
                   values: Sequence[Any], subject: str = "", resume_from: str | None = None) -> Outcome:
    """Start training; the dataset check's summary line comes first (`subject`: words captions should not name;
    `resume_from`: a snapshot path to continue from)."""
    if not name:
        return Outcome("Choose an embedding to train (create one in the Create embedding tab).", False)
    if not data_dir or not str(data_dir).strip():
        return Outcome("Enter the dataset folder: images, with optional <image>.txt captions.", False)

    def go() -> str:
        params = params_from_values(TrainParams, specs, values)
        summary = check_summary(service, str(data_dir).strip(), subject or "", params.resolution)
        resume = {"resume_from": resume_from} if resume_from else {}
        job = service.start_training(name, str(data_dir).strip(), params, **resume)
        started = f"Started training '{job.name}' (job {job.id}); progress below. Closing the page does not stop it."
        if resume_from:
            started = f"Resuming from {Path(resume_from).name}. {started}"
        lines = [f"Dataset check: {summary}." if summary else None, budget_warning(service, name, data_dir, params)]
        return "\n".join([*(line for line in lines if line), started])

    message, error = run_guarded("Train", go)
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
    status, error = run_guarded("Interrupt", service.interrupt)
    if error:
        return Outcome(error, False)
    return Outcome(status.get("message") or "Interrupt requested.", bool(status.get("active")))


# ------------------------------------------------------------ after a run: snapshots, promote, resume, grid


def snapshot_path(service: Any, name: str | None, label: str | None) -> str | None:
    """The path of `name`'s snapshot shown as `label` in the dropdown (see status.snapshot_label), or None."""
    from .status import snapshot_label

    if not name or not label:
        return None
    return next((s["path"] for s in service.snapshots(name) if snapshot_label(s) == label), None)


def promote(service: Any, name: str | None, snapshot: str | None) -> Outcome:
    """Make `snapshot` (a path) the embedding `name`: the service's message, or why not."""
    if not name:
        return Outcome("Choose the embedding whose snapshot to promote.", False)
    if not snapshot:
        return Outcome("Choose a snapshot to promote.", False)
    done, error = run_guarded("Promote", service.promote, name, snapshot)
    return Outcome(error or done["message"], error is None)


def promote_best(service: Any, result: dict[str, Any] | None, name: str | None) -> Outcome:
    """Promote the last run's best snapshot (`result` as the finished job reports it)."""
    result = result or {}
    best = result.get("best_snapshot")
    if not best:
        if not result:
            return Outcome("No finished training yet: the best step is known once a run ends.", False)
        return Outcome("The last run kept no best snapshot (it needs 'Validate every' > 0 and 'Keep best "
                       "snapshot' on).", False)
    return promote(service, name or Path(str(result.get("embedding") or "")).stem or None, best)


def promote_selected(service: Any, name: str | None, label: str | None) -> Outcome:
    if not name:
        return Outcome("Choose the embedding whose snapshot to promote.", False)
    path, error = run_guarded("Promote", snapshot_path, service, name, label)
    if error or path is None:
        return Outcome(error or ("Choose a snapshot to promote." if not label else
                                 f"No snapshot {label!r} of '{name}' any more; refresh the list."), False)
    return promote(service, name, path)


def resume_selected(service: Any, name: str | None, data_dir: str | None, specs: Sequence[ControlSpec],
                    values: Sequence[Any], subject: str, label: str | None) -> Outcome:
    """Start training from the chosen snapshot (its step and optimizer state) with the current Train fields."""
    if not name:
        return Outcome("Choose an embedding to train (create one in the Create embedding tab).", False)
    path, error = run_guarded("Resume", snapshot_path, service, name, label)
    if error or path is None:
        return Outcome(error or "Choose a snapshot to resume from (the list shows the embedding's snapshots).",
                       False)
    return start_training(service, name, data_dir, specs, values, subject=subject, resume_from=path)


def render_grid(service: Any, name: str | None) -> Outcome:
    if not name:
        return Outcome("Choose the embedding whose last run to render.", False)
    job, error = run_guarded("Grid", service.start_grid, name)
    if error:
        return Outcome(error, False)
    return Outcome(f"Rendering the comparison grid of '{name}' (job {job.id}); it appears here when done. "
                   f"{job.message}".strip(), True)  # the message: its estimated cost, and how to skip it


# ------------------------------------------------------------ presets


def preset_names(service: Any) -> list[str]:
    try:
        return list(service.presets())
    except Exception:
        logger.exception("Cannot list presets")
        return []


def save_preset(service: Any, preset: str | None, specs: Sequence[ControlSpec], values: Sequence[Any],
                data_dir: str | None = "", subject: str | None = "") -> Outcome:
    """Save every Train field (+ dataset folder and subject words) under `preset`."""
    if not preset or not str(preset).strip():
        return Outcome("Enter a preset name.", False)

    def go() -> str:
        params = params_from_values(TrainParams, specs, values)
        extra = {"data_dir": str(data_dir or "").strip(), "subject": str(subject or "")}
        return service.save_preset(str(preset).strip(), params, extra)["message"]

    message, error = run_guarded("Save preset", go)
    return Outcome(error or message, error is None)


@dataclass
class LoadedPreset:
    outcome: Outcome
    values: list[Any] | None = None  # the Train controls' values (specs order); None on failure
    data_dir: str | None = None
    subject: str | None = None


def load_preset(service: Any, preset: str | None, specs: Sequence[ControlSpec]) -> LoadedPreset:
    """A saved preset as control values (validated), with its dataset folder and subject words."""
    if not preset or not str(preset).strip():
        return LoadedPreset(Outcome("Choose a preset to load.", False))

    def go() -> LoadedPreset:
        loaded = service.load_preset(str(preset).strip())
        extra = loaded.get("extra") or {}
        values = values_of_record(TrainParams, specs, loaded["params"])
        return LoadedPreset(Outcome(f"Loaded preset '{str(preset).strip()}'.", True), values,
                            extra.get("data_dir"), extra.get("subject"))

    loaded, error = run_guarded("Load preset", go)
    return LoadedPreset(Outcome(error, False)) if error else loaded


def sampler_choices(service: Any, host: bool) -> list[str]:
    """The preview sampler names: the host's txt2img samplers, or the standalone backend's (without loading a
    model: standalone, `service.backend()` may load one). [] when they cannot be told (the box takes any name)."""
    try:
        if host:
            return list(service.backend().samplers())
        from ..backends.standalone.backend import SAMPLERS

        return list(SAMPLERS)
    except Exception as exc:
        logger.info("No sampler list for the preview sampler box: %s", exc)
        return []
