"""Preprocess a folder of images into training images: crops, tiles, flips, captions.

The successor of A1111's removed Preprocess tab (HOST-NOTES §4), host-independent: the UI tab,
the CLI (`preprocess`) and the API call `preprocess()`. The source folder is only read. Files are
streamed one at a time (a few in flight with workers), so memory does not grow with the folder.
Every output keeps its source's stem (`<stem>.png`, `<stem>-tile2.png`, `<stem>-flip.png`) and
every source file gets a line in the report: what it became, or why it was skipped.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import TIError
from ..fileio import atomic_path, atomic_write_text
from ..params import ParameterError, param, validate
from . import crops
from .captioners import Captioner, close_captioners, combined_caption, load_captioners
from .images import (
    CAPTION_SUFFIX,
    caption_index,
    decode_caption,
    find_caption,
    list_files,
    load_rgb,
    read_error_reason,
    resize_and_crop,
    size_problem,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
Upscaler = Callable[[Image.Image, int, int], Image.Image]

CAPTION_ACTIONS = ("ignore", "copy", "prepend", "append")
DEFAULT_SUFFIX = "-Processed"
FLIP_HINT = "Not for faces or text: a mirrored face or word teaches the embedding a subject that does not exist."


class PreprocessError(TIError):
    """Preprocessing cannot start (bad folders or parameters)."""


@dataclass
class PreprocessParams:
    source: str = param("", "Source folder", "Folder of images to prepare. It is only read, never modified.")
    destination: str = param("", "Destination folder",
                             "Where the outputs go, created when missing; empty = '<source>-Processed'. "
                             "Must not be the source folder or inside it.")
    width: int = param(512, "Width", "Output width in pixels; use the model's native size (512 SD1.x, "
                       "768 SD2-v, 1024 SDXL).", minimum=64, maximum=4096, step=8)
    height: int = param(512, "Height", "Output height in pixels.", minimum=64, maximum=4096, step=8)
    recursive: bool = param(False, "Include sub-folders",
                            "Also read sub-folders; outputs keep the same sub-folder layout.")
    flip: bool = param(False, "Create flipped copies",
                       f"Also save a horizontally mirrored copy of every output ('<stem>-flip.png'). {FLIP_HINT}")
    split: bool = param(False, "Split oversized images",
                        "Cut images much longer than the target aspect into overlapping tiles "
                        "('<stem>-tile1.png', …) instead of one crop.", section="split")
    split_threshold: float = param(0.5, "Split threshold",
                                   "Split when one crop would keep at most this fraction of the long side.",
                                   minimum=0.0, maximum=1.0, step=0.05, section="split")
    split_overlap: float = param(0.2, "Split overlap ratio", "Minimum overlap of neighbouring tiles.",
                                 minimum=0.0, maximum=0.9, step=0.05, section="split")
    focal_crop: bool = param(False, "Auto focal point crop",
                             "Crop around the most detailed region (entropy and edges; faces when the host "
                             "has a face detector) instead of the centre.", section="crop")
    focal_entropy_weight: float = param(0.5, "Focal entropy weight", "Weight of the most varied region.",
                                        minimum=0.0, maximum=1.0, step=0.05, section="crop")
    focal_edges_weight: float = param(0.5, "Focal edges weight", "Weight of the region with the most edges.",
                                      minimum=0.0, maximum=1.0, step=0.05, section="crop")
    focal_face_weight: float = param(0.9, "Focal face weight",
                                     "Weight of detected faces (only where a face detector is available; "
                                     "standalone has none).", minimum=0.0, maximum=1.0, step=0.05, section="crop")
    autosize: bool = param(False, "Auto-sized crop",
                           "Choose each output's size (multiples of 64) to fit the image's aspect, within the "
                           "bounds below, instead of width × height.", section="autosize")
    autosize_min_dim: int = param(384, "Dimension lower bound", "Smallest output side.", minimum=64,
                                  maximum=4096, step=64, section="autosize")
    autosize_max_dim: int = param(768, "Dimension upper bound", "Largest output side.", minimum=64,
                                  maximum=4096, step=64, section="autosize")
    autosize_min_area: int = param(64 * 64, "Area lower bound", "Smallest output area in pixels.", minimum=0,
                                   section="autosize")
    autosize_max_area: int = param(640 * 640, "Area upper bound", "Largest output area in pixels.", minimum=0,
                                   section="autosize")
    autosize_objective: str = param("max_area", "Resizing objective",
                                    "'max_area': the largest size within the error; 'min_error': the closest "
                                    "aspect.", choices=crops.AUTOSIZE_OBJECTIVES, section="autosize")
    autosize_max_error: float = param(0.1, "Aspect error threshold",
                                      "Largest accepted aspect mismatch (1 - ratio); images with no fitting "
                                      "size get width × height.", minimum=0.0, maximum=1.0, step=0.01,
                                      section="autosize")
    upscale: bool = param(False, "Upscale small images first",
                          "Enlarge images smaller than the output with the upscaler (the web UI's upscalers "
                          "there, Lanczos standalone) before cropping; off: plain resizing.")
    caption_action: str = param("copy", "Existing caption",
                                "What to do with a source '<stem>.txt': 'copy' keeps it (generated caption only "
                                "when there is none), 'ignore' uses the generated caption only, 'prepend'/"
                                "'append' put it before/after the generated one.",
                                choices=CAPTION_ACTIONS, section="captions")
    captioners: str = param("", "Auto-captioners",
                            "Comma-separated names, e.g. 'blip, deepbooru' (from the web UI; standalone has "
                            "none offline, the caption step is then skipped). Joined with ', '.",
                            section="captions")
    png_compression: int = param(1, "PNG compression",
                                 "zlib level 0–9 of the output PNGs. Outputs are training data: 1 encodes ~1.7× "
                                 "faster than 6 for files ~8% larger; 0 is fastest, ~1.5× larger.", minimum=0,
                                 maximum=9, section="performance")
    workers: int = param(0, "Worker threads",
                         "Images processed in parallel; 0 = automatic (up to 4). Captioners always run one at "
                         "a time.", minimum=0, maximum=64, section="performance")


@dataclass
class FileReport:
    """What one source file became: status "ok", "skipped" (unusable input) or "failed" (error)."""

    source: Path
    status: str
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = f"{len(self.outputs)} output(s)" if self.status == "ok" else self.status
        return f"{self.source.name}: {what}" + (f" ({'; '.join(self.notes)})" if self.notes else "")


@dataclass
class PreprocessResult:
    source: Path
    destination: Path
    status: str  # "finished" | "interrupted"
    files: list[FileReport] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    total: int = 0
    elapsed_s: float = 0.0

    @property
    def processed(self) -> int:
        return sum(1 for f in self.files if f.status == "ok")

    @property
    def outputs(self) -> int:
        return sum(len(f.outputs) for f in self.files)

    @property
    def problems(self) -> list[FileReport]:
        return [f for f in self.files if f.status != "ok"]

    def summary(self) -> str:
        text = (f"{'Interrupted' if self.status == 'interrupted' else 'Finished'}: {self.processed} of "
                f"{self.total} file(s) processed into {self.outputs} image(s) in {self.destination}")
        if self.problems:
            text += f"; {len(self.problems)} skipped or failed"
        return text + f" ({self.elapsed_s:.1f} s)."


def default_destination(source: str | os.PathLike[str]) -> Path:
    src = Path(source).expanduser()
    return src.with_name(src.name + DEFAULT_SUFFIX)


def resolve_folders(source: str | os.PathLike[str], destination: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The source folder and the destination (default `<source>-Processed`), checked: the source
    must exist; the destination may not be the source or inside it (outputs would be read back
    as inputs and the source folder modified)."""
    if not str(source).strip():
        raise PreprocessError("Choose a source folder.")
    src = Path(source).expanduser()
    if not src.is_dir():
        raise PreprocessError(f"The source folder {src} does not exist or is not a folder.")
    dst = Path(destination).expanduser() if destination and str(destination).strip() else default_destination(src)
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src:
        raise PreprocessError(f"The destination {dst} is the source folder; choose another folder "
                              "(the source is never modified).")
    if real_src in real_dst.parents:
        raise PreprocessError(f"The destination {dst} is inside the source folder {src}; choose a folder "
                              "outside it (the source is never modified).")
    if dst.exists() and not dst.is_dir():
        raise PreprocessError(f"The destination {dst} is a file, not a folder.")
    return src, dst


