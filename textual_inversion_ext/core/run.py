"""One training run end to end: load, check the dataset, encode, train, record. Shared by the CLI,
the UI and the host glue, so they all behave the same."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..backends.protocol import Backend
from . import formats, images
from .dataset import TrainingSet, prepare
from .errors import TIError
from .fileio import atomic_write_text
from .params import to_record, validate
from .templates import load_template
from .train_params import TrainParams
from .trainer import ArtifactCallback, ProgressCallback, RunPaths, TrainResult, train

logger = logging.getLogger(__name__)


@dataclass
class RunRequest:
    embedding_path: Path
    data_dir: Path
    log_root: Path
    params: TrainParams
    output_path: Path | None = None  # default: train the embedding file in place
    recursive: bool = False


@dataclass
class RunOutcome:
    result: TrainResult
    paths: RunPaths
    data: TrainingSet
    record_path: Path


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
    loaded = formats.load_embedding(request.embedding_path)
    embedding = loaded.embedding
    _check_dims(embedding.dims, backend.info.encoders, request.embedding_path)
    template_lines = load_template(params.template)
    resolution = params.resolution or backend.info.resolution
    scan = images.scan_dataset(request.data_dir, recursive=request.recursive)
    for skipped in scan.report:
        status(f"Skipped {skipped.path.name}: {skipped.reason}")
    status(f"Encoding {len(scan.items)} images at {resolution}px…")
    data = prepare(
        backend, scan, resolution=resolution, use_buckets=params.buckets, with_flips=params.flip_p > 0,
        latent_sampling=params.latent_sampling, seed=params.seed,
        should_stop=(stop.is_set if stop else lambda: False),
    )
    paths = RunPaths(final=request.output_path or request.embedding_path,
                     log_dir=new_log_dir(request.log_root, embedding.name))
    optimizer_state = formats.load_optimizer_state(embedding, request.embedding_path)
    record: dict[str, Any] = {
        "tool": "textual_inversion_ext",
        "version": __version__,
        "started": datetime.now().isoformat(timespec="seconds"),
        "embedding": {"name": embedding.name, "file": str(request.embedding_path),
                      "vectors": embedding.num_vectors, "dims": embedding.dims, "start_step": embedding.step},
        "model": {"name": backend.info.name, "hash": backend.info.short_hash, "family": backend.info.family},
        "dataset": {"folder": str(request.data_dir), "images": len(data),
                    "skipped": [{"file": s.path.name, "reason": s.reason} for s in data.skipped]},
        "resolution": resolution,
        "params": to_record(params),
        "resumed_optimizer": optimizer_state is not None,
    }
    record_path = paths.log_dir / "run.json"
    atomic_write_text(record_path, json.dumps(record, indent=2))
    started = time.perf_counter()
    try:
        result = train(backend, embedding, data, params, paths, template_lines=template_lines,
                       progress=progress, stop=stop, optimizer_state=optimizer_state, on_artifact=on_artifact)
    finally:
        elapsed = time.perf_counter() - started
        record["seconds"] = round(elapsed, 2)
        record["final_step"] = embedding.step
        done = embedding.step - record["embedding"]["start_step"]
        record["s_per_step"] = round(elapsed / done, 4) if done else None
        atomic_write_text(record_path, json.dumps(record, indent=2))
    record.update(status=result.status, message=result.message, final=str(result.final_path))
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return RunOutcome(result, paths, data, record_path)


def _check_dims(have: dict[str, int], want: dict[str, int], path: Path) -> None:
    if have != want:
        raise TIError(f"{path.name} has vectors {have} but the model's text encoder expects {want}; "
                      "it was made for another model family (SD1 768, SD2 1024, SDXL clip_l+clip_g).")
