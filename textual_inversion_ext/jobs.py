"""Background jobs (training, preprocessing) that outlive the request that started them.

One job runs at a time, in a worker thread; the UI and the API poll its status (so closing the
page never stops training and a reload re-attaches). A host plugs in its GPU lock and progress
state through `HostHooks`; standalone uses the defaults.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .core.errors import TIError
from .core.training.metrics import Progress

logger = logging.getLogger(__name__)


class BusyError(TIError):
    """A second training job while one runs."""


@dataclass
class HostHooks:
    """How a host sees a job: its GPU lock, and its progress/interrupt state (A1111: shared.state)."""

    lock: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    begin: Callable[[str, int], None] = lambda job_id, total: None
    update: Callable[[int, int, str], None] = lambda step, total, text: None
    host_interrupted: Callable[[], bool] = lambda: False
    end: Callable[[], None] = lambda: None


@dataclass
class Job:
    id: str
    kind: str  # "train" | "preprocess"
    name: str  # the embedding (train) or the source folder's name (preprocess)
    status: str = "queued"  # queued | running | finished | interrupted | nan | error
    message: str = ""
    progress: Progress | None = None  # training only
    # Generic progress for the other kinds (files done of total); training reports through `progress`.
    done: int | None = None
    total: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    # Training series for the live chart and health display, (step, value) each.
    learn_rates: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    norms: list[tuple[int, float]] = field(default_factory=list)  # largest vector norm / vocabulary median
    norm_ratios: list[float] = field(default_factory=list)  # the latest, per vector
    warnings: list[str] = field(default_factory=list)
    best_step: int | None = None
    previews: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    stage: str = ""  # "grid" while a training job renders its comparison grid (the embedding is saved by then)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def shown_message(self) -> str:
        """`message`, or the interrupt note while a stopped job winds down. Derived rather than written by
        `interrupt()`, so no other thread races the runner's writes (a late interrupt cannot overwrite the
        final message) and the host's Interrupt button shows the same note."""
        if self.active and self.stop.is_set():
            if self.kind == "grid" or self.stage == "grid":
                return "Stopping the comparison grid at the next sampling step (the embedding is already saved)…"
            return ("Interrupting: the current step finishes, then the embedding is saved…" if self.kind == "train"
                    else "Interrupting: the files in progress finish first…")
        return self.message

    def to_dict(self, since_step: int = 0) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id, "kind": self.kind, "name": self.name, "status": self.status,
            "active": self.active, "message": self.shown_message(),
            "step": p.step if p else None, "end_step": p.end_step if p else None,
            "loss": p.loss if p else None, "learn_rate": p.learn_rate if p else None,
            "s_per_step": p.s_per_step if p else None, "eta_s": p.eta_s if p else None,
            "losses": _since(self.losses, since_step), "learn_rates": _since(self.learn_rates, since_step),
            "validation": _since(self.validation, since_step), "norms": _since(self.norms, since_step),
            "norm_ratios": list(self.norm_ratios), "warnings": list(self.warnings), "best_step": self.best_step,
            "previews": list(self.previews), "snapshots": list(self.snapshots), "result": dict(self.result),
            "done": self.done, "total": self.total,
            "started": self.started, "finished": self.finished,
        }


def _since(series: list[tuple[int, float]], step: int) -> list[list[float]]:
    """The points after `step`; 0 = all of them (the validation loss is also measured at step 0)."""
    return [[s, v] for s, v in series if s > step or step == 0]


class JobManager:
    """Runs at most one job at a time; keeps the last few for status queries."""

    def __init__(self, hooks: HostHooks | None = None, keep: int = 16) -> None:
        self.hooks = hooks or HostHooks()
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._guard = threading.Lock()
        self._ids = itertools.count(1)

    def current(self) -> Job | None:
        with self._guard:
            return next((j for j in self._jobs.values() if j.active), None)

    def get(self, job_id: str) -> Job:
        with self._guard:
            if job_id not in self._jobs:
                raise TIError(f"No job {job_id!r}; it may be older than the last {self.keep} jobs.")
            return self._jobs[job_id]

    def latest(self) -> Job | None:
        with self._guard:
            return next(reversed(self._jobs.values()), None)

    def is_training(self, name: str) -> bool:
        job = self.current()
        return job is not None and job.kind == "train" and job.name == name

    def start(self, kind: str, name: str, work: Callable[[Job], dict[str, Any]], message: str = "") -> Job:
        """Run `work(job)` in a worker thread; it returns the result dict or raises. `message`: the job's
        first status (e.g. what it will cost), there before the worker runs."""
        with self._guard:
            running = next((j for j in self._jobs.values() if j.active), None)
            if running is not None:
                doing = "is training" if running.kind == "train" else f"is running ({running.kind})"
                raise BusyError(f"'{running.name}' {doing} (job {running.id}); interrupt it or wait.")
            job = Job(id=f"{kind}-{next(self._ids)}-{int(time.time())}", kind=kind, name=name, message=message)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.pop(next(iter(self._jobs)))
        thread = threading.Thread(target=self._run, args=(job, work), name=f"tiext-{job.id}", daemon=True)
        thread.start()
        return job

    def interrupt(self, job_id: str | None = None) -> Job | None:
        """Ask the job to stop; only the stop flag is set here, the runner owns the job's fields."""
        job = self.get(job_id) if job_id else self.current()
        if job is not None:
            with self._guard:  # a job that has ended keeps its final status and message
                if job.active:
                    job.stop.set()
        return job

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        try:
            with self.hooks.lock():
                self._run_locked(job, work)
        except Exception as exc:  # the host's lock or end hook failed: the job must still end
            self._fail(job, exc)

    def _run_locked(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        hooks = self.hooks
        with self._guard:
            job.status = "running"
        try:
            hooks.begin(job.id, 0)  # inside the try: a raising host hook ends the job instead of wedging it
            with self._watch_host_interrupt(job):
                result = work(job) or {}
            with self._guard:
                job.result = result
                job.status = result.get("status", "finished")
                job.message = result.get("message", job.message)
                job.finished = time.time()
        except Exception as exc:  # reported to the user through the status, not lost
            self._fail(job, exc)
        finally:
            hooks.end()

    def _fail(self, job: Job, exc: Exception) -> None:
        logger.error("Job %s failed:\n%s", job.id, traceback.format_exc())
        with self._guard:
            if job.finished is not None:  # it had ended (e.g. the end hook raised after it): keep its outcome
                return
            job.status = "error"
            job.message = str(exc) if isinstance(exc, TIError) else f"{type(exc).__name__}: {exc}"
            job.finished = time.time()

    @contextlib.contextmanager
    def _watch_host_interrupt(self, job: Job) -> Iterator[None]:
        """Forward the host's Interrupt button (polled) to the job's stop flag."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.25):
                if self.hooks.host_interrupted():
                    job.stop.set()
                    return

        watcher = threading.Thread(target=watch, name=f"tiext-watch-{job.id}", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
