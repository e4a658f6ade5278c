from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from textual_inversion_ext.demo import make_sample_dataset
from textual_inversion_ext.service import Service


def _usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's
    `cpu.max`), which `os.cpu_count()` does not see."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity is the limit
    return cpus


# `make test` runs two pytest-xdist workers; torch's default of one thread per CPU in each of them
# oversubscribes the cores (measured on 2 cores: 93 s with the default, 38 s with the share).
torch.set_num_threads(max(1, _usable_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _captioner_registry():
    """Each test sees the registry as it was (host glue tests register the host's captioners)."""
    from textual_inversion_ext.core.data import captioners

    saved = dict(captioners._REGISTRY)
    yield
    captioners._REGISTRY.clear()
    captioners._REGISTRY.update(saved)


@pytest.fixture(scope="session")
def tiny_backend():
    from textual_inversion_ext.backends.standalone import embedded_default

    return embedded_default("tiny", device="cpu")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's six captioned images, small so encoding is quick."""
    folder = tmp_path_factory.mktemp("demo-data")
    make_sample_dataset(folder, size=96, seed=0)
    return folder


@pytest.fixture
def service(tiny_backend, tmp_path) -> Service:
    """A standalone Service on the tiny model with fresh folders."""
    return Service(backend=lambda: tiny_backend, embeddings_dir=tmp_path / "embeddings", log_root=tmp_path / "logs")
