"""One training run end to end: load, check the dataset, encode, train, record. Shared by the CLI,
the UI and the host glue, so they all behave the same."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ... import __version__
from .. import formats
from ..backend import Backend
from ..data import images
from ..data.dataset import TrainingSet, prepare
from ..data.templates import load_template
from ..embedding import check_vectors, validate_name
from ..errors import InvalidNameError, ModelError, TIError
from ..fileio import atomic_write_text
from ..params import to_record, validate
from . import grid
from .precision import resolve_precision
from .previews import PreviewSettings, preview_prompts, save_png
from .records import recorded_step
from .schedule import LRSchedule
from .train_params import TrainParams
from .trainer import ArtifactCallback, ProgressCallback, RunPaths, TrainResult, sidecar_path, train
from .validation import plan_for, split_indices

logger = logging.getLogger(__name__)


@dataclass
class RunRequest:
    embedding_path: Path
    data_dir: Path
    log_root: Path
    params: TrainParams
    output_path: Path | None = None  # default: train the embedding file in place
    recursive: bool = False
    # Start from this snapshot (its vectors, step and optimizer state) instead of the embedding file; the
    # result is still written to `output_path` or the embedding file.
    resume_from: Path | None = None


@dataclass
class RunOutcome:
    result: TrainResult
    paths: RunPaths
    data: TrainingSet
    record_path: Path
    validation_data: TrainingSet | None = None  # the held-out images, when a split was asked for
    grid: Path | None = None  # the comparison grid image


def new_log_dir(log_root: Path, name: str) -> Path:
    """A fresh per-run folder `<root>/<name>/<timestamp>` (never the embeddings folder)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = log_root / name / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = log_root / name / f"{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path


def name_from_file(name: str, path: Path) -> str:
    """A name read from `path` (a PNG card's stored name, a run record's), checked like a name typed by the user."""
    try:
        return validate_name(name)
    except InvalidNameError as exc:
        raise InvalidNameError(f"{path.name} holds a name this tool cannot use: {exc}") from None


def run_training(
    backend: Backend,
    request: RunRequest,
    *,
    progress: ProgressCallback | None = None,
    status: Callable[[str], None] = logger.info,
    stop: threading.Event | None = None,
    on_artifact: ArtifactCallback | None = None,
    on_grid: Callable[[grid.GridCost], None] | None = None,
) -> RunOutcome:
    """`on_grid`: called with the comparison grid's estimated cost just before it starts (after training)."""
    params = request.params
    validate(params)
    precision = resolve_precision(params, backend)  # before any work: a refused choice costs nothing
    source = request.resume_from or request.embedding_path
    loaded = formats.load_embedding(source)
    embedding = loaded.embedding
    embedding.step = recorded_step(embedding, source)  # an SDXL .pt stores no step: its run record has it
    if request.resume_from is not None:
        # A snapshot is named `<name>-<step>`; the embedding keeps the name of the file it replaces.
        embedding.name = formats.load_embedding(request.embedding_path).embedding.name
    # The name becomes the log folder and file names: a stored name ('../x', '/abs') is checked like a typed one.
    embedding.name = name_from_file(embedding.name, request.embedding_path)
    try:
        check_vectors(embedding.vectors, backend.info.encoders)
    except ModelError as exc:
        raise ModelError(f"{source.name}: {exc}") from exc
    template_lines = load_template(params.template)
    resolution = params.resolution or backend.info.resolution
    scan = images.scan_dataset(request.data_dir, recursive=request.recursive)
    for skipped in scan.report:
        status(f"Skipped {skipped.path.name}: {skipped.reason}")
    status(f"Encoding {len(scan.items)} images at {resolution}px…")
    everything = prepare(
        backend, scan, resolution=resolution, use_buckets=params.buckets, with_flips=params.flip_p > 0,
        latent_sampling=params.latent_sampling, seed=params.seed, alpha_weight=params.alpha_weight,
        should_stop=(stop.is_set if stop else lambda: False),
    )
    train_idx, val_idx = split_indices(len(everything), params.val_split)
    data = everything.subset(train_idx)
    held_out = everything.subset(val_idx) if val_idx else None
    paths = RunPaths(final=request.output_path or request.embedding_path,
                     log_dir=new_log_dir(request.log_root, embedding.name))
    saved_state = formats.load_training_state(embedding, source)
    optimizer_state = saved_state.optimizer if saved_state else None
    record: dict[str, Any] = {
        "tool": "textual_inversion_ext",
        "version": __version__,
        "started": datetime.now().isoformat(timespec="seconds"),
        "embedding": {"name": embedding.name, "file": str(request.embedding_path),
                      "vectors": embedding.num_vectors, "dims": embedding.dims, "start_step": embedding.step,
                      "resumed_from": str(request.resume_from) if request.resume_from else None},
        "model": {"name": backend.info.name, "hash": backend.info.short_hash, "family": backend.info.family},
        "dataset": {"folder": str(request.data_dir), "images": len(data),
                    "validation_images": [p.name for p in held_out.paths] if held_out else [],
                    "captioned": sum(1 for c in data.captions if c.strip()),
                    "sizes": sorted({f"{w}x{h}" for w, h in data.buckets}),
                    "skipped": [{"file": s.path.name, "reason": s.reason} for s in data.skipped]},
        "resolution": resolution,
        "params": to_record(params),
        "precision": precision.record(),
        "resumed_optimizer": optimizer_state is not None,
        "log_dir": str(paths.log_dir),
        "preview": _preview_record(params, embedding.name, data, template_lines),
    }
    record_path = paths.log_dir / "run.json"
    atomic_write_text(record_path, json.dumps(record, indent=2))

    def write_sidecar(path: Path, facts: dict[str, Any]) -> None:
        try:
            atomic_write_text(sidecar_path(path), json.dumps({**record, "saved": {"file": path.name, **facts}},
                                                             indent=2))
        except OSError as exc:  # the embedding itself was written: a missing record is a note, not a failed save
            logger.warning("No run record beside %s: %s", path.name, exc)

    # Told before the run: how much validation the budget allows (core/training/validation.py).
    end_step = LRSchedule(params.learn_rate, params.max_steps, embedding.step).end_step
    val_plan = plan_for(params, embedding.step, end_step, len(held_out or data))
    record["validation_plan"] = dataclasses.asdict(val_plan)
    status(val_plan.note)
    started = time.perf_counter()

    def timing() -> None:
        elapsed = time.perf_counter() - started
        done = embedding.step - record["embedding"]["start_step"]
        record.update(seconds=round(elapsed, 2), final_step=embedding.step,
                      s_per_step=round(elapsed / done, 4) if done else None)

    try:
        result = train(backend, embedding, data, params, paths, template_lines=template_lines,
                       progress=progress, stop=stop, optimizer_state=optimizer_state, on_artifact=on_artifact,
                       on_saved=write_sidecar, validation_data=held_out,
                       scaler_state=saved_state.scaler if saved_state else None, precision=precision)
    except BaseException:
        timing()  # the record still says how far the run got
        atomic_write_text(record_path, json.dumps(record, indent=2))
        raise
    timing()
    record.update(status=result.status, message=result.message, final=str(result.final_path),
                  best_step=result.best_step, best_val_loss=result.best_loss,
                  best_snapshot=str(result.best_path) if result.best_path else None,
                  early_stopped=result.early_stopped, warnings=result.warnings, validation=result.validation)
    atomic_write_text(record_path, json.dumps(record, indent=2))
    grid_path = None
    if params.comparison_grid and result.status == "finished" and not (stop and stop.is_set()):
        try:
            grid_path = render_run_grid(backend, paths.log_dir, status=status, stop=stop, on_start=on_grid)
        except TIError as exc:  # no grid is a note, never a lost run
            status(f"No comparison grid: {exc}")
            logger.warning("No comparison grid: %s", exc)
        record["grid"] = str(grid_path) if grid_path else None
        atomic_write_text(record_path, json.dumps(record, indent=2))
    return RunOutcome(result, paths, data, record_path, held_out, grid_path)


