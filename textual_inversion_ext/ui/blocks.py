"""The Gradio layout and its wiring: thin, over `handlers`, `status` and `controls` (which hold the logic).

Written to the subset gradio 3.41 and 4.40 share; differences go through `compat`.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..core.create import CreateParams
from ..core.train_params import TrainParams
from . import compat, handlers, status
from .controls import MAIN, ControlSpec, by_section, control_specs, section_title

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.5
CREATE_PREFIX, TRAIN_PREFIX = "tiext_create_", "tiext_train_"
CHART_COLUMNS = ["step", "loss", "series"]
PREPROCESS_PLACEHOLDER = "Preprocess images: coming with the preprocess issue."


def build_control(spec: ControlSpec) -> Any:
    """The one builder every declared parameter goes through."""
    common = {"label": spec.label, "info": spec.info, "value": spec.default, "elem_id": spec.elem_id}
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "radio":
        return gr.Radio(choices=list(spec.choices or ()), **common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices or ()), **common)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, **common)
    if spec.kind == "number":
        bounds = {k: v for k, v in (("minimum", spec.minimum), ("maximum", spec.maximum), ("step", spec.step))
                  if v is not None}
        return gr.Number(precision=spec.precision, **bounds, **common)
    if spec.kind == "textbox":
        return gr.Textbox(lines=1, **common)
    raise ValueError(f"no control for kind {spec.kind!r} ({spec.name})")


def build_controls(specs: Sequence[ControlSpec], skip_main: bool = False) -> dict[str, Any]:
    """Controls grouped by section: "main" inline, the others in closed accordions. Two per row."""
    out: dict[str, Any] = {}
    for section, group in by_section(specs).items():
        if section == MAIN and skip_main:
            continue
        if section == MAIN:
            _rows(group, out)
        else:
            with gr.Accordion(section_title(section), open=False, elem_id=f"{group[0].elem_id}_section"):
                _rows(group, out)
    return out


def _rows(specs: Sequence[ControlSpec], out: dict[str, Any]) -> None:
    for i in range(0, len(specs), 2):
        with gr.Row():
            for spec in specs[i:i + 2]:
                out[spec.name] = build_control(spec)


def note(text: str) -> str:
    return f"<div class='tiext-note'>{html.escape(text)}</div>" if text else ""


def frame(rows: list[tuple[int, float, str]]) -> Any:
    import pandas as pd  # a gradio dependency in both versions; imported only when a chart is drawn

    return pd.DataFrame(rows, columns=CHART_COLUMNS)


def _create_tab(specs: Sequence[ControlSpec]) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            controls = build_controls(specs)
            name_note = gr.HTML(elem_id="tiext_create_name_info")
            init_note = gr.HTML(elem_id="tiext_create_init_text_info")
            button = gr.Button("Create embedding", variant="primary", elem_id="tiext_create_button")
        with gr.Column():
            message = gr.Textbox(label="Result", interactive=False, lines=3, elem_id="tiext_create_message")
    return SimpleNamespace(controls=controls, name_note=name_note, init_note=init_note, button=button,
                           message=message)


def _train_tab(specs: Sequence[ControlSpec]) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Row(elem_id="tiext_train_embedding_row"):
                ui.embedding = gr.Dropdown(label="Embedding", choices=[], elem_id="tiext_train_embedding", scale=4,
                                           info="The embedding to train (its step counts toward Max steps).")
                ui.refresh = gr.Button("Refresh", size="sm", scale=1, min_width=80, elem_id="tiext_train_refresh",
                                       elem_classes=["tiext-tool"])
            ui.data_dir = gr.Textbox(label="Dataset directory", elem_id="tiext_train_data_dir",
                                     info="Folder of images, with optional <image>.txt captions.")
            ui.controls = build_controls(specs)
            with gr.Row():
                ui.train = gr.Button("Train embedding", variant="primary", elem_id="tiext_train_button")
                ui.interrupt = gr.Button("Interrupt", elem_id="tiext_interrupt_button")
        with gr.Column():
            ui.message = gr.Textbox(label="Message", interactive=False, lines=2, elem_id="tiext_train_message")
            ui.status = gr.Textbox(label="Status", interactive=False, lines=3, elem_id="tiext_train_status",
                                   elem_classes=["tiext-status"])
            ui.chart = compat.line_plot(x="step", y="loss", color="series", title="Training loss", x_title="step",
                                        y_title="loss", height=280, label="Loss",
                                        elem_id="tiext_train_loss_chart")
            ui.gallery = gr.Gallery(label="Previews", columns=4, object_fit="contain", height="auto",
                                    elem_id="tiext_train_previews")
            ui.cache = gr.State(status.LossCache())  # a fresh copy per page (gradio deep-copies)
    return ui


def build(service: Any) -> gr.Blocks:
    create_specs = control_specs(CreateParams, CREATE_PREFIX)
    train_specs = control_specs(TrainParams, TRAIN_PREFIX)

    with gr.Blocks(analytics_enabled=False, title="Textual Inversion") as blocks:
        with gr.Tabs(elem_id="tiext_tabs"):
            with gr.Tab("Create embedding", id="tiext_create", elem_id="tiext_create_tab"):
                create = _create_tab(create_specs)
            with gr.Tab("Preprocess images", id="tiext_preprocess", elem_id="tiext_preprocess_tab"):
                gr.Markdown(PREPROCESS_PLACEHOLDER, elem_id="tiext_preprocess_placeholder")
            with gr.Tab("Train", id="tiext_train", elem_id="tiext_train_tab"):
                train = _train_tab(train_specs)
        _wire(blocks, service, create, create_specs, train, train_specs)
    return blocks


def _wire(blocks: Any, service: Any, create: SimpleNamespace, create_specs: Sequence[ControlSpec],
          train: SimpleNamespace, train_specs: Sequence[ControlSpec]) -> None:
    name_box, init_box = create.controls["name"], create.controls["init_text"]

    def on_load(init_text: str) -> tuple[Any, ...]:
        # Per page load, not at build: listing reads every embedding file (keep host start-up light).
        return compat.update(choices=handlers.embedding_names(service)), note(handlers.init_text_info(init_text))

    def on_create(*values: Any) -> tuple[Any, ...]:
        outcome, names = handlers.create(service, create_specs, values)
        if outcome.ok:  # select the new embedding in the Train tab
            return outcome.message, compat.update(choices=names, value=str(values[0]).strip())
        return outcome.message, compat.update(choices=names)

    def on_refresh() -> Any:
        return compat.update(choices=handlers.embedding_names(service))

    def on_train(name: str | None, folder: str | None, *values: Any) -> str:
        return handlers.start_training(service, name, folder, train_specs, values).message

    def on_interrupt() -> str:
        return handlers.interrupt(service).message

    def on_poll(cache: Any) -> tuple[Any, ...]:
        try:
            view = status.poll(service, cache)
        except Exception as exc:  # gradio 3.41 ends a page's `every=` loop on the first error: keep it alive
            logger.exception("Training status poll failed")
            return f"Cannot read the training status: {exc}", compat.no_change(), compat.no_change(), cache
        plot = compat.no_change() if view.chart is None else frame(view.chart)
        pictures = compat.no_change() if view.previews is None else view.previews
        return view.status, plot, pictures, view.cache

    blocks.load(on_load, inputs=[init_box], outputs=[train.embedding, create.init_note], queue=False,
                **compat.internal())
    name_box.change(lambda text: note(handlers.name_info(text)), inputs=[name_box], outputs=[create.name_note],
                    queue=False, show_progress="hidden", **compat.internal())
    init_box.change(lambda text: note(handlers.init_text_info(text)), inputs=[init_box],
                    outputs=[create.init_note], queue=False, show_progress="hidden", **compat.internal())
    create.button.click(on_create, inputs=[create.controls[s.name] for s in create_specs],
                        outputs=[create.message, train.embedding], api_name="tiext_create")
    train.refresh.click(on_refresh, inputs=[], outputs=[train.embedding], queue=False, **compat.internal())
    train_inputs = [train.embedding, train.data_dir, *(train.controls[s.name] for s in train_specs)]
    train.train.click(on_train, inputs=train_inputs, outputs=[train.message], api_name="tiext_train")
    train.interrupt.click(on_interrupt, inputs=[], outputs=[train.message], queue=False, api_name="tiext_interrupt")
    compat.poll(blocks, on_poll, inputs=[train.cache], outputs=[train.status, train.chart, train.gallery, train.cache],
                seconds=POLL_SECONDS)
