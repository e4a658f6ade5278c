"""What the Train tab shows of a job, computed from `Service.job_status()` on each poll (no gradio).

Polling (rather than a stream tied to the Train click) is what lets a reloaded page re-attach to a
running job. Each page keeps a small cache of the loss series so a poll only fetches new steps.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Per-step TI loss is noisy: the chart adds an exponential moving average (bias-corrected, so the
# first steps are not pulled towards 0) over about this many steps.
EMA_SPAN = 25
# Points per series sent to the browser on each update; longer runs are thinned evenly.
MAX_CHART_POINTS = 1000
MAX_PREVIEWS = 12
# Series names in the charts' legends.
RAW, SMOOTH = "loss", f"average ({EMA_SPAN} steps)"
VAL, BEST = "validation", "best step"
LR = "learning rate"
NORM = "largest vector / vocabulary median"

Points = list[tuple[int, float]]


@dataclass
class LossCache:
    """One page's copy of the current job's series (kept in a gr.State).

    Updated in place: gradio 3.41 runs an `every=` event as one loop that passes the same input
    objects on each tick, so only mutations of the session's State object carry over.
    """

    job: str | None = None
    raw: Points = field(default_factory=list)
    smooth: Points = field(default_factory=list)
    ema: float = 0.0
    weight: float = 0.0  # sum of EMA weights so far, for the bias correction
    val: Points = field(default_factory=list)  # validation loss (step 0 = the starting vectors)
    lrs: Points = field(default_factory=list)
    norms: Points = field(default_factory=list)  # largest vector norm / the vocabulary's median norm
    previews: int = -1  # how many preview paths the page shows; -1 = none sent yet
    warnings: tuple[str, ...] = ()  # the warnings the page shows
    active: bool = False  # the job was running at the last poll
    ended: bool = False  # the page shows the job's result
    name: str | None = None  # the job's embedding
    result: dict[str, Any] = field(default_factory=dict)  # the finished training's result (promote best)
    side: str | None = None  # the last other job (grid, preprocess) the page has shown the end of

    def reset(self, job: str | None) -> None:
        side = self.side
        self.__init__(job=job)  # every field back to its default
        self.side = side

    def reset_series(self) -> None:
        self.raw, self.smooth, self.ema, self.weight, self.val, self.lrs, self.norms = [], [], 0.0, 0.0, [], [], []

    @property
    def last_step(self) -> int:
        return self.raw[-1][0] if self.raw else 0

    def add(self, losses: list[list[float]]) -> bool:
        alpha = 2 / (EMA_SPAN + 1)
        added = False
        for step, loss in losses:
            if not math.isfinite(loss):  # a NaN step is reported in the status line, not plotted
                continue
            self.ema = (1 - alpha) * self.ema + alpha * loss
            self.weight = (1 - alpha) * self.weight + alpha
            self.raw.append((int(step), float(loss)))
            self.smooth.append((int(step), self.ema / self.weight))
            added = True
        return added


def _extend(series: Points, points: list[list[float]] | None) -> bool:
    """Append the finite points after the series' last step (a poll may repeat the last step)."""
    added = False
    for step, value in points or []:
        if (not series or step > series[-1][0]) and value is not None and math.isfinite(value):
            series.append((int(step), float(value)))
            added = True
    return added


@dataclass
class View:
    """What a poll changes on the page; None = leave that part as it is."""

    status: str  # the status line(s)
    chart: list[tuple[int, float, str]] | None  # loss chart (step, loss, series) rows
    previews: list[tuple[str, str]] | None  # (path, caption), newest first
    cache: LossCache
    job: dict[str, Any] = field(default_factory=dict)  # the status polled (the Preprocess tab reads it too)
    lr: list[tuple[int, float, str]] | None = None  # learning-rate chart (step, value, series) rows
    norms: list[tuple[int, float, str]] | None = None  # norm-ratio chart rows
    warnings: str | None = None  # HTML of the run's warnings ("" = none)
    result: str | None = None  # the result panel's text ("" = clear it)
    grid: str | None = None  # the comparison grid image to show ("" = clear it)
    snapshots: list[str] | None = None  # snapshot labels for the dropdown (see `snapshot_label`)


