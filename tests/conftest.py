from __future__ import annotations

from pathlib import Path

import pytest

from textual_inversion_ext.demo import make_sample_dataset


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
