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
from ..errors import TIError
from ..fileio import atomic_write_text
from ..params import to_record, validate
from . import grid
from .previews import PreviewSettings, preview_prompts, save_png
from .train_params import TrainParams
from .trainer import ArtifactCallback, ProgressCallback, RunPaths, TrainResult, sidecar_path, train
from .validation import split_indices

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


def run_training(
    backend: Backend,
    request: RunRequest,
    *,
    progress: ProgressCallback | None = None,
    status: Callable[[str], None] = logger.info,
    stop: threading.Event | None = None,
    on_artifact: ArtifactCallback | None = None,
) -> RunOutcome:
    params = request.params
    validate(params)
    source = request.resume_from or request.embedding_path
    loaded = formats.load_embedding(source)
    embedding = loaded.embedding
    if request.resume_from is not None:
        # A snapshot is named `<name>-<step>`; the embedding keeps the name of the file it replaces.
        embedding.name = formats.load_embedding(request.embedding_path).embedding.name
    _check_dims(embedding.dims, backend.info.encoders, source)
    template_lines = load_template(params.template)
    resolution = params.resolution or backend.info.resolution
    scan = images.scan_dataset(request.data_dir, recursive=request.recursive)
    for skipped in scan.report:
        status(f"Skipped {skipped.path.name}: {skipped.reason}")
    status(f"Encoding {len(scan.items)} images at {resolution}px…")
    everything = prepare(
        backend, scan, resolution=resolution, use_buckets=params.buckets, with_flips=params.flip_p > 0,
        latent_sampling=params.latent_sampling, seed=params.seed,
        should_stop=(stop.is_set if stop else lambda: False),
    )
    train_idx, val_idx = split_indices(len(everything), params.val_split)
    data = everything.subset(train_idx)
    held_out = everything.subset(val_idx) if val_idx else None
    paths = RunPaths(final=request.output_path or request.embedding_path,
                     log_dir=new_log_dir(request.log_root, embedding.name))
    optimizer_state = formats.load_optimizer_state(embedding, source)
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
        "resumed_optimizer": optimizer_state is not None,
        "log_dir": str(paths.log_dir),
        "preview": _preview_record(params, embedding.name, data, template_lines),
    }
    record_path = paths.log_dir / "run.json"
    atomic_write_text(record_path, json.dumps(record, indent=2))

    def write_sidecar(path: Path, facts: dict[str, Any]) -> None:
        atomic_write_text(sidecar_path(path), json.dumps({**record, "saved": {"file": path.name, **facts}}, indent=2))

    started = time.perf_counter()

    def timing() -> None:
        elapsed = time.perf_counter() - started
        done = embedding.step - record["embedding"]["start_step"]
        record.update(seconds=round(elapsed, 2), final_step=embedding.step,
                      s_per_step=round(elapsed / done, 4) if done else None)

    try:
        result = train(backend, embedding, data, params, paths, template_lines=template_lines,
                       progress=progress, stop=stop, optimizer_state=optimizer_state, on_artifact=on_artifact,
                       on_saved=write_sidecar, validation_data=held_out)
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
            grid_path = render_run_grid(backend, paths.log_dir, status=status, stop=stop)
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
                    stop: threading.Event | None = None) -> Path:
    """The comparison grid of a finished run (from its `run.json`): snapshots × prompts, same seed.
    `prompts`: one per line, replacing the run's preview prompts."""
    record = json.loads((Path(log_dir) / "run.json").read_text("utf-8"))
    name = record["embedding"]["name"]
    preview = record["preview"]
    lines = [line.strip() for line in prompts.splitlines() if line.strip()] or preview["prompts"]
    settings = PreviewSettings(**preview["settings"])
    final = Path(record.get("final") or record["embedding"]["file"])
    columns = grid.columns_from(grid.snapshot_files(Path(log_dir) / "embeddings", name), final)
    status(f"Rendering the comparison grid ({len(columns)} × {len(lines)})…")
    image = grid.render_grid(backend, name, columns, lines, settings, stop=stop,
                             progress=lambda done, total: status(f"Comparison grid: {done}/{total} images"))
    return save_png(image, Path(log_dir) / f"{name}-comparison.png")


def _check_dims(have: dict[str, int], want: dict[str, int], path: Path) -> None:
    if have != want:
        raise TIError(f"{path.name} has vectors {have} but the model's text encoder expects {want}; "
                      "it was made for another model family (SD1 768, SD2 1024, SDXL clip_l+clip_g).")