def poll(service: Any, cache: LossCache | None) -> View:
    """Read the current (or last) job and say what changed since this page's last poll (updates `cache`)."""
    cache = cache if isinstance(cache, LossCache) else LossCache()
    status = service.job_status(None, since_step=cache.last_step)
    job_id = status.get("id")
    if job_id is not None and status.get("kind", "train") != "train":
        return _side_job(service, cache, status)
    fresh = job_id != cache.job
    if fresh:  # another job (or the first poll of this page): fetch its whole series
        cache.reset(job_id)
        if job_id is not None:
            status = service.job_status(job_id, since_step=0)
    elif cache.active and not status.get("active"):
        # It just ended: read the whole series once more, so a point recorded between two reads of one
        # poll (the worker appends the loss and then the validation) is not missing from the final chart.
        status = service.job_status(job_id, since_step=0)
        cache.reset_series()
    cache.name = status.get("name", cache.name)
    ended = job_id is not None and not status.get("active") and status.get("status") != "idle"
    was_active, cache.active = cache.active, bool(status.get("active"))
    grew = cache.add(status.get("losses") or [])
    grew = _extend(cache.val, status.get("validation")) or grew
    lr_grew = _extend(cache.lrs, status.get("learn_rates"))
    norm_grew = _extend(cache.norms, status.get("norms"))
    full = fresh or (was_active and not cache.active)
    view = View(status_text(status, cache), chart_rows(cache, status.get("best_step")) if (grew or full) else None,
                _previews(status, cache), cache, status,
                lr=series_rows(cache.lrs, LR) if (lr_grew or full) else None,
                norms=series_rows(cache.norms, NORM) if (norm_grew or full) else None)
    warnings = tuple(status.get("warnings") or ())
    if fresh or warnings != cache.warnings:
        cache.warnings = warnings
        view.warnings = warnings_html(warnings)
    if fresh and not ended:
        view.result, view.grid = "", ""  # a new run: the last run's result goes
    if ended and not cache.ended:
        cache.ended, cache.result = True, dict(status.get("result") or {})
        view.result = result_text(status)
        view.grid = _existing(cache.result.get("grid"))
        view.snapshots = snapshot_labels(service, status.get("name"))
    return view


def _side_job(service: Any, cache: LossCache, status: dict[str, Any]) -> View:
    """A grid or preprocess job: its status line; the training's charts stay as they are; a finished grid shows."""
    view = View(status_text(status), None, None, cache, status)
    if not status.get("active") and status.get("id") != cache.side:
        cache.side = status.get("id")
        grid = _existing((status.get("result") or {}).get("grid"))
        if status.get("kind") == "grid" and grid:
            view.grid = grid
            view.snapshots = snapshot_labels(service, status.get("name"))
    return view


def _existing(path: str | None) -> str:
    """`path` if that file exists, else "" (gradio raises on a missing image, and in 3.41 that error ends the
    page's poll loop for good; a deleted log folder must not freeze the tab)."""
    return path if path and Path(path).is_file() else ""


def _previews(status: dict[str, Any], cache: LossCache) -> list[tuple[str, str]] | None:
    paths = status.get("previews") or []
    if len(paths) == cache.previews:
        return None
    cache.previews = len(paths)
    # Only files that exist: gradio's Gallery raises on a missing one (a deleted log folder), and in
    # gradio 3.41 an error ends the page's poll loop for good (status and chart freeze).
    shown = [p for p in paths if Path(p).is_file()]
    return [(p, preview_caption(p, status.get("name"))) for p in reversed(shown[-MAX_PREVIEWS:])]


def preview_caption(path: str, name: str | None) -> str:
    """'step 40' for `<name>-40.png`, 'step 40 · prompt 2' for `<name>-40-2.png`; else the file's stem."""
    stem = Path(path).stem
    rest = stem[len(name) + 1:] if name and stem.startswith(f"{name}-") else None
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", rest or "")
    if not match:
        return stem
    step, prompt = match.groups()
    return f"step {step} · prompt {prompt}" if prompt else f"step {step}"


def chart_rows(cache: LossCache, best_step: int | None = None) -> list[tuple[int, float, str]]:
    """The loss chart: raw and smoothed training loss, validation loss, and a vertical line at the best step."""
    stride = max(1, math.ceil(len(cache.raw) / MAX_CHART_POINTS))
    rows = [(s, v, RAW) for s, v in _thin(cache.raw, stride)]
    rows += [(s, v, SMOOTH) for s, v in _thin(cache.smooth, stride)]
    val_stride = max(1, math.ceil(len(cache.val) / MAX_CHART_POINTS))
    rows += [(s, v, VAL) for s, v in _thin(cache.val, val_stride)]
    if best_step is not None and rows:
        values = [v for _, v, _ in rows]
        rows += [(int(best_step), min(values), BEST), (int(best_step), max(values), BEST)]
    return rows


