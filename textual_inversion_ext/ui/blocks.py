"""The Gradio layout and its wiring: thin, over `handlers`, `status` and `controls` (which hold the logic).

Written to the subset gradio 3.41 and 4.40 share; differences go through `compat`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..core.create import CreateParams
from ..core.preprocess import PreprocessParams, default_destination
from ..core.train_params import TrainParams
from . import compat, handlers, prep, status
from .controls import MAIN, ControlSpec, by_section, control_specs, section_title

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.5
CREATE_PREFIX, TRAIN_PREFIX, PREPROCESS_PREFIX = "tiext_create_", "tiext_train_", "tiext_preprocess_"
CHART_COLUMNS = ["step", "loss", "series"]


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
            with gr.Row():
                ui.subject = gr.Textbox(label="Subject words", elem_id="tiext_train_subject", scale=4,
                                        info="The init text, e.g. 'blue bmw': the dataset check flags captions "
                                             "still naming it.")
                ui.check = gr.Button("Check dataset", size="sm", scale=1, min_width=80, elem_id="tiext_check_button")
            ui.check_report = gr.Textbox(label="Dataset check", interactive=False, lines=4, max_lines=12,
                                         elem_id="tiext_check_report",
                                         info="Also run when training starts (its summary is in the message).")
            ui.controls = build_controls(specs)
            ui.lr_info = gr.HTML(elem_id="tiext_train_lr_info")  # the effective learning rate (_wire_train_lr)
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


def _preprocess_tab(specs: Sequence[ControlSpec]) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column():
            ui.controls = build_controls(specs)
            with gr.Row():
                ui.run = gr.Button("Preprocess", variant="primary", elem_id="tiext_preprocess_button")
                ui.interrupt = gr.Button("Interrupt", elem_id="tiext_preprocess_interrupt")
            ui.message = gr.Textbox(label="Message", interactive=False, lines=2, elem_id="tiext_preprocess_message")
            ui.status = gr.Textbox(label="Status", interactive=False, lines=4, max_lines=20,
                                   elem_id="tiext_preprocess_status", elem_classes=["tiext-status"])
        with gr.Column():
            captions = _caption_editor()
    ui.captions, ui.specs = captions, list(specs)
    return ui


def _caption_editor() -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.Markdown("### Caption editor", elem_id="tiext_captions_title")
    with gr.Row():
        ui.folder = gr.Textbox(label="Folder", elem_id="tiext_captions_folder", scale=4,
                               info="Images with <image>.txt captions (e.g. the preprocess destination).")
        ui.load = gr.Button("Load", size="sm", scale=1, min_width=80, elem_id="tiext_captions_load")
    with gr.Row():
        ui.prev = gr.Button("◀ Previous", size="sm", elem_id="tiext_captions_prev")
        ui.page = gr.Number(value=1, precision=0, label="Page", minimum=1, elem_id="tiext_captions_page")
        ui.next = gr.Button("Next ▶", size="sm", elem_id="tiext_captions_next")
    ui.info = gr.Textbox(label="Listing", interactive=False, lines=1, elem_id="tiext_captions_info")
    # gradio's cells are at least 100 px wide: 6 overflowed this half-width column (the last thumbnails cut
    # off) below a ~1460 px window; 4 fit from ~950 px. (gradio 3.41's page ignores per-breakpoint tuples.)
    ui.gallery = gr.Gallery(label="Images (thumbnails; click one to edit its caption)", columns=4,
                            object_fit="contain", height="auto", allow_preview=False,
                            elem_id="tiext_captions_gallery")
    ui.images = gr.State([])  # the page's image paths, in gallery order
    ui.image = gr.Textbox(label="Image", interactive=False, elem_id="tiext_captions_image")
    ui.text = gr.Textbox(label="Caption", lines=2, elem_id="tiext_captions_text")
    ui.save = gr.Button("Save caption", elem_id="tiext_captions_save")
    with gr.Accordion("Bulk edit (each change can be undone)", open=True, elem_id="tiext_captions_bulk"):
        with gr.Row():
            ui.find = gr.Textbox(label="Find", elem_id="tiext_captions_find")
            ui.replace = gr.Textbox(label="Replace with", elem_id="tiext_captions_replace")
        with gr.Row():
            ui.regex = gr.Checkbox(label="Regular expression", value=False, elem_id="tiext_captions_regex")
            ui.ignore_case = gr.Checkbox(label="Ignore case", value=False, elem_id="tiext_captions_ignore_case")
            ui.replace_button = gr.Button("Replace", size="sm", elem_id="tiext_captions_replace_button")
        with gr.Row():
            ui.subject = gr.Textbox(label="Subject", elem_id="tiext_captions_subject",
                                    info="Removed from every caption, e.g. 'blue bmw'.")
            ui.extra = gr.Textbox(label="Also remove", elem_id="tiext_captions_extra",
                                  info="Comma-separated variants, e.g. 'blue car, car'.")
            ui.strip = gr.Button("Strip subject", size="sm", elem_id="tiext_captions_strip")
        with gr.Row():
            ui.add = gr.Textbox(label="Text to add", elem_id="tiext_captions_add")
            ui.prepend = gr.Button("Prepend", size="sm", elem_id="tiext_captions_prepend")
            ui.append = gr.Button("Append", size="sm", elem_id="tiext_captions_append")
        with gr.Row():
            ui.undo = gr.Button("Undo last change", size="sm", elem_id="tiext_captions_undo")
            ui.tags_button = gr.Button("Tag frequency", size="sm", elem_id="tiext_captions_tags_button")
    ui.message = gr.Textbox(label="Result", interactive=False, lines=2, elem_id="tiext_captions_message")
    ui.tags = gr.Textbox(label="Tag frequency (captions containing each tag)", interactive=False, lines=6,
                         max_lines=20, elem_id="tiext_captions_tags")
    return ui


def build(service: Any) -> gr.Blocks:
    create_specs = control_specs(CreateParams, CREATE_PREFIX)
    train_specs = control_specs(TrainParams, TRAIN_PREFIX)
    prep_specs = control_specs(PreprocessParams, PREPROCESS_PREFIX)

    with gr.Blocks(analytics_enabled=False, title="Textual Inversion") as blocks:
        with gr.Tabs(elem_id="tiext_tabs"):
            with gr.Tab("Create embedding", id="tiext_create", elem_id="tiext_create_tab"):
                create = _create_tab(create_specs)
            with gr.Tab("Preprocess images", id="tiext_preprocess", elem_id="tiext_preprocess_tab"):
                preprocess = _preprocess_tab(prep_specs)
            with gr.Tab("Train", id="tiext_train", elem_id="tiext_train_tab"):
                train = _train_tab(train_specs)
        _wire(blocks, service, create, create_specs, train, train_specs, preprocess)
        _wire_preprocess(service, preprocess, prep_specs, train)
        _wire_train_lr(blocks, train)
    return blocks


def _wire(blocks: Any, service: Any, create: SimpleNamespace, create_specs: Sequence[ControlSpec],
          train: SimpleNamespace, train_specs: Sequence[ControlSpec], preprocess: SimpleNamespace) -> None:
    name_box, init_box = create.controls["name"], create.controls["init_text"]
    # the notes under the Create fields read all four: name, init text, vectors, init mode
    note_inputs = [name_box, init_box, create.controls["num_vectors"], create.controls["init_mode"]]
    size_boxes = [preprocess.controls["width"], preprocess.controls["height"]]

    def on_load(*create_values: Any) -> tuple[Any, ...]:
        # Per page load, not at build: listing reads every embedding file (keep host start-up light);
        # the preprocess size follows the model loaded now.
        size = prep.preprocess_defaults(service, [s for s in preprocess.specs if s.name in ("width", "height")])
        return (compat.update(choices=handlers.embedding_names(service)),
                handlers.hints_html(handlers.init_note(*create_values)), *size)

    def on_name(name: str, *rest: Any) -> tuple[str, str]:  # the init note too: the budget counts the name
        return (handlers.hints_html(handlers.name_note(service, name)),
                handlers.hints_html(handlers.init_note(name, *rest)))

    def on_create(*values: Any) -> tuple[Any, ...]:
        outcome, names = handlers.create(service, create_specs, values)
        if outcome.ok:  # select the new embedding in the Train tab
            return outcome.message, compat.update(choices=names, value=str(values[0]).strip())
        return outcome.message, compat.update(choices=names)

    def on_refresh() -> Any:
        return compat.update(choices=handlers.embedding_names(service))

    def on_train(name: str | None, folder: str | None, *values: Any) -> str:
        *values, subject = values  # the subject box is the last input (for the dataset check)
        return handlers.start_training(service, name, folder, train_specs, values, subject=subject).message

    def on_interrupt() -> str:
        return handlers.interrupt(service).message

    def on_poll(cache: Any) -> tuple[Any, ...]:
        try:
            view = status.poll(service, cache)
        except Exception as exc:  # gradio 3.41 ends a page's `every=` loop on the first error: keep it alive
            logger.exception("Training status poll failed")
            failed = f"Cannot read the job status: {exc}"
            return failed, compat.no_change(), compat.no_change(), cache, failed
        plot = compat.no_change() if view.chart is None else frame(view.chart)
        pictures = compat.no_change() if view.previews is None else view.previews
        return view.status, plot, pictures, view.cache, prep.preprocess_status(view.job)

    blocks.load(on_load, inputs=note_inputs, outputs=[train.embedding, create.init_note, *size_boxes], queue=False,
                **compat.internal())
    name_box.change(on_name, inputs=note_inputs, outputs=[create.name_note, create.init_note], queue=False,
                    show_progress="hidden", **compat.internal())
    for box in note_inputs[1:]:
        box.change(lambda *values: handlers.hints_html(handlers.init_note(*values)), inputs=note_inputs,
                   outputs=[create.init_note], queue=False, show_progress="hidden", **compat.internal())
    create.button.click(on_create, inputs=[create.controls[s.name] for s in create_specs],
                        outputs=[create.message, train.embedding], api_name="tiext_create")
    train.refresh.click(on_refresh, inputs=[], outputs=[train.embedding], queue=False, **compat.internal())
    train_inputs = [train.embedding, train.data_dir, *(train.controls[s.name] for s in train_specs), train.subject]
    train.train.click(on_train, inputs=train_inputs, outputs=[train.message], api_name="tiext_train")
    train.interrupt.click(on_interrupt, inputs=[], outputs=[train.message], queue=False, api_name="tiext_interrupt")
    train.check.click(lambda folder, subject, resolution: prep.check_dataset(service, folder, subject, resolution),
                      inputs=[train.data_dir, train.subject, train.controls["resolution"]],
                      outputs=[train.check_report], api_name="tiext_check")
    compat.poll(blocks, on_poll, inputs=[train.cache],
                outputs=[train.status, train.chart, train.gallery, train.cache, preprocess.status],
                seconds=POLL_SECONDS)


def _wire_train_lr(blocks: Any, train: SimpleNamespace) -> None:
    """The effective learning rate under the Train controls, kept current as its four inputs change."""
    inputs = [train.controls[name] for name in ("learn_rate", "batch_size", "grad_accum", "scale_lr")]

    def on_change(*values: Any) -> str:
        return handlers.hints_html(handlers.lr_note(*values))

    blocks.load(on_change, inputs=inputs, outputs=[train.lr_info], queue=False, **compat.internal())
    for box in inputs:
        box.change(on_change, inputs=inputs, outputs=[train.lr_info], queue=False, show_progress="hidden",
                   **compat.internal())


def _wire_preprocess(service: Any, ui: SimpleNamespace, specs: Sequence[ControlSpec], train: SimpleNamespace) -> None:
    cap = ui.captions
    names = [s.name for s in specs]

    def on_run(*values: Any) -> tuple[Any, ...]:
        outcome = prep.start_preprocess(service, specs, values)
        if not outcome.ok:
            return outcome.message, compat.no_change(), compat.no_change()
        record = dict(zip(names, values))
        dest = str(record.get("destination") or "").strip() or str(default_destination(str(record["source"]).strip()))
        return outcome.message, dest, dest  # the outputs are what the caption editor and Train use next

    def page_outputs(view: prep.CaptionView) -> tuple[Any, ...]:
        return view.gallery, view.images, view.info, view.page

    def on_page(folder: str, page: Any, delta: int = 0) -> tuple[Any, ...]:
        try:
            number = int(page or 1) + delta
        except (TypeError, ValueError):
            number = 1
        return page_outputs(prep.caption_page(service, folder, max(1, number)))

    def on_select(images: list[str], evt: gr.SelectData) -> tuple[str, str]:
        return prep.caption_of(images, evt.index)

    on_select.__annotations__["evt"] = gr.SelectData  # a real class: gradio finds event data by annotation

    def after(message: str, folder: str, page: Any, image: str | None) -> tuple[Any, ...]:
        # show the changed captions, and reload the one being edited: a stale box saved later would undo the edit
        text = prep.current_caption(image)
        return (message, *on_page(folder, page), compat.no_change() if text is None else text)

    page_out = [cap.gallery, cap.images, cap.info, cap.page]
    ui.run.click(on_run, inputs=[ui.controls[n] for n in names], outputs=[ui.message, cap.folder, train.data_dir],
                 api_name="tiext_preprocess")
    ui.interrupt.click(lambda: handlers.interrupt(service).message, inputs=[], outputs=[ui.message], queue=False,
                       **compat.internal())
    cap.load.click(lambda f: on_page(f, 1), inputs=[cap.folder], outputs=page_out, **compat.internal())
    cap.prev.click(lambda f, p: on_page(f, p, -1), inputs=[cap.folder, cap.page], outputs=page_out,
                   **compat.internal())
    cap.next.click(lambda f, p: on_page(f, p, 1), inputs=[cap.folder, cap.page], outputs=page_out,
                   **compat.internal())
    cap.gallery.select(on_select, inputs=[cap.images], outputs=[cap.image, cap.text], **compat.internal())
    edit_out = [cap.message, *page_out, cap.text]
    cap.save.click(lambda f, p, img, text: after(prep.save_caption(service, f, img, text), f, p, img),
                   inputs=[cap.folder, cap.page, cap.image, cap.text], outputs=edit_out, **compat.internal())
    cap.replace_button.click(
        lambda f, p, img, find, rep, rx, ic: after(prep.bulk(service, f, "replace", find=find, replace=rep, regex=rx,
                                                             ignore_case=ic), f, p, img),
        inputs=[cap.folder, cap.page, cap.image, cap.find, cap.replace, cap.regex, cap.ignore_case],
        outputs=edit_out, **compat.internal())
    cap.strip.click(lambda f, p, img, subject, extra: after(prep.bulk(service, f, "strip_subject", subject=subject,
                                                                      extra=extra), f, p, img),
                    inputs=[cap.folder, cap.page, cap.image, cap.subject, cap.extra], outputs=edit_out,
                    **compat.internal())
    for button, op in ((cap.prepend, "prepend"), (cap.append, "append")):
        button.click(lambda f, p, img, text, op=op: after(prep.bulk(service, f, op, text=text), f, p, img),
                     inputs=[cap.folder, cap.page, cap.image, cap.add], outputs=edit_out, **compat.internal())
    cap.undo.click(lambda f, p, img: after(prep.bulk(service, f, "undo"), f, p, img),
                   inputs=[cap.folder, cap.page, cap.image], outputs=edit_out, **compat.internal())
    cap.tags_button.click(lambda f: prep.tag_table(service, f), inputs=[cap.folder], outputs=[cap.tags],
                          **compat.internal())
