"""What the Train tab shows of a job, computed from `Service.job_status()` on each poll (no gradio).

Polling (rather than a stream tied to the Train click) is what lets a reloaded page re-attach to a
running job. Each page keeps a small cache of the loss series so a poll only fetches new steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Per-step TI loss is noisy: the chart adds an exponential moving average (bias-corrected, so the
# first steps are not pulled towards 0) over about this many steps.
EMA_SPAN = 25
# Points per series sent to the browser on each update; longer runs are thinned evenly.
MAX_CHART_POINTS = 1000
MAX_PREVIEWS = 12
RAW, SMOOTH = "loss", f"average ({EMA_SPAN} steps)"


@dataclass
class LossCache:
    """One page's copy of the current job's loss series (kept in a gr.State).

    Updated in place: gradio 3.41 runs an `every=` event as one loop that passes the same input
    objects on each tick, so only mutations of the session's State object carry over.
    """

    job: str | None = None
    raw: list[tuple[int, float]] = field(default_factory=list)
    smooth: list[tuple[int, float]] = field(default_factory=list)
    ema: float = 0.0
    weight: float = 0.0  # sum of EMA weights so far, for the bias correction
    previews: int = -1  # how many preview paths the page shows; -1 = none sent yet

    def reset(self, job: str | None) -> None:
        self.job, self.raw, self.smooth, self.ema, self.weight, self.previews = job, [], [], 0.0, 0.0, -1

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


@dataclass
class View:
    status: str  # the status line(s)
    chart: list[tuple[int, float, str]] | None  # (step, loss, series) rows; None = unchanged
    previews: list[tuple[str, str]] | None  # (path, caption), newest first; None = unchanged
    cache: LossCache
    job: dict[str, Any] = field(default_factory=dict)  # the status polled (the Preprocess tab reads it too)


def poll(service: Any, cache: LossCache | None) -> View:
    """Read the current (or last) job and say what changed since this page's last poll (updates `cache`)."""
    cache = cache if isinstance(cache, LossCache) else LossCache()
    status = service.job_status(None, since_step=cache.last_step)
    job_id = status.get("id")
    fresh = job_id != cache.job
    if fresh:  # another job (or the first poll of this page): fetch its whole series
        cache.reset(job_id)
        if job_id is not None:
            status = service.job_status(job_id, since_step=0)
    grew = cache.add(status.get("losses") or [])
    chart = chart_rows(cache) if (grew or fresh) else None
    paths = status.get("previews") or []
    previews = None
    if len(paths) != cache.previews:
        cache.previews = len(paths)
        # Only files that exist: gradio's Gallery raises on a missing one (a deleted log folder), and in
        # gradio 3.41 an error ends the page's poll loop for good (status and chart freeze).
        shown = [p for p in paths if Path(p).is_file()]
        previews = [(p, Path(p).stem) for p in reversed(shown[-MAX_PREVIEWS:])]
    return View(status_text(status), chart, previews, cache, status)


def chart_rows(cache: LossCache) -> list[tuple[int, float, str]]:
    stride = max(1, math.ceil(len(cache.raw) / MAX_CHART_POINTS))
    rows = [(s, v, RAW) for s, v in _thin(cache.raw, stride)]
    rows += [(s, v, SMOOTH) for s, v in _thin(cache.smooth, stride)]
    return rows


def _thin(points: list[tuple[int, float]], stride: int) -> list[tuple[int, float]]:
    out = points[::stride]
    if points and out[-1] is not points[-1]:
        out.append(points[-1])  # always show the latest step
    return out


def status_text(status: dict[str, Any]) -> str:
    """'my-bmw: running · step 120/3000 · loss 0.1234 · LR 0.005 · 0.42 s/step · ETA 0:20:10' + message."""
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
    if status.get("learn_rate") is not None:
        parts.append(f"LR {status['learn_rate']:.3g}")
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
