"""The Preprocess tab and its caption editor: layout and wiring over `prep` (which holds the logic)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..core.data.preprocess import default_destination
from . import compat, handlers, prep
from .controls import ControlSpec
from .widgets import build_controls


def preprocess_tab(specs: Sequence[ControlSpec]) -> SimpleNamespace:
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


def wire_preprocess(service: Any, ui: SimpleNamespace, specs: Sequence[ControlSpec], train: SimpleNamespace) -> None:
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