def series_rows(points: Points, series: str) -> list[tuple[int, float, str]]:
    stride = max(1, math.ceil(len(points) / MAX_CHART_POINTS))
    return [(s, v, series) for s, v in _thin(points, stride)]


def _thin(points: Points, stride: int) -> Points:
    out = points[::stride]
    if points and out[-1] is not points[-1]:
        out.append(points[-1])  # always show the latest step
    return out


def warnings_html(warnings: Sequence[str]) -> str:
    """The run's warnings (overtraining, inflated norms, NaN recoveries) as notes with the `tiext-warn` class."""
    return "".join(f"<div class='tiext-note tiext-warn'>⚠ {html.escape(w)}</div>" for w in warnings)


def result_text(status: dict[str, Any]) -> str:
    """The result panel after a run: its message (which names the best step) and what it left."""
    result = status.get("result") or {}
    lines = [result.get("message") or status.get("message") or ""]
    if result.get("best_step") is not None:
        best = f"Best step: {result['best_step']}"
        if result.get("best_val_loss") is not None:
            best += f" (validation loss {result['best_val_loss']:.5f})"
        lines.append(best + ("" if result.get("best_snapshot") else "; no snapshot of it was kept."))
    if result.get("early_stopped"):
        lines.append("Stopped early: the validation loss kept rising while the training loss fell.")
    lines += [f"⚠ {w}" for w in result.get("warnings") or () if w not in (status.get("warnings") or ())]
    if result.get("log_dir"):
        lines.append(f"Logs, snapshots and previews: {result['log_dir']}")
    return "\n".join(line for line in lines if line)


def snapshot_label(snapshot: dict[str, Any]) -> str:
    """'step 400 · val 0.1234 · best · run 20261126-101010' (a snapshot as `Service.snapshots` lists it)."""
    parts = [f"step {snapshot.get('step')}"]
    if snapshot.get("val_loss") is not None:
        parts.append(f"val {snapshot['val_loss']:.4f}")
    if snapshot.get("best"):
        parts.append("best")
    parts.append(f"run {snapshot.get('run')}")
    return " · ".join(parts)


def snapshot_labels(service: Any, name: str | None) -> list[str]:
    """The dropdown's labels for `name`'s snapshots (newest run first); [] when there are none or on error."""
    if not name:
        return []
    try:
        return [snapshot_label(s) for s in service.snapshots(name)]
    except Exception as exc:  # a missing embedding, no snapshots method (fakes), a broken folder
        logger.debug("No snapshots of %s: %s", name, exc)
        return []


def status_text(status: dict[str, Any], cache: LossCache | None = None) -> str:
    """'my-bmw: running · step 120/3000 · loss 0.1234 · val 0.1100 (best step 100) · LR 0.005 · norm 1.8× ·
    0.42 s/step · ETA 0:20:10' + message (val and norm from the page's cached series)."""
    if status.get("id") is None:
        return status.get("message") or "No training has run yet."
    kind = "" if status.get("kind", "train") == "train" else f"{status['kind']} "
    parts = [f"{kind}{status.get('name', '?')}: {status.get('status', '?')}"]
    if status.get("total") is not None:  # file-based jobs (preprocess)
        parts.append(f"{status.get('done') or 0}/{status['total']} file(s)")
    if status.get("step") is not None:
        parts.append(f"step {status['step']}/{status.get('end_step', '?')}")
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if cache is not None and cache.val:
        best = status.get("best_step")
        parts.append(f"val {cache.val[-1][1]:.4f}" + (f" (best step {best})" if best is not None else ""))
    if status.get("learn_rate") is not None:
        parts.append(f"LR {status['learn_rate']:.3g}")
    if cache is not None and cache.norms:
        parts.append(f"norm {cache.norms[-1][1]:.2f}×")
    if status.get("s_per_step"):
        parts.append(f"{status['s_per_step']:.2f} s/step")
    if status.get("active") and status.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(status['eta_s'])}")
    line = " · ".join(parts)
    message = status.get("message") or ""
    return f"{line}\n{message}" if message else line


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
