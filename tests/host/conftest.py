"""Real-host tests: they run only when WEBUI_DIR points at an A1111 install (see ../shared/host-lab)
whose API answers at WEBUI_URL (default http://127.0.0.1:7860, started with --api)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

WEBUI_DIR = os.environ.get("WEBUI_DIR")
WEBUI_URL = os.environ.get("WEBUI_URL", "http://127.0.0.1:7860").rstrip("/")


def pytest_collection_modifyitems(config, items):
    if WEBUI_DIR:
        return
    skip = pytest.mark.skip(reason="needs the real A1111 host: set WEBUI_DIR (see ../shared/host-lab)")
    for item in items:
        if "tests/host/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


class HostApi:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, body: object | None = None, timeout: float = 600) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text else None


@pytest.fixture(scope="session")
def host_dir() -> Path:
    return Path(WEBUI_DIR)


@pytest.fixture(scope="session")
def host_api() -> HostApi:
    api = HostApi(WEBUI_URL)
    try:
        api.call("GET", "/sdapi/v1/sd-models", timeout=10)
    except (urllib.error.URLError, OSError) as exc:
        pytest.fail(f"WEBUI_DIR is set but the host's API does not answer at {WEBUI_URL} ({exc}); "
                    "start it (host-lab: ./start.sh) or set WEBUI_URL.")
    return api


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four captioned 64 px images (a coloured circle each) to train on in the host."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("tiext-host-data")
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        img = Image.new("RGB", (64, 64), (20 * i, 40, 90))
        ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill=colour)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} circle")
    return folder
