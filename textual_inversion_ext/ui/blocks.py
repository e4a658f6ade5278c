"""The Gradio layout and its wiring: thin, over `handlers`, `status` and `controls` (which hold the logic).

Written to the subset gradio 3.41 and 4.40 share; differences go through `compat`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..core.create import CreateParams
from ..core.data.preprocess import PreprocessParams
from ..core.training.train_params import TrainParams
from . import compat, handlers, prep, status
from .controls import ControlSpec, control_specs
from .prep_blocks import preprocess_tab, wire_preprocess
from .txt2img import COPY_FIELDS, COPY_TXT2IMG_JS
from .widgets import HEALTH_COLUMNS, build_controls, frame

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.5
CREATE_PREFIX, TRAIN_PREFIX, PREPROCESS_PREFIX = "tiext_create_", "tiext_train_", "tiext_preprocess_"


def _model_row(prefix: str) -> tuple[Any, Any]:
    """The loaded model's line (family, vector widths, file type) and a button that reads it again."""
    with gr.Row(elem_id=f"{prefix}model_row"):
        with gr.Column(scale=4):
            line = gr.HTML(elem_id=f"{prefix}model_info")
        refresh = gr.Button("Refresh", size="sm", scale=1, min_width=80, elem_id=f"{prefix}model_refresh",
                            elem_classes=["tiext-tool"])
    return line, refresh


def _create_tab(specs: Sequence[ControlSpec]) -> SimpleNamespace:
    with gr.Row(equal_height=False):
        with gr.Column():
            model_info, model_refresh = _model_row(CREATE_PREFIX)
            controls = build_controls(specs)
            name_note = gr.HTML(elem_id="tiext_create_name_info")
            init_note = gr.HTML(elem_id="tiext_create_init_text_info")
            button = gr.Button("Create embedding", variant="primary", elem_id="tiext_create_button")
        with gr.Column():
            message = gr.Textbox(label="Result", interactive=False, lines=3, elem_id="tiext_create_message")
    return SimpleNamespace(controls=controls, name_note=name_note, init_note=init_note, button=button,
                           message=message, model_info=model_info, model_refresh=model_refresh)


def _train_tab(specs: Sequence[ControlSpec], host: bool = False) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Row(elem_id="tiext_train_embedding_row"):
                ui.embedding = gr.Dropdown(label="Embedding", choices=[], elem_id="tiext_train_embedding", scale=4,
                                           info="The embedding to train (its step counts toward Max steps).")
                ui.refresh = gr.Button("Refresh", size="sm", scale=1, min_width=80, elem_id="tiext_train_refresh",
                                       elem_classes=["tiext-tool"])
            # what family the run trains, read again on Refresh, on a new choice and when the tab is shown
            ui.model_info = gr.HTML(elem_id="tiext_train_model_info")
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

            def copy_button() -> None:  # atop the Preview section; only the host has a txt2img tab
                ui.copy_txt2img = gr.Button("Copy from txt2img", size="sm", visible=host, elem_id="tiext_copy_txt2img",
                                            elem_classes=["tiext-tool"])

            ui.controls = build_controls(specs, extras={"preview": copy_button})
            ui.lr_info = gr.HTML(elem_id="tiext_train_lr_info")  # the effective learning rate (_wire_train_lr)
            with gr.Row(elem_id="tiext_preset_row"):
                ui.preset = gr.Dropdown(label="Preset", choices=[], allow_custom_value=True, scale=4,
                                        elem_id="tiext_preset",
                                        info="Every Train field, the dataset folder and subject words; type a new "
                                             "name to save one.")
                ui.preset_save = gr.Button("Save preset", size="sm", scale=1, min_width=80,
                                           elem_id="tiext_preset_save", elem_classes=["tiext-tool"])
                ui.preset_load = gr.Button("Load preset", size="sm", scale=1, min_width=80,
                                           elem_id="tiext_preset_load", elem_classes=["tiext-tool"])
            with gr.Row():
                ui.train = gr.Button("Train embedding", variant="primary", elem_id="tiext_train_button")
                ui.interrupt = gr.Button("Interrupt", elem_id="tiext_interrupt_button")
        with gr.Column(elem_id="tiext_train_view"):
            ui.message = gr.Textbox(label="Message", interactive=False, lines=2, elem_id="tiext_train_message")
            ui.status = gr.Textbox(label="Status", interactive=False, lines=3, elem_id="tiext_train_status",
                                   elem_classes=["tiext-status"])
            ui.warnings = gr.HTML(elem_id="tiext_train_warnings")  # overtraining, inflated norms, NaN recoveries
            # The titles say what each chart is (a label badge would sit on top of them).
            ui.chart = compat.line_plot(x="step", y="loss", color="series", title="Loss", x_title="step",
                                        y_title="loss", height=280, label="Loss", show_label=False,
                                        elem_id="tiext_train_loss_chart")
            with gr.Row(equal_height=False):  # one series each: no legend, the title says what it is
                ui.lr_chart = compat.line_plot(x="step", y="value", title="Learning rate", x_title="step",
                                               y_title="LR", height=200, label="Learning rate", show_label=False,
                                               elem_id="tiext_train_lr_chart")
                ui.norm_chart = compat.line_plot(x="step", y="value", title="Vector norm ÷ vocab median",
                                                 x_title="step", y_title="largest vector", height=200,
                                                 label="Embedding health", show_label=False,
                                                 elem_id="tiext_train_norm_chart")
            ui.gallery = gr.Gallery(label="Previews", columns=4, object_fit="contain", height="auto",
                                    elem_id="tiext_train_previews")
            with gr.Accordion("Result: best step, snapshots, comparison grid", open=True,
                              elem_id="tiext_result_section"):
                ui.result = gr.Textbox(label="Result", interactive=False, lines=3, max_lines=12,
                                       elem_id="tiext_train_result")
                with gr.Row():
                    ui.promote_best = gr.Button("Promote best step", elem_id="tiext_promote_best")
                    ui.render_grid = gr.Button("Render comparison grid", elem_id="tiext_render_grid")
                with gr.Row(elem_id="tiext_snapshot_row"):
                    ui.snapshot = gr.Dropdown(label="Snapshot", choices=[], scale=4, elem_id="tiext_snapshot",
                                              info="The embedding's snapshots, newest run first.")
                    ui.snapshot_refresh = gr.Button("Refresh", size="sm", scale=1, min_width=80,
                                                    elem_id="tiext_snapshot_refresh", elem_classes=["tiext-tool"])
                with gr.Row():
                    ui.promote = gr.Button("Promote selected", elem_id="tiext_promote_selected")
                    ui.resume = gr.Button("Resume from selected", elem_id="tiext_resume_selected")
                ui.grid = gr.Image(label="Comparison grid (snapshots × prompts, same seed)", type="filepath",
                                   interactive=False, height=320, elem_id="tiext_train_grid")
            ui.cache = gr.State(status.LossCache())  # a fresh copy per page (gradio deep-copies)
    return ui