def _preview_record(params: TrainParams, name: str, data: TrainingSet, template_lines: list[str]) -> dict[str, Any]:
    """The preview prompts and settings, recorded so a grid can be rendered later exactly like the previews."""
    settings = PreviewSettings.from_params(params, data.buckets[0])
    return {"prompts": preview_prompts(params, template_lines, name, data.captions[0]),
            "settings": dataclasses.asdict(settings)}


def render_run_grid(backend: Backend, log_dir: Path, prompts: str = "", *, status: Callable[[str], None] = logger.info,
                    stop: threading.Event | None = None,
                    on_start: Callable[[grid.GridCost], None] | None = None) -> Path:
    """The comparison grid of a finished run (from its `run.json`): snapshots × prompts, same seed.
    `prompts`: one per line, replacing the run's preview prompts. Its estimated cost goes to `status` (and
    `on_start`) before the first image; `stop` ends it between sampling steps."""
    name, columns, lines, settings, cost = _grid_inputs(log_dir, prompts)
    status(cost.text())
    if on_start is not None:
        on_start(cost)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        left = (time.perf_counter() - started) / done * (total - done)  # measured now, not estimated
        status(f"Comparison grid: {done}/{total} images" + (f", about {grid.duration(left)} left" if left else "")
               + (" (Interrupt skips the rest)" if done < total else ""))

    image = grid.render_grid(backend, name, columns, lines, settings, stop=stop, progress=progress)
    return save_png(image, Path(log_dir) / f"{name}-comparison.png")


def grid_cost(log_dir: Path, prompts: str = "") -> grid.GridCost:
    """What `render_run_grid` would take (told before starting it on demand)."""
    return _grid_inputs(log_dir, prompts)[-1]


def _grid_inputs(log_dir: Path, prompts: str) -> tuple[str, list, list[str], PreviewSettings, grid.GridCost]:
    """(name, columns, prompts, settings, estimated cost) of a run's grid, from its `run.json`."""
    record = json.loads((Path(log_dir) / "run.json").read_text("utf-8"))
    name = name_from_file(record["embedding"]["name"], Path(log_dir) / "run.json")
    preview = record["preview"]
    lines = [line.strip() for line in prompts.splitlines() if line.strip()] or preview["prompts"]
    settings = PreviewSettings(**preview["settings"])
    final = Path(record.get("final") or record["embedding"]["file"])
    columns = grid.columns_from(grid.snapshot_files(Path(log_dir) / "embeddings", name), final)
    return name, columns, lines, settings, grid.estimate_cost(len(columns) * len(lines), settings, record)
