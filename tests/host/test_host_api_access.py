"""Our REST routes' exposure in the real host: a folder argument outside the allowed folders (also through
`..` or a symlink) is refused with a 403 that names the setting, write routes follow the launch flags
(refused when reachable beyond loopback without --api-auth), and the package serves no debug routes."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from textual_inversion_ext.api_access import exposure_refusal

from .conftest import allow_folder
from .test_host_training import tiext


@pytest.fixture(scope="module")
def outside():
    """A dataset in the system temp folder itself: outside the host's folders and this session's root."""
    folder = Path(tempfile.mkdtemp(prefix="tiext-outside-"))
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 20)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a green square")
    (folder / "template.txt").write_text("a photo of [name]\n")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def escapes(outside, dataset):
    """The outside folder named directly, through `..` from an allowed folder, and through a symlink in one."""
    link = dataset.parent / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    yield {"outside": str(outside), "dotdot": f"{dataset}/{os.path.relpath(outside, dataset)}",
           "symlink": str(link)}
    link.unlink()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# (method, route, body with PATH for the path and DATA for an allowed dataset, leaf under PATH)
CASES = {
    "train.data_dir": ("POST", "/train", {"name": "x", "data_dir": "PATH"}, ""),
    "train.template": ("POST", "/train", {"name": "x", "data_dir": "DATA", "template": "PATH"}, "template.txt"),
    "preprocess.source": ("POST", "/preprocess", {"source": "PATH"}, ""),
    "preprocess.destination": ("POST", "/preprocess", {"source": "DATA", "destination": "PATH"}, "out"),
    "check.folder": ("POST", "/check", {"folder": "PATH"}, ""),
    "captions.folder": ("GET", "/captions", {"folder": "PATH"}, ""),
    "captions/edit.folder": ("POST", "/captions/edit", {"folder": "PATH", "op": "append", "text": "x"}, ""),
    "captions/tags.folder": ("GET", "/captions/tags", {"folder": "PATH"}, ""),
    "promote.snapshot": ("POST", "/promote", {"name": "x", "snapshot": "PATH"}, "0.png"),
    "grid.log_dir": ("POST", "/grid", {"name": "x", "log_dir": "PATH"}, ""),
    "create/hints.template": ("POST", "/create/hints", {"name": "x", "template": "PATH"}, "template.txt"),
}


def writes_refused(host_api) -> str | None:
    return exposure_refusal(SimpleNamespace(**host_api.call("GET", "/sdapi/v1/cmd-flags")))


@pytest.mark.parametrize("escape", ["outside", "dotdot", "symlink"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_folders_outside_the_allowed_ones_are_refused(host_api, dataset, outside, escapes, case, escape):
    method, route, body, leaf = CASES[case]
    path = f"{escapes[escape]}/{leaf}" if leaf else escapes[escape]
    body = {k: path if v == "PATH" else str(dataset) if v == "DATA" else v for k, v in body.items()}
    before = files(outside)
    if method == "GET":
        status, reply = tiext(host_api, "GET", f"{route}?{urllib.parse.urlencode(body)}")
    else:
        status, reply = tiext(host_api, "POST", route, body)
    assert status == 403, reply
    refusal = writes_refused(host_api)
    if refusal and method == "POST" and route not in ("/check", "/create/hints"):
        assert reply["error"] == refusal  # refused before its folders are even looked at
    else:
        assert "is outside the folders this API may use" in reply["error"] and "tiext_api_roots" in reply["error"]
    assert files(outside) == before and not tiext(host_api, "GET", "/jobs/current")[1].get("active")


def test_allowed_folders_work_and_the_setting_applies_at_once(host_api, host_dir, dataset, outside):
    assert tiext(host_api, "POST", "/check", {"folder": str(dataset), "width": 64, "height": 64})[0] == 200
    allow_folder(host_api, host_dir, outside)
    try:
        status, report = tiext(host_api, "POST", "/check", {"folder": str(outside), "width": 64, "height": 64})
        assert status == 200 and report["summary"].startswith("2 usable images"), report
    finally:
        allow_folder(host_api, host_dir, outside, allow=False)
    assert tiext(host_api, "POST", "/check", {"folder": str(outside)})[0] == 403


def test_write_routes_follow_the_launch_flags(host_api):
    flags = host_api.call("GET", "/sdapi/v1/cmd-flags")
    assert flags["api"]  # our routes answer: the lab runs with --api (without it they are not registered)
    refusal = writes_refused(host_api)
    status, reply = tiext(host_api, "POST", "/interrupt", {})
    if refusal:  # e.g. WEBUI_EXTRA_ARGS=--listen
        assert (status, reply) == (403, {"error": refusal})
        assert tiext(host_api, "POST", "/create", {"name": "tiext-refused"})[0] == 403
    else:
        assert status == 200, reply
    assert tiext(host_api, "GET", "/version")[0] == 200  # reading works either way


def test_routes_need_the_api_password_when_set(host_api):
    """With --api-auth our routes are behind the host's basic auth, like /sdapi (WEBUI_API_AUTH to run)."""
    if not host_api.call("GET", "/sdapi/v1/cmd-flags")["api_auth"]:
        pytest.skip("the host runs without --api-auth")
    for method, route in (("GET", "/version"), ("POST", "/interrupt")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            host_api.call(method, f"/textual-inversion-ext/v1{route}", {} if method == "POST" else None, auth=False)
        assert refused.value.code == 401
        assert tiext(host_api, method, route, {} if method == "POST" else None)[0] == 200


def test_no_debug_routes_in_the_package(host_api):
    assert tiext(host_api, "GET", "/debug/model")[0] == 404
    assert tiext(host_api, "POST", "/debug/fail", {"after": 1})[0] == 404
