"""Real-host tests: they run only when WEBUI_DIR points at an A1111 install (see ../shared/host-lab) or a Forge
(tests/host/forge) whose API answers at WEBUI_URL (default http://127.0.0.1:7860, Forge 7870; started with --api;
WEBUI_API_AUTH=user:pass when it was started with --api-auth)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

WEBUI_DIR = os.environ.get("WEBUI_DIR")
# Which host WEBUI_DIR is: Forge (lllyasviel/stable-diffusion-webui-forge, tests/host/forge) or A1111. A test module
# says where it runs with `HOSTS = (...)`; without it, A1111 only.
HOST_KIND = "forge" if WEBUI_DIR and (Path(WEBUI_DIR) / "modules_forge").is_dir() else "a1111"
DEFAULT_PORT = {"a1111": 7860, "forge": 7870}[HOST_KIND]  # the two labs' ports
WEBUI_URL = os.environ.get("WEBUI_URL", f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")
WEBUI_API_AUTH = os.environ.get("WEBUI_API_AUTH", "")
# Browser tests drive the system Chromium through Playwright (never a downloaded browser).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    # One host, one training job at a time: under pytest-xdist (`--dist loadgroup`) all of them run on one worker.
    marker = (pytest.mark.xdist_group("real-host") if WEBUI_DIR else
              pytest.mark.skip(reason="needs the real A1111 host: set WEBUI_DIR (see ../shared/host-lab)"))
    for item in items:
        if "tests/host/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(marker)
            hosts = getattr(item.module, "HOSTS", ("a1111",))
            if WEBUI_DIR and HOST_KIND not in hosts:
                item.add_marker(pytest.mark.skip(reason=f"runs in {' and '.join(hosts)}; WEBUI_DIR is {HOST_KIND}"))


class HostApi:
    def __init__(self, base: str, auth: str = "") -> None:
        self.base = base
        self.auth = auth  # "user:pass" for a host started with --api-auth

    def call(self, method: str, path: str, body: object | None = None, timeout: float = 600,
             auth: bool = True) -> object:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.auth and auth:
            headers["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text else None


@pytest.fixture(scope="session")
def host_dir() -> Path:
    return Path(WEBUI_DIR)


@pytest.fixture(scope="session")
def host_api(host_dir, tmp_path_factory) -> HostApi:
    """The host's API, with this session's temporary folders added to the extension's allowed API folders
    (tiext_api_roots) until the session ends: the datasets live there."""
    api = HostApi(WEBUI_URL, WEBUI_API_AUTH)
    try:
        api.call("GET", "/sdapi/v1/sd-models", timeout=10)
    except (urllib.error.URLError, OSError) as exc:
        pytest.fail(f"WEBUI_DIR is set but the host's API does not answer at {WEBUI_URL} ({exc}); "
                    "start it (host-lab: ./start.sh) or set WEBUI_URL.")
    root = session_root(tmp_path_factory)
    allow_folder(api, host_dir, root)
    yield api
    allow_folder(api, host_dir, root, allow=False)


API_ROOTS = "tiext_api_roots"


def allow_folder(api: HostApi, host_dir: Path, folder: Path, allow: bool = True) -> None:
    """Add `folder` to (or remove it from) tiext_api_roots, leaving other entries alone: another test
    session may be using the host at the same time, with its own folder there."""
    entries = [e for e in str(saved_option(host_dir, API_ROOTS, "")).split(";") if e.strip() and e != str(folder)]
    api.call("POST", "/sdapi/v1/options", {API_ROOTS: ";".join(entries + [str(folder)] * allow)})


def saved_option(host_dir: Path, key: str, default: object) -> object:
    """An option as the host saved it (GET /sdapi/v1/options leaves out options added by extensions)."""
    config = host_dir / "config.json"
    return json.loads(config.read_text()).get(key, default) if config.is_file() else default


def session_root(tmp_path_factory) -> Path:
    """The folder holding this session's temporary folders (allowed for the API by `host_api`)."""
    return tmp_path_factory.getbasetemp().resolve()