def running_in_host() -> bool:
    """Built inside A1111 (its modules are imported by then), not by the standalone app."""
    return "modules.script_callbacks" in sys.modules and "modules.shared" in sys.modules


def build(service: Any, host: bool | None = None) -> gr.Blocks:
    """The tabs over `service`; `host`: inside A1111 (txt2img exists: "Copy from txt2img"); None = detect."""
    host = running_in_host() if host is None else host
    create_specs = control_specs(CreateParams, CREATE_PREFIX)
    train_specs = control_specs(TrainParams, TRAIN_PREFIX)
    prep_specs = control_specs(PreprocessParams, PREPROCESS_PREFIX)

    with gr.Blocks(analytics_enabled=False, title="Textual Inversion") as blocks:
        with gr.Tabs(elem_id="tiext_tabs"):
            with gr.Tab("Create embedding", id="tiext_create", elem_id="tiext_create_tab") as create_tab:
                create = _create_tab(create_specs)
            with gr.Tab("Preprocess images", id="tiext_preprocess", elem_id="tiext_preprocess_tab"):
                preprocess = preprocess_tab(prep_specs)
            with gr.Tab("Train", id="tiext_train", elem_id="tiext_train_tab") as train_tab:
                train = _train_tab(train_specs, host)
        create.tab, train.tab = create_tab, train_tab
        _wire(blocks, service, create, create_specs, train, train_specs, preprocess, host)
        _wire_results(service, train, train_specs)
        wire_preprocess(service, preprocess, prep_specs, train)
        _wire_train_lr(blocks, train)
    return blocks