def check_params(p: PreprocessParams) -> None:
    validate(p)
    if p.autosize and p.autosize_min_dim > p.autosize_max_dim:
        raise ParameterError(f"Dimension lower bound ({p.autosize_min_dim}) is above the upper bound "
                             f"({p.autosize_max_dim}).")
    if p.autosize and p.autosize_min_area > p.autosize_max_area:
        raise ParameterError(f"Area lower bound ({p.autosize_min_area}) is above the upper bound "
                             f"({p.autosize_max_area}).")


def lanczos_upscale(img: Image.Image, width: int, height: int) -> Image.Image:
    """The standalone upscaler: plain Lanczos resampling."""
    return img.resize((width, height), Image.Resampling.LANCZOS)


def combine_captions(existing: str, generated: str, action: str) -> str:
    """The caption an output gets from the source's caption and the generated one."""
    existing, generated = existing.strip(), generated.strip()
    if action == "ignore":
        parts = [generated]
    elif action == "copy":
        parts = [existing or generated]
    elif action == "prepend":
        parts = [existing, generated]
    elif action == "append":
        parts = [generated, existing]
    else:
        raise ValueError(f"caption action must be one of {', '.join(CAPTION_ACTIONS)}, got {action!r}")
    return ", ".join(p for p in parts if p)


