from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def run_install(monkeypatch, installed: set[str]) -> list[str]:
    calls: list[str] = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL), run_name="__main__")
    return calls


def test_nothing_installed_when_the_host_has_everything(monkeypatch):
    assert run_install(monkeypatch, {"safetensors", "open_clip_torch", "PIL"}) == []


def test_only_missing_packages_and_never_the_hosts_pins(monkeypatch):
    calls = run_install(monkeypatch, {"PIL"})
    assert len(calls) == 2 and all(c.startswith("install ") for c in calls)
    assert any("safetensors" in c for c in calls) and any("open_clip_torch" in c for c in calls)
    for pinned in ("torch", "torchvision", "gradio", "transformers"):
        assert not any(f'"{pinned}' in c for c in calls)