def _wire(blocks: Any, service: Any, create: SimpleNamespace, create_specs: Sequence[ControlSpec],
          train: SimpleNamespace, train_specs: Sequence[ControlSpec], preprocess: SimpleNamespace,
          host: bool = False) -> None:
    name_box, init_box = create.controls["name"], create.controls["init_text"]
    # the notes under the Create fields read all four: name, init text, vectors, init mode
    note_inputs = [name_box, init_box, create.controls["num_vectors"], create.controls["init_mode"]]
    size_boxes = [preprocess.controls["width"], preprocess.controls["height"]]

    def init_html(model: handlers.LoadedModel, *values: Any) -> str:
        return handlers.hints_html(handlers.init_note(*values, encoders=model.encoders))

    def on_load(*create_values: Any) -> tuple[Any, ...]:
        # Per page load, not at build: listing reads every embedding file (keep host start-up light);
        # the preprocess size and the model lines follow the model loaded now.
        model = handlers.loaded_model(service)
        size = prep.preprocess_defaults(service, [s for s in preprocess.specs if s.name in ("width", "height")])
        return (compat.update(choices=handlers.embedding_names(service)), init_html(model, *create_values), *size,
                compat.update(choices=handlers.preset_names(service)),
                compat.update(choices=handlers.sampler_choices(service, host)), model.html(), model.html())

    # Each note event reads the model again: the host may have switched checkpoints (SD1 <-> SDXL) since.
    def on_name(name: str, *rest: Any) -> tuple[str, str, str]:  # the init note too: the budget counts the name
        model = handlers.loaded_model(service)
        return (handlers.hints_html(handlers.name_note(service, name, model)), init_html(model, name, *rest),
                model.html())

    def on_init(*values: Any) -> tuple[str, str]:
        model = handlers.loaded_model(service)
        return init_html(model, *values), model.html()

    def on_model() -> str:
        return handlers.loaded_model(service).html()

    def on_create(*values: Any) -> tuple[Any, ...]:
        outcome, names = handlers.create(service, create_specs, values)
        if outcome.ok:  # select the new embedding in the Train tab
            return outcome.message, compat.update(choices=names, value=str(values[0]).strip())
        return outcome.message, compat.update(choices=names)

    def on_refresh() -> tuple[Any, str]:
        return compat.update(choices=handlers.embedding_names(service)), on_model()

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
            return failed, compat.no_change(), compat.no_change(), cache, failed, *(compat.no_change(),) * 6
        return poll_outputs(view)

    quiet = {"queue": False, "show_progress": "hidden", **compat.internal()}
    blocks.load(on_load, inputs=note_inputs, outputs=[train.embedding, create.init_note, *size_boxes, train.preset,
                                                      train.controls["preview_sampler"], create.model_info,
                                                      train.model_info],
                queue=False, **compat.internal())
    name_outputs = [create.name_note, create.init_note, create.model_info]
    name_box.change(on_name, inputs=note_inputs, outputs=name_outputs, **quiet)
    for box in note_inputs[1:]:
        box.change(on_init, inputs=note_inputs, outputs=[create.init_note, create.model_info], **quiet)
    # Refresh and showing the tab redo every note: the counts per encoder and the collision's file type follow
    # the model too.
    create.model_refresh.click(on_name, inputs=note_inputs, outputs=name_outputs, **quiet)
    create.tab.select(on_name, inputs=note_inputs, outputs=name_outputs, **quiet)
    train.tab.select(on_model, inputs=[], outputs=[train.model_info], **quiet)
    train.embedding.change(on_model, inputs=[], outputs=[train.model_info], **quiet)
    # then the notes again: creating may have loaded the model (Forge loads the selected checkpoint lazily)
    create.button.click(on_create, inputs=[create.controls[s.name] for s in create_specs],
                        outputs=[create.message, train.embedding], api_name="tiext_create",
                        ).then(on_name, inputs=note_inputs, outputs=name_outputs, **quiet)
    train.refresh.click(on_refresh, inputs=[], outputs=[train.embedding, train.model_info], queue=False,
                        **compat.internal())
    train_inputs = [train.embedding, train.data_dir, *(train.controls[s.name] for s in train_specs), train.subject]
    train.train.click(on_train, inputs=train_inputs, outputs=[train.message], api_name="tiext_train")
    train.interrupt.click(on_interrupt, inputs=[], outputs=[train.message], queue=False, api_name="tiext_interrupt")
    train.check.click(lambda folder, subject, resolution: prep.check_dataset(service, folder, subject, resolution),
                      inputs=[train.data_dir, train.subject, train.controls["resolution"]],
                      outputs=[train.check_report], api_name="tiext_check")
    compat.poll(blocks, on_poll, inputs=[train.cache],
                outputs=[train.status, train.chart, train.gallery, train.cache, preprocess.status, train.lr_chart,
                         train.norm_chart, train.warnings, train.result, train.grid, train.snapshot],
                seconds=POLL_SECONDS)
    copy_targets = [train.controls[name] for name in COPY_FIELDS]
    train.copy_txt2img.click(None, inputs=copy_targets, outputs=copy_targets, queue=False,
                             **compat.js(COPY_TXT2IMG_JS), **compat.internal())


