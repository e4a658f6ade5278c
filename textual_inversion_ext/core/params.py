"""Each operation's parameters, declared once.

A parameter is a dataclass field made with `param(...)`: default, bounds/choices, label and help.
The CLI flags (`add_arguments`), validation (`validate`), the JSON run record (`to_record`), the
Gradio controls (`ui/controls.py`) and the API schema (`json_schema`) are all derived from these fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import TIError


class ParameterError(TIError, ValueError):
    """A parameter value outside its bounds or choices."""


@dataclass(frozen=True)
class ParamSpec:
    label: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    step: float | None = None  # UI slider granularity
    section: str = "main"  # groups controls in the UI and --help


def param(
    default: Any,
    label: str,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[Any, ...] | None = None,
    step: float | None = None,
    section: str = "main",
) -> Any:
    spec = ParamSpec(label, help, minimum, maximum, choices, step, section)
    return dataclasses.field(default=default, metadata={"param": spec})


@dataclass(frozen=True)
class FieldInfo:
    name: str
    type: type
    default: Any
    spec: ParamSpec

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def fields_of(cls: type) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("param")
        if spec is None:
            continue
        out.append(FieldInfo(f.name, _base_type(hints[f.name]), f.default, spec))
    return out


def _base_type(tp: Any) -> type:
    """`int | None` → int; plain types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def validate(obj: Any) -> None:
    """Raise ParameterError naming the first parameter outside its bounds or choices."""
    for info in fields_of(type(obj)):
        value = getattr(obj, info.name)
        spec = info.spec
        if spec.choices is not None and value not in spec.choices:
            choices = ", ".join(map(str, spec.choices))
            raise ParameterError(f"{spec.label} ({info.flag}): {value!r} is not one of {choices}.")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if spec.minimum is not None and value < spec.minimum:
            raise ParameterError(f"{spec.label} ({info.flag}) must be at least {spec.minimum}, got {value}.")
        if spec.maximum is not None and value > spec.maximum:
            raise ParameterError(f"{spec.label} ({info.flag}) must be at most {spec.maximum}, got {value}.")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per parameter; help text shows the label, help, default and bounds."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for info in fields_of(cls):
        if info.name in skip:
            continue
        spec = info.spec
        group = groups.setdefault(spec.section, parser.add_argument_group(f"{spec.section} options"))
        bounds = ""
        if spec.minimum is not None or spec.maximum is not None:
            bounds = f" Range {spec.minimum if spec.minimum is not None else '-∞'}…"
            bounds += f"{spec.maximum if spec.maximum is not None else '∞'}."
        # argparse %-formats help text: escape ours, keep its %(default)s.
        text = f"{spec.label}: {spec.help}{bounds}".replace("%", "%%") + " Default: %(default)s."
        kwargs: dict[str, Any] = {"dest": info.name, "default": info.default, "help": text}
        if info.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = info.type
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
        group.add_argument(info.flag, **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    values = {info.name: getattr(ns, info.name) for info in fields_of(cls) if hasattr(ns, info.name)}
    values.update(overrides)
    obj = cls(**values)
    validate(obj)
    return obj


def to_record(obj: Any) -> dict[str, Any]:
    """The JSON-ready dict of every declared parameter (used for run records and presets)."""
    return {info.name: getattr(obj, info.name) for info in fields_of(type(obj))}


def from_record(cls: type, record: dict[str, Any]) -> Any:
    """Inverse of `to_record`; unknown keys are an error so typos in presets are not ignored."""
    known = {info.name for info in fields_of(cls)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ParameterError(f"Unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    obj = cls(**record)
    validate(obj)
    return obj


def json_schema(cls: type) -> dict[str, Any]:
    """A JSON-schema object for API request bodies."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    props: dict[str, Any] = {}
    for info in fields_of(cls):
        spec = info.spec
        prop: dict[str, Any] = {
            "type": kinds.get(info.type, "string"),
            "title": spec.label,
            "description": spec.help,
            "default": info.default,
        }
        if spec.minimum is not None:
            prop["minimum"] = spec.minimum
        if spec.maximum is not None:
            prop["maximum"] = spec.maximum
        if spec.choices is not None:
            prop["enum"] = list(spec.choices)
        props[info.name] = prop
    return {"type": "object", "title": cls.__name__, "properties": props}
