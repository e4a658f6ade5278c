from __future__ import annotations

from pathlib import Path

import pytest

from textual_inversion_ext.demo import make_sample_dataset
from textual_inversion_ext.service import Service


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