FAULTS_LINK = "cd ../shared/host-lab && ./ext.sh link \"$PWD/tests/host/fault_ext\" tiext-test-faults, then restart"


@pytest.fixture(scope="session")
def faults(host_api) -> HostApi:
    """The test-only extension tests/host/fault_ext (fault injection, model state); skips without it."""
    try:
        host_api.call("GET", "/tiext-test/model", timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            pytest.skip(f"the test-only extension is not linked into the host: {FAULTS_LINK}")
        raise
    return host_api


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


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def open_page(browser, before_load: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """The host's page, loaded and rendered; `before_load(page)` runs before it navigates (to see the
    websockets the page opens while loading, e.g. gradio 3's `every=` polling loop)."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        if before_load is not None:
            before_load(page)
        # Not "networkidle": gradio 4 (Forge) keeps a heartbeat request open, so the network never idles.
        page.goto(WEBUI_URL + "/", wait_until="load", timeout=120_000)
        # gradio renders the app from its config after the load event: wait for the app root, then the
        # host's own first control.
        page.wait_for_selector("gradio-app", state="attached", timeout=120_000)
        page.wait_for_selector("#txt2img_prompt textarea", state="attached", timeout=120_000)
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, host_api):
    with open_page(browser) as page:
        yield page


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: TIEXT_SCREENSHOTS (e.g. docs/screenshots) or a temporary folder."""
    configured = os.environ.get("TIEXT_SCREENSHOTS")
    folder = Path(configured) if configured else tmp_path_factory.mktemp("tiext-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stop_job_and_remove_logs(api: HostApi, job_id: str) -> str | None:
    """Interrupt a test's job if it still runs (waiting up to 2 min), delete its log folder, return it."""
    v1 = "/textual-inversion-ext/v1"
    job = api.call("GET", f"{v1}/jobs/{job_id}")
    if job["active"]:
        api.call("POST", f"{v1}/interrupt", {})
        deadline = time.time() + 120
        while job["active"] and time.time() < deadline:
            time.sleep(0.5)
            job = api.call("GET", f"{v1}/jobs/{job_id}")
    log_dir = (job.get("result") or {}).get("log_dir")
    if log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    return log_dir


SDXL_CHECKPOINT = "tiny-sdxl.safetensors"  # host-lab: SDXL=1 ./build.sh


@contextlib.contextmanager
def checkpoint_loaded(api: HostApi, filename: str) -> Iterator[str]:
    """Switch the host to the checkpoint `filename` (through its API, no restart) for the block, then back to
    the one that was loaded. Skips when the host does not have it. Yields its title."""
    titles = {m["filename"].replace("\\", "/").rsplit("/", 1)[-1]: m["title"]
              for m in api.call("GET", "/sdapi/v1/sd-models")}
    if filename not in titles:
        pytest.skip(f"the host has no {filename} (host-lab: SDXL=1 ./build.sh)")
    before = api.call("GET", "/sdapi/v1/options")["sd_model_checkpoint"]
    api.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": titles[filename]})
    try:
        yield titles[filename]
    finally:
        api.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": before})


@pytest.fixture(scope="module")
def sdxl_host(host_api) -> Iterator[HostApi]:
    """The host with the tiny SDXL checkpoint loaded for the module; the previous checkpoint afterwards."""
    with checkpoint_loaded(host_api, SDXL_CHECKPOINT):
        yield host_api


def server_rss_mb(host_dir: Path) -> float | None:
    """The web UI server's resident memory (MB), from the pid file both labs' start.sh write (`<lab>/run/webui.pid`
    beside `<lab>/webui`); None when there is none (a host started otherwise)."""
    pid_file = host_dir.parent / "run" / "webui.pid"
    try:
        status = Path(f"/proc/{int(pid_file.read_text().strip())}/status").read_text()
    except (OSError, ValueError):
        return None
    rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(rss[0]) / 1024 if rss else None
