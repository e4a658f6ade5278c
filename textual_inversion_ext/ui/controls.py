"""Which control each declared parameter gets, and the way back from control values to parameters.

Pure data (no gradio): `blocks.py` turns a `ControlSpec` into a component with one generic builder,
so a field added to `TrainParams` (or `CreateParams`) shows up in the UI without a UI change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.params import FieldInfo, ParameterError, fields_of, from_record

# A bounded int becomes a slider only when it has few positions (max steps 1…1e6 would be unusable).
MAX_SLIDER_POSITIONS = 2048
# Two or three choices fit as radio buttons; more go into a dropdown.
MAX_RADIO_CHOICES = 3
MAIN = "main"
# UI-only hints for a few text fields (the declaration stays UI-agnostic): how many lines a box gets, and the
# fields whose choices come from the loaded model at page load (a dropdown that also takes typed values).
TEXT_LINES = {"preview_prompt": 3, "preview_negative": 2}
MODEL_CHOICES = {"preview_sampler"}


@dataclass(frozen=True)
class ControlSpec:
    name: str  # the parameter's field name
    kind: str  # checkbox | radio | dropdown | slider | number | textbox
    label: str
    info: str
    default: Any
    section: str
    elem_id: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    precision: int | None = None  # 0 for whole numbers (gr.Number)
    lines: int = 1  # textbox lines
    custom: bool = False  # dropdown: typed values allowed (its choices come from the model, at page load)


def control_spec(info: FieldInfo, prefix: str) -> ControlSpec:
    spec = info.spec
    common = {"name": info.name, "label": spec.label, "info": spec.help, "default": info.default,
              "section": spec.section, "elem_id": f"{prefix}{info.name}"}
    if info.type is bool:
        return ControlSpec(kind="checkbox", **common)
    if spec.choices is not None:
        kind = "radio" if len(spec.choices) <= MAX_RADIO_CHOICES else "dropdown"
        return ControlSpec(kind=kind, choices=tuple(spec.choices), **common)
    if info.type in (int, float):
        whole = info.type is int
        bounded = spec.minimum is not None and spec.maximum is not None
        step = spec.step or (1 if whole else _float_step(spec.minimum, spec.maximum) if bounded else None)
        if bounded and (not whole or (spec.maximum - spec.minimum) / step <= MAX_SLIDER_POSITIONS):
            return ControlSpec(kind="slider", minimum=spec.minimum, maximum=spec.maximum, step=step, **common)
        return ControlSpec(kind="number", minimum=spec.minimum, maximum=spec.maximum, step=step,
                           precision=0 if whole else None, **common)
    if info.name in MODEL_CHOICES:
        return ControlSpec(kind="dropdown", custom=True, **common)
    return ControlSpec(kind="textbox", lines=TEXT_LINES.get(info.name, 1), **common)


def _float_step(lo: float, hi: float) -> float:
    """A round step giving ~100–1000 slider positions (1…30 → 0.1, 0…1 → 0.01)."""
    return 10.0 ** math.floor(math.log10((hi - lo) / 100)) if hi > lo else 1.0


def control_specs(cls: type, prefix: str) -> list[ControlSpec]:
    return [control_spec(info, prefix) for info in fields_of(cls)]


def by_section(specs: Sequence[ControlSpec]) -> dict[str, list[ControlSpec]]:
    """Specs grouped by section, "main" first, the others in declaration order."""
    groups: dict[str, list[ControlSpec]] = {MAIN: []}
    for spec in specs:
        groups.setdefault(spec.section, []).append(spec)
    if not groups[MAIN]:
        del groups[MAIN]
    return groups


def section_title(section: str) -> str:
    return section.replace("_", " ").capitalize()


def params_from_values(cls: type, specs: Sequence[ControlSpec], values: Sequence[Any]) -> Any:
    """The parameters object for the controls' values (in `specs` order); ParameterError if invalid."""
    if len(values) != len(specs):
        raise ValueError(f"{len(values)} values for {len(specs)} controls")
    record = {}
    for spec, value in zip(specs, values):
        record[spec.name] = _coerce(spec, value, _field_type(cls, spec.name))
    return from_record(cls, record)


def values_of(obj: Any, specs: Sequence[ControlSpec]) -> list[Any]:
    """Inverse of `params_from_values`: the control values showing `obj`."""
    return [getattr(obj, spec.name) for spec in specs]


def values_of_record(cls: type, specs: Sequence[ControlSpec], record: dict[str, Any]) -> list[Any]:
    """The control values showing a parameters record (e.g. a loaded preset); validated, ParameterError if not."""
    return values_of(from_record(cls, dict(record)), specs)


def _field_type(cls: type, name: str) -> type:
    return next(info.type for info in fields_of(cls) if info.name == name)


def _coerce(spec: ControlSpec, value: Any, kind: type) -> Any:
    """Gradio hands numbers back as floats (or None when a box is cleared); make them the field's type."""
    if kind is bool:
        return bool(value)
    if kind is str:
        if value is None and spec.choices:
            raise ParameterError(f"{spec.label}: choose one of {', '.join(map(str, spec.choices))}.")
        return "" if value is None else str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ParameterError(f"{spec.label}: enter a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{spec.label}: {value!r} is not a number.") from None
    if kind is int:
        if not number.is_integer():
            raise ParameterError(f"{spec.label}: {value} is not a whole number.")
        return int(number)
    return number