# --- one image -------------------------------------------------------------------------------


@dataclass
class _Job:
    """Everything one worker needs for one source file (no shared mutable state)."""

    path: Path
    out_stem: Path  # destination folder / output stem, without suffix
    caption_file: Path | None
    notes: list[str]


class _Pipeline:
    def __init__(self, params: PreprocessParams, upscale: Upscaler | None,
                 face_detector: crops.FaceDetector | None, captioners: Sequence[Captioner]) -> None:
        self.p = params
        self.size = (params.width, params.height)
        self.upscale = upscale
        self.face_detector = face_detector
        self.captioners = list(captioners)
        self.weights = crops.FocalWeights(params.focal_entropy_weight, params.focal_edges_weight,
                                          params.focal_face_weight)
        self._caption_lock = threading.Lock()  # host interrogators are not thread-safe

    def run(self, job: _Job) -> FileReport:
        report = FileReport(job.path, "ok", notes=list(job.notes))
        try:
            if job.path.stat().st_size == 0:
                return FileReport(job.path, "skipped", notes=["empty file (0 bytes)"])
            with warnings.catch_warnings():
                # Pillow warns between 1× and 2× MAX_IMAGE_PIXELS and raises above (reported below).
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = load_rgb(job.path)
        except Exception as exc:
            logger.debug("Cannot read %s", job.path, exc_info=True)
            return FileReport(job.path, "skipped", notes=[read_error_reason(job.path, exc)])
        if (problem := size_problem(*img.size)) is not None:  # no enlarging it into an output training would refuse
            return FileReport(job.path, "skipped", notes=[*job.notes, f"{problem} (the dataset check and training "
                                                                       "skip such images too)"])
        try:
            self._process(img, job, report)
        except Exception as exc:  # a write error or a bug on one image must not end the batch
            logger.warning("Preprocessing %s failed", job.path, exc_info=True)
            report.status = "failed"
            report.notes.append(f"{type(exc).__name__}: {exc}")
        return report

    def _process(self, img: Image.Image, job: _Job, report: FileReport) -> None:
        p = self.p
        pieces: list[tuple[str, Image.Image]]
        if p.split and crops.coverage(img.size, self.size) <= p.split_threshold:
            img = self._enlarge(img, self.size, report)
            tiles = crops.split_tiles(img, self.size, p.split_overlap)
            pieces = [(f"-tile{i}", t) for i, t in enumerate(tiles, 1)] if len(tiles) > 1 else [("", tiles[0])]
        else:
            size = self.size
            if p.autosize:
                fitted = crops.autosize(img.size, p.autosize_min_dim, p.autosize_max_dim, p.autosize_min_area,
                                        p.autosize_max_area, p.autosize_objective, p.autosize_max_error)
                if fitted is None:
                    report.notes.append(f"no auto-size within the bounds and error threshold; used {size[0]}×{size[1]}")
                else:
                    size = fitted
            img = self._enlarge(img, size, report)
            if p.focal_crop:
                piece = crops.focal_crop(img, size, self.weights, self.face_detector)
            else:
                piece = resize_and_crop(img, size)
            pieces = [("", piece)]
        existing = self._existing_caption(job, report)
        for suffix, piece in pieces:
            caption = combine_captions(existing, self._generate(piece, report), p.caption_action)
            variants = [(suffix, piece)]
            if p.flip:
                # The flip reuses the crop's caption: captioning twice costs double for the same words.
                variants.append((f"{suffix}-flip", ImageOps.mirror(piece)))
            for name_suffix, out in variants:
                target = job.out_stem.with_name(job.out_stem.name + name_suffix + ".png")
                with atomic_path(target) as tmp:
                    out.save(tmp, format="PNG", compress_level=p.png_compression)
                if caption:
                    atomic_write_text(target.with_suffix(CAPTION_SUFFIX), caption + "\n")
                report.outputs.append(target)

    def _enlarge(self, img: Image.Image, size: tuple[int, int], report: FileReport) -> Image.Image:
        scale = crops.cover_scale(img.size, size)
        if scale <= 1.0:
            return img
        if not self.p.upscale:
            report.notes.append(f"smaller than {size[0]}×{size[1]}: enlarged ×{scale:.2f} by plain resizing "
                                "(turn on 'Upscale small images first' for an upscaler)")
            return img
        w, h = math.ceil(img.width * scale), math.ceil(img.height * scale)
        up = (self.upscale or lanczos_upscale)(img, w, h)
        up = up if up.mode == "RGB" else up.convert("RGB")
        report.notes.append(f"upscaled ×{scale:.2f} to {up.width}×{up.height}")
        return up

    def _existing_caption(self, job: _Job, report: FileReport) -> str:
        if job.caption_file is None or self.p.caption_action == "ignore":
            return ""
        try:
            return " ".join(decode_caption(job.caption_file.read_bytes()).split())
        except (UnicodeDecodeError, OSError) as exc:
            report.notes.append(f"caption {job.caption_file.name} unreadable ({exc}); not used")
            return ""

    def _generate(self, img: Image.Image, report: FileReport) -> str:
        if not self.captioners:
            return ""
        with self._caption_lock:
            text, notes = combined_caption(self.captioners, img)
        report.notes.extend(notes)
        return text