def poll_outputs(view: status.View) -> tuple[Any, ...]:
    """A poll's view as the polling event's outputs (see `_wire`), gr.update() for what did not change."""
    def keep_or(value: Any, make: Callable[[Any], Any] = lambda v: v) -> Any:
        return compat.no_change() if value is None else make(value)

    snapshots = keep_or(view.snapshots, lambda labels: compat.update(choices=labels, value=default_snapshot(labels)))
    return (view.status, keep_or(view.chart, frame), keep_or(view.previews), view.cache,
            prep.preprocess_status(view.job), keep_or(view.lr, lambda rows: frame(rows, HEALTH_COLUMNS)),
            keep_or(view.norms, lambda rows: frame(rows, HEALTH_COLUMNS)), keep_or(view.warnings),
            keep_or(view.result), keep_or(view.grid, lambda path: path or None), snapshots)


def default_snapshot(labels: Sequence[str]) -> str | None:
    """The best snapshot of the newest run (labels come newest run first), else the newest one."""
    return next((label for label in labels if " · best · " in label), labels[0] if labels else None)


def _wire_results(service: Any, train: SimpleNamespace, train_specs: Sequence[ControlSpec]) -> None:
    """The result panel (promote, resume, grid) and the preset row."""
    controls = [train.controls[s.name] for s in train_specs]

    def snapshots_of(name: str | None) -> Any:
        labels = status.snapshot_labels(service, name)
        return compat.update(choices=labels, value=default_snapshot(labels))

    def on_promote_best(cache: Any, name: str | None) -> tuple[str, Any]:
        result = cache.result if isinstance(cache, status.LossCache) else {}
        job_name = cache.name if isinstance(cache, status.LossCache) else None
        outcome = handlers.promote_best(service, result, job_name or name)
        return outcome.message, snapshots_of(job_name or name)

    def on_promote(name: str | None, label: str | None) -> str:
        return handlers.promote_selected(service, name, label).message

    def on_resume(name: str | None, folder: str | None, label: str | None, subject: str, *values: Any) -> str:
        return handlers.resume_selected(service, name, folder, train_specs, values, subject, label).message

    def on_grid(name: str | None, cache: Any) -> str:
        job_name = cache.name if isinstance(cache, status.LossCache) and not name else name
        return handlers.render_grid(service, job_name).message

    def on_save(preset: str | None, folder: str | None, subject: str | None, *values: Any) -> tuple[str, Any]:
        outcome = handlers.save_preset(service, preset, train_specs, values, folder, subject)
        return outcome.message, compat.update(choices=handlers.preset_names(service))

    def on_load_preset(preset: str | None) -> tuple[Any, ...]:
        loaded = handlers.load_preset(service, preset, train_specs)
        if loaded.values is None:
            return (loaded.outcome.message, *(compat.no_change(),) * (len(controls) + 2))
        keep = compat.no_change()
        return (loaded.outcome.message, keep if loaded.data_dir is None else loaded.data_dir,
                keep if loaded.subject is None else loaded.subject, *loaded.values)

    quiet = {"queue": False, **compat.internal()}
    train.embedding.change(snapshots_of, inputs=[train.embedding], outputs=[train.snapshot], show_progress="hidden",
                           **quiet)
    train.snapshot_refresh.click(snapshots_of, inputs=[train.embedding], outputs=[train.snapshot], **quiet)
    train.promote_best.click(on_promote_best, inputs=[train.cache, train.embedding],
                             outputs=[train.message, train.snapshot], **quiet)
    train.promote.click(on_promote, inputs=[train.embedding, train.snapshot], outputs=[train.message], **quiet)
    train.resume.click(on_resume, inputs=[train.embedding, train.data_dir, train.snapshot, train.subject, *controls],
                       outputs=[train.message], **compat.internal())
    train.render_grid.click(on_grid, inputs=[train.embedding, train.cache], outputs=[train.message], **quiet)
    train.preset_save.click(on_save, inputs=[train.preset, train.data_dir, train.subject, *controls],
                            outputs=[train.message, train.preset], **quiet)
    train.preset_load.click(on_load_preset, inputs=[train.preset],
                            outputs=[train.message, train.data_dir, train.subject, *controls], **quiet)


def _wire_train_lr(blocks: Any, train: SimpleNamespace) -> None:
    """The effective learning rate under the Train controls, kept current as its four inputs change."""
    inputs = [train.controls[name] for name in ("learn_rate", "batch_size", "grad_accum", "scale_lr")]

    def on_change(*values: Any) -> str:
        return handlers.hints_html(handlers.lr_note(*values))

    blocks.load(on_change, inputs=inputs, outputs=[train.lr_info], queue=False, **compat.internal())
    for box in inputs:
        box.change(on_change, inputs=inputs, outputs=[train.lr_info], queue=False, show_progress="hidden",
                   **compat.internal())
