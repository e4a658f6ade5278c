"""Small stand-ins for the UI tests: a model-free backend (enough to create embeddings) and a
service whose job status is scripted (enough to drive the Train tab's polling)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from textual_inversion_ext.core.backend import ModelInfo
from textual_inversion_ext.service import Service


class StubBackend:
    """Token rows only: `create` needs nothing else; training is never started on it."""

    info = ModelInfo(family="sd1", encoders={"default": 8}, resolution=64, name="stub", short_hash="0123456789")
    device = torch.device("cpu")
    weight_dtype = torch.float32

    def token_rows(self, token_ids):
        return {"default": torch.arange(len(token_ids) * 8, dtype=torch.float32).reshape(len(token_ids), 8)}


def stub_service(root: Path) -> Service:
    backend = StubBackend()
    return Service(backend=lambda: backend, embeddings_dir=root / "embeddings", log_root=root / "logs")


def hold_a_job(service: Service, name: str = "busy") -> threading.Event:
    """Occupy the service's one job slot with a job that waits until the returned event is set."""
    release = threading.Event()

    def work(job) -> dict[str, Any]:
        release.wait(30)
        return {"status": "finished", "message": "done"}

    service.jobs.start("train", name, work)
    return release


SERIES = ("losses", "learn_rates", "validation", "norms")


class ScriptedService:
    """`job_status` answers from a list of job dicts (as `Job.to_dict` makes them), honouring since_step
    like jobs._since; `snapshots(name)` from a dict of lists (as `Service.snapshots` makes them)."""

    def __init__(self, jobs: list[dict[str, Any]] | None = None,
                 snapshots: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.jobs = jobs or []
        self.calls: list[tuple[str | None, int]] = []
        self.snapshot_lists = snapshots or {}

    def job_status(self, job_id: str | None = None, since_step: int = 0) -> dict[str, Any]:
        self.calls.append((job_id, since_step))
        if not self.jobs:
            return {"status": "idle", "active": False, "message": "No training has run yet."}
        job = next(j for j in self.jobs if j["id"] == job_id) if job_id else self.jobs[-1]
        return {**job, **{k: [[s, v] for s, v in job.get(k, []) if s > since_step or since_step == 0]
                          for k in SERIES}}

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        return list(self.snapshot_lists.get(name, []))


def job(job_id: str = "train-1", losses: list[tuple[int, float]] = (), **over: Any) -> dict[str, Any]:
    last = losses[-1] if losses else None
    out = {"id": job_id, "kind": "train", "name": "toy", "status": "running", "active": True, "message": "",
           "step": last[0] if last else None, "end_step": 100, "loss": last[1] if last else None,
           "learn_rate": 0.005, "s_per_step": 0.5, "eta_s": 3725.0, "losses": [list(p) for p in losses],
           "previews": [], "result": {}, "learn_rates": [], "validation": [], "norms": [], "warnings": [],
           "best_step": None}
    out.update(over)
    return out
