"""What the UI and the API do, once, for any host: create, list, train, preprocess, status, interrupt.

A host (A1111 glue or the standalone app) builds one `Service` with its backend, folders and hooks;
the Gradio tabs and the REST routes are thin layers over these methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dataset_ops
from .core import create_hints, formats
from .core.backend import Backend
from .core.create import Created, CreateParams, create_embedding
from .core.data.preprocess import PreprocessParams, Upscaler, check_params, preprocess, resolve_folders
from .core.data.templates import load_template
from .core.embedding import validate_name
from .core.errors import EmbeddingFormatError, Interrupted, ModelError, TIError
from .core.fileio import check_inside
from .core.params import from_record, to_record
from .core.training import grid
from .core.training.metrics import Progress
from .core.training.presets import list_presets, load_preset, save_preset
from .core.training.run import RunRequest, grid_cost, render_run_grid, run_training
from .core.training.snapshots import list_snapshots, promote
from .core.training.train_params import TrainParams
from .jobs import Job, JobManager

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin", ".png")


@dataclass
class Service:
    backend: Callable[[], Backend]  # the loaded model; called when needed (the host may switch models)
    embeddings_dir: Path
    log_root: Path
    jobs: JobManager = field(default_factory=JobManager)
    on_embeddings_changed: Callable[[], None] = lambda: None  # host: reload its embedding list
    # Host settings that fill in the TrainParams fields a request leaves out (A1111: its training options).
    train_defaults: Callable[[], dict[str, Any]] = dict
    # Last adjustments before a run starts (A1111: the log folder setting, read again).
    before_training: Callable[[TrainParams], TrainParams] = lambda params: params
    # A host that loads its selected checkpoint lazily (Forge: at the first generation) loads it here, before
    # a model is needed; the argument says whether the caller holds the host's GPU lock (inside a job).
    prepare_model: Callable[[bool], None] = lambda locked: None
    # The upscaler for small images when preprocessing asks for one (A1111: its img2img upscaler);
    # called per run, since the host's setting may change. None = Lanczos.
    upscaler: Callable[[], Upscaler | None] = lambda: None
    thumbnail_dir: Path | None = None  # caption editor thumbnails; None = the user cache folder
    presets_dir: Path | None = None  # saved Train presets; None = `<log_root>/.presets`
    _skipped_noted: set[tuple[str, int, int]] = field(default_factory=set, init=False, repr=False)

    @property
    def presets_folder(self) -> Path:
        return self.presets_dir or self.log_root / ".presets"

    def embedding_path(self, name: str) -> Path:
        name = validate_name(name)
        for suffix in EMBEDDING_SUFFIXES:
            path = self.embeddings_dir / f"{name}{suffix}"
            if path.exists():
                return path
        raise TIError(f"No embedding named {name!r} in {self.embeddings_dir}.")

    def list_embeddings(self) -> list[dict[str, Any]]:
        return self.scan_embeddings()[0]

    def scan_embeddings(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """(embeddings, skipped): one entry per embedding in the folder, and `{"file", "error"}` for each
        file with an embedding suffix that could not be read (damaged, unsafe, a plain image), so one bad
        file never hides the others. Each skipped file is logged once per version of it."""
        out: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        if not self.embeddings_dir.is_dir():
            return out, skipped
        for path in sorted(self.embeddings_dir.iterdir()):
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or path.name.endswith(".preview.png"):
                continue
            try:
                loaded = formats.load_embedding(path)
            except EmbeddingFormatError as exc:  # what load_embedding turns every failure into
                skipped.append({"file": path.name, "error": str(exc)})
                self._note_skipped(path, exc)
                continue
            if loaded.path != path:
                continue  # the clip_g half of a diffusers SDXL pair: listed with its first half
            emb = loaded.embedding
            out.append({"name": emb.name, "file": path.name, "vectors": emb.num_vectors, "dims": emb.dims,
                        "step": emb.step, "sd_checkpoint": emb.sd_checkpoint,
                        "training": self.jobs.is_training(emb.name)})
        return out, skipped

    def _note_skipped(self, path: Path, exc: Exception) -> None:
        try:
            stat = path.stat()
            key = (path.name, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (path.name, 0, 0)
        if key not in self._skipped_noted:  # listing runs on every page load and name check: warn once
            self._skipped_noted.add(key)
            logger.warning("Skipping %s in the embedding list: %s", path, exc)

    def create(self, params: CreateParams) -> Created:
        if self.jobs.is_training(validate_name(params.name)):
            raise TIError(f"'{params.name}' is being trained; interrupt the training before replacing it.")
        self.prepare_model(False)
        created = create_embedding(self.backend(), params, self.embeddings_dir)
        self.on_embeddings_changed()
        return created

    def model_summary(self) -> dict[str, Any]:
        """The loaded model as the UI and API show it: {"family", "name", "encoders" (key -> width), "suffix"
        (the file type Create saves)}. Asked anew each call: the host may switch checkpoints at any time.
        Raises TIError (ModelError) when no model can be used."""
        try:
            info = self.backend().info
            return {"family": info.family, "name": info.name, "encoders": dict(info.encoders),
                    "suffix": info.embedding_suffix}
        except TIError:
            raise
        except Exception as exc:  # no checkpoint loaded yet, a half-switched model: one line, not a traceback
            # every note event asks: the trace only when debugging, not once per keystroke
            logger.warning("Cannot read the loaded model: %s", exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            raise ModelError(f"Cannot read the loaded model: {exc}") from exc

    def create_hints(self, name: str = "", init_text: str = "", num_vectors: int = 0, template: str | None = None,
                     init_mode: str = "pool") -> dict[str, Any]:
        """The Create form's hints (core/create_hints): the name (word? exists?), the init text (counted per
        encoder of the loaded model), and the longest training prompt of `template` (default: the training
        default) with this many vectors. "model": `model_summary()`, or None with "model_error" saying why."""
        hints = create_hints
        entries = self.list_embeddings()
        template = template or self.train_defaults().get("template") or TrainParams().template
        vectors = hints.vectors_for(init_text, num_vectors)
        try:
            budget = hints.prompt_budget(load_template(template), vectors, (), name)
        except TIError as exc:  # a missing or unreadable template
            budget = [hints.Hint(hints.WARN, str(exc))]
        try:
            model, model_error = self.model_summary(), None
        except TIError as exc:  # the hints do not need a model: give them without its part
            model, model_error = None, str(exc)
        encoders, suffix = (model["encoders"], model["suffix"]) if model else (None, None)
        names, files = [e["name"] for e in entries], [e["file"] for e in entries]
        return {"name": hints.as_records(hints.name_hints(name, names, files, suffix)),
                "init_text": hints.as_records(hints.init_text_hints(init_text, num_vectors, init_mode, encoders)),
                "prompt_budget": hints.as_records(budget), "vectors": vectors, "template": template,
                "model": model, "model_error": model_error}

    def train_params(self, record: Mapping[str, Any]) -> TrainParams:
        """TrainParams from the host's defaults overlaid with `record` (validated; unknown keys fail)."""
        return from_record(TrainParams, {**self.train_defaults(), **record})

    def start_training(self, name: str, data_dir: str | Path, params: TrainParams,
                       resume_from: str | Path | None = None) -> Job:
        """Train in the background; `resume_from`: one of this embedding's snapshots (see `snapshots`) to
        continue from, step-exact with its optimizer state; the result replaces the embedding file."""
        path = self.embedding_path(name)
        params = self.before_training(params)
        data = Path(data_dir).expanduser()
        if not data.is_dir():
            raise TIError(f"The dataset folder {data} does not exist.")
        start = self._own_snapshot(path.stem, resume_from) if resume_from else None
        request = RunRequest(path, data, self.log_root, params, resume_from=start)

        def work(job: Job) -> dict[str, Any]:
            def on_progress(progress: Progress) -> None:
                if job.progress is None:
                    job.message = "Training…"  # replaces the set-up messages (scan, encoding)
                job.progress = progress
                job.losses.append((progress.step, progress.loss))
                job.learn_rates.append((progress.step, progress.learn_rate))
                job.validation.extend(progress.validation)
                if progress.norm_ratios:
                    job.norm_ratios = list(progress.norm_ratios)
                    job.norms.append((progress.step, max(progress.norm_ratios)))
                job.warnings, job.best_step = list(progress.warnings), progress.best_step
                self.jobs.hooks.update(progress.step, progress.end_step,
                                       f"Step {progress.step}/{progress.end_step}, loss {progress.loss:.4f}")

            def on_artifact(kind: str, path: Path) -> None:
                if kind == "preview":  # shown by the UI while training goes on
                    job.previews.append(str(path))
                elif kind == "snapshot":
                    job.snapshots.append(str(path))

            self.prepare_model(True)
            outcome = run_training(self.backend(), request, progress=on_progress, stop=job.stop,
                                   status=lambda text: setattr(job, "message", text), on_artifact=on_artifact,
                                   on_grid=lambda cost: setattr(job, "stage", "grid"))
            self.on_embeddings_changed()
            result = outcome.result
            job.snapshots = [str(p) for p in (result.start_path, *result.snapshots) if p and p.exists()]
            job.warnings, job.best_step = list(result.warnings), result.best_step
            return {"status": result.status, "message": result.message, "step": result.step,
                    "embedding": str(result.final_path), "log_dir": str(outcome.paths.log_dir),
                    "loss_csv": str(outcome.paths.loss_csv), "record": str(outcome.record_path),
                    "snapshots": [str(p) for p in result.snapshots],
                    "best_step": result.best_step, "best_val_loss": result.best_loss,
                    "best_snapshot": str(result.best_path) if result.best_path else None,
                    "early_stopped": result.early_stopped, "warnings": list(result.warnings),
                    "grid": str(outcome.grid) if outcome.grid else None}

        return self.jobs.start("train", path.stem, work)

    # ------------------------------------------------------------ snapshots, grid, presets

    def _own_snapshot(self, name: str, snapshot: str | Path) -> Path:
        path = check_inside(snapshot, self.log_root, "snapshot")
        if not grid.is_snapshot_of(path, name):
            raise TIError(f"{Path(snapshot).name} is not a snapshot of '{name}' (expected {name}-<step>.pt).")
        return path

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        """Every saved snapshot of `name` (newest run first), with its validation loss and best mark."""
        return [s.to_dict() for s in list_snapshots(self.log_root, validate_name(name))]

    def promote(self, name: str, snapshot: str | Path) -> dict[str, Any]:
        """Make a snapshot the embedding itself (same file name, so prompts use it at once)."""
        target = self.embedding_path(name)
        if self.jobs.is_training(target.stem):
            raise TIError(f"'{name}' is being trained; interrupt the training before promoting a snapshot.")
        source = self._own_snapshot(target.stem, snapshot)
        promote(source, target)
        self.on_embeddings_changed()
        step = formats.load_embedding(target).embedding.step
        return {"embedding": str(target), "step": step, "from": str(source),
                "message": f"'{target.stem}' is now the step-{step} snapshot ({source.name}); it is ready to use."}

    def start_grid(self, name: str, log_dir: str | Path | None = None, prompts: str = "") -> Job:
        """Render a run's comparison grid in the background (default: the newest run of `name`)."""
        name = validate_name(name)
        runs = sorted((self.log_root / name).glob("*/run.json"), reverse=True)
        folder = Path(log_dir) if log_dir else (runs[0].parent if runs else None)
        if folder is None:
            raise TIError(f"'{name}' has no training runs under {self.log_root}.")
        folder = check_inside(folder / "run.json", self.log_root, "training run").parent

        def work(job: Job) -> dict[str, Any]:
            try:
                self.prepare_model(True)
                path = render_run_grid(self.backend(), folder, prompts, stop=job.stop,
                                       status=lambda text: setattr(job, "message", text))
            except Interrupted as exc:  # asked for, not a failure
                return {"status": "interrupted", "message": str(exc), "grid": None}
            return {"status": "finished", "message": f"Comparison grid saved to {path}.", "grid": str(path)}

        return self.jobs.start("grid", name, work, message=grid_cost(folder, prompts).text())

    def save_preset(self, preset: str, params: TrainParams, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        path = save_preset(self.presets_folder, preset, params, extra)
        return {"preset": path.stem, "file": str(path), "message": f"Saved preset '{path.stem}'."}

    def load_preset(self, preset: str) -> dict[str, Any]:
        params, extra = load_preset(self.presets_folder, preset)
        return {"preset": preset, "params": to_record(params), "extra": extra}

    def presets(self) -> list[str]:
        return list_presets(self.presets_folder)

    # ------------------------------------------------------------ dataset preparation

    def native_size(self) -> int | None:
        """The loaded model's native resolution (512 SD1.x, 768 SD2-v), or None when it cannot be told."""
        try:
            return int(self.backend().info.resolution)
        except Exception as exc:  # no model loaded, unsupported model: the UI keeps its default
            logger.debug("No native size: %s", exc)
            return None

    def preprocess_params(self, record: Mapping[str, Any]) -> PreprocessParams:
        """PreprocessParams from `record`; width/height left out default to the model's native size."""
        record = dict(record)
        size = None if {"width", "height"} <= set(record) else self.native_size()
        if size:
            record.setdefault("width", size)
            record.setdefault("height", size)
        return from_record(PreprocessParams, record)

    def start_preprocess(self, params: PreprocessParams) -> Job:
        """Preprocess in the background (one job at a time, with training); status via `job_status`."""
        check_params(params)  # bad folders or parameters: refused now, not as a failed job
        src, _dst = resolve_folders(params.source, params.destination)

        def work(job: Job) -> dict[str, Any]:
            def on_progress(done: int, total: int, text: str) -> None:
                job.done, job.total, job.message = done, total, text
                self.jobs.hooks.update(done, total, f"Preprocessing {done}/{total}")

            upscale = self.upscaler() if params.upscale else None
            result = preprocess(params, progress=on_progress, stop=job.stop, upscale=upscale)
            return dataset_ops.preprocess_record(result)

        return self.jobs.start("preprocess", src.name, work)

    def check_dataset(self, folder: str | Path, subject: str = "", width: int = 0, height: int = 0,
                      recursive: bool = False) -> dict[str, Any]:
        """The dataset check as a dict (`summary`, counts, findings); 0 sizes = the model's native size."""
        size = self.native_size() or 512
        return dataset_ops.check(folder, subject, width or size, height or size, recursive)

    def caption_page(self, folder: str | Path, page: int = 1, per_page: int = 24) -> dict[str, Any]:
        return dataset_ops.caption_page(folder, page, per_page, self.thumbnail_dir)

    def caption_edit(self, folder: str | Path, op: str, **args: Any) -> dict[str, Any]:
        return dataset_ops.caption_edit(folder, op, args)

    def caption_tags(self, folder: str | Path) -> list[tuple[str, int]]:
        return dataset_ops.tag_frequency(folder)

    # ------------------------------------------------------------ jobs

    def job_status(self, job_id: str | None = None, since_step: int = 0) -> dict[str, Any]:
        job = self.jobs.get(job_id) if job_id else (self.jobs.current() or self.jobs.latest())
        if job is None:
            return {"status": "idle", "active": False, "message": "No training has run yet."}
        return job.to_dict(since_step)

    def interrupt(self, job_id: str | None = None) -> dict[str, Any]:
        job = self.jobs.interrupt(job_id)
        return job.to_dict() if job else {"status": "idle", "active": False, "message": "Nothing is training."}
