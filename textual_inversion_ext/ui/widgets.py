"""Gradio controls built from declared parameters (`controls.ControlSpec`), and chart frames."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from .controls import MAIN, ControlSpec, by_section, section_title

CHART_COLUMNS = ["step", "loss", "series"]
HEALTH_COLUMNS = ["step", "value", "series"]  # the learning-rate and norm-ratio charts


def build_control(spec: ControlSpec) -> Any:
    """The one builder every declared parameter goes through."""
    common = {"label": spec.label, "info": spec.info, "value": spec.default, "elem_id": spec.elem_id}
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "radio":
        return gr.Radio(choices=list(spec.choices or ()), **common)
    if spec.kind == "dropdown":
        custom = {"allow_custom_value": True} if spec.custom else {}
        return gr.Dropdown(choices=list(spec.choices or ()), **custom, **common)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, **common)
    if spec.kind == "number":
        bounds = {k: v for k, v in (("minimum", spec.minimum), ("maximum", spec.maximum), ("step", spec.step))
                  if v is not None}
        return gr.Number(precision=spec.precision, **bounds, **common)
    if spec.kind == "textbox":
        return gr.Textbox(lines=spec.lines, **common)
    raise ValueError(f"no control for kind {spec.kind!r} ({spec.name})")


def build_controls(specs: Sequence[ControlSpec], skip_main: bool = False,
                   extras: dict[str, Callable[[], None]] | None = None) -> dict[str, Any]:
    """Controls grouped by section: "main" inline, the others in closed accordions. Two per row.
    `extras`: per section, a function adding more components at the section's top (e.g. a tool button)."""
    out: dict[str, Any] = {}
    extras = extras or {}
    for section, group in by_section(specs).items():
        if section == MAIN and skip_main:
            continue
        if section == MAIN:
            extras.get(section, lambda: None)()
            _rows(group, out)
        else:
            with gr.Accordion(section_title(section), open=False, elem_id=f"{group[0].elem_id}_section"):
                extras.get(section, lambda: None)()
                _rows(group, out)
    return out


def _rows(specs: Sequence[ControlSpec], out: dict[str, Any]) -> None:
    row: list[ControlSpec] = []
    for spec in specs:
        if spec.lines > 1:  # a multi-line box gets a row of its own
            _row(row, out)
            _row([spec], out)
            row = []
            continue
        row.append(spec)
        if len(row) == 2:
            _row(row, out)
            row = []
    _row(row, out)


def _row(specs: Sequence[ControlSpec], out: dict[str, Any]) -> None:
    if specs:
        with gr.Row():
            for spec in specs:
                out[spec.name] = build_control(spec)


def frame(rows: list[tuple[int, float, str]], columns: Sequence[str] = CHART_COLUMNS) -> Any:
    import pandas as pd  # a gradio dependency in both versions; imported only when a chart is drawn

    return pd.DataFrame(rows, columns=list(columns))