# --- the folder ------------------------------------------------------------------------------


def _plan(src: Path, dst: Path, recursive: bool) -> tuple[list[_Job], list[FileReport]]:
    """One job per candidate file, with its output stem; folders/caption files are not jobs."""
    listing_report: list = []
    files = list_files(src, recursive, listing_report)
    index = caption_index([f for f in files if f.suffix.lower() == CAPTION_SUFFIX])
    skipped = [FileReport(s.path, "skipped", notes=[s.reason]) for s in listing_report]
    jobs: list[_Job] = []
    used: set[str] = set()
    for path in files:
        if path.suffix.lower() == CAPTION_SUFFIX:
            continue
        rel_dir = path.parent.relative_to(src)
        stem, notes = path.stem, []
        key = str(rel_dir / stem).casefold()  # case-insensitive file systems would merge "A" and "a"
        if key in used:  # "x.jpg" and "x.png" in one folder: keep both, name the second by its type
            base, n = f"{path.stem}_{path.suffix.lstrip('.').lower()}", 1
            stem = base
            while (key := str(rel_dir / stem).casefold()) in used:
                n += 1
                stem = f"{base}{n}"
            notes.append(f"another file has the stem '{path.stem}': outputs named '{stem}…'")
        used.add(key)
        jobs.append(_Job(path, dst / rel_dir / stem, find_caption(path, index), notes))
    return jobs, skipped


