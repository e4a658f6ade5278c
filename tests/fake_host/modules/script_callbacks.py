from __future__ import annotations

from collections.abc import Callable

registered: dict[str, list[Callable]] = {"ui_settings": [], "app_started": [], "ui_tabs": []}


def on_ui_settings(callback: Callable) -> None:
    registered["ui_settings"].append(callback)


def on_app_started(callback: Callable) -> None:
    registered["app_started"].append(callback)


def on_ui_tabs(callback: Callable) -> None:
    registered["ui_tabs"].append(callback)