def _worker_count(requested: int, captioning: bool) -> int:
    if captioning:
        return 1  # captioners serialise anyway, and GPU interrogators dislike threads
    if requested > 0:
        return requested
    return max(1, min(4, os.cpu_count() or 1))


def preprocess(
    params: PreprocessParams,
    *,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    upscale: Upscaler | None = None,
    face_detector: crops.FaceDetector | None = None,
    captioners: Sequence[Captioner] | None = None,
) -> PreprocessResult:
    """Preprocess `params.source` into `params.destination` (see PreprocessParams).

    `progress(done, total, message)` is called after each file (from this thread); setting `stop`
    ends the run after the images in flight, with status "interrupted". `upscale(img, w, h)` is the
    upscaler for small images (default Lanczos); `face_detector(img)` returns face boxes for the
    focal crop; `captioners` overrides `params.captioners` (the host passes its interrogators).
    Raises PreprocessError/ParameterError before starting; never for a bad file.
    """
    check_params(params)
    src, dst = resolve_folders(params.source, params.destination)
    started = time.perf_counter()
    result = PreprocessResult(src, dst, "finished")
    if captioners is None:
        ready, problems = load_captioners(params.captioners)
    else:
        ready, problems = list(captioners), []
    result.messages.extend(problems)
    if problems and not ready:
        result.messages.append("Caption step skipped: no captioner is available; existing captions are handled "
                               f"with '{params.caption_action}'.")
    if params.focal_crop and face_detector is None and params.focal_face_weight > 0:
        result.messages.append("Face detection is not available here (no face detector); focal points use "
                               "entropy and edges only.")
    if params.flip:
        result.messages.append(f"Flipped copies are on. {FLIP_HINT}")
    jobs, listing_skips = _plan(src, dst, params.recursive)
    result.files.extend(listing_skips)
    result.total = len(jobs)
    dst.mkdir(parents=True, exist_ok=True)
    pipeline = _Pipeline(params, upscale, face_detector, ready)
    workers = _worker_count(params.workers, bool(ready))
    logger.debug("Preprocessing %d file(s) from %s into %s with %d worker(s)", len(jobs), src, dst, workers)
    if progress:
        progress(0, len(jobs), f"Preprocessing {len(jobs)} file(s) into {dst}")
    try:
        _run_jobs(pipeline, jobs, workers, result, progress, stop)
    finally:
        close_captioners(ready)
        result.elapsed_s = time.perf_counter() - started
    done = len(result.files) - len(listing_skips)
    if result.status == "interrupted":
        result.messages.append(f"Interrupted after {done} of {len(jobs)} file(s); outputs so far are kept.")
    elif not result.outputs:
        result.messages.append(f"Nothing was produced: {src} has no usable image" + (
            f" ({len(result.problems)} file(s) skipped or failed)." if result.problems else "."))
    logger.debug("%s", result.summary())
    return result


def _run_jobs(pipeline: _Pipeline, jobs: list[_Job], workers: int, result: PreprocessResult,
              progress: ProgressFn | None, stop: threading.Event | None) -> None:
    """Run jobs in order with at most 2 × workers in flight: bounded memory, ordered reports."""
    done = 0

    def finish(report: FileReport) -> None:
        nonlocal done
        done += 1
        result.files.append(report)
        if progress:
            progress(done, len(jobs), report.line())

    if workers <= 1:
        for job in jobs:
            if stop is not None and stop.is_set():
                result.status = "interrupted"
                return
            finish(pipeline.run(job))
        return
    pending: deque[Future[FileReport]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess") as pool:
        for job in jobs:
            if stop is not None and stop.is_set():
                result.status = "interrupted"
                break
            pending.append(pool.submit(pipeline.run, job))
            if len(pending) >= 2 * workers:
                finish(pending.popleft().result())
        while pending:
            finish(pending.popleft().result())
