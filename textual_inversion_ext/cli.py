"""Command line: `python -m textual_inversion_ext COMMAND …` (create, train, promote, grid, info, convert, demo,
preprocess, captions, check)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .console import progress_printer, stop_on_sigint, train_with_progress_bar
from .core import formats
from .core.create import CreateParams, create_embedding
from .core.data.dataset_check import CheckParams
from .core.data.preprocess import PreprocessParams
from .core.errors import TIError
from .core.params import add_arguments, from_namespace, to_record
from .core.training.train_params import TrainParams

logger = logging.getLogger(__name__)

EMBEDDED_MODELS = ("tiny", "tiny-real-clip", "tiny-sdxl", "tiny-sdxl-real")
MODEL_HELP = ("'tiny' (embedded default, no download), 'tiny-real-clip' (tiny UNet/VAE with a real-shape "
              "CLIP text encoder), 'tiny-sdxl' (tiny SDXL-shaped model: two text encoders, size conditioning), "
              "'tiny-sdxl-real' (the same with SDXL's 768/1280-wide encoders), or the path of a "
              "single-file checkpoint (.safetensors/.ckpt).")


WEIGHT_DTYPES = ("fp32", "fp16", "bf16")


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument("--model", default="tiny", help=MODEL_HELP + " Default: %(default)s.")
    group.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'…")
    group.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default=None,
                       help="Model family of a checkpoint when it cannot be detected from its keys.")
    group.add_argument("--prediction", choices=("epsilon", "v_prediction"), default=None,
                       help="Prediction type of an SD2 checkpoint (768-v models use v_prediction).")
    group.add_argument("--dtype", choices=("auto", *WEIGHT_DTYPES), default="auto",
                       help="dtype of the frozen UNet, VAE and text encoder (the embedding always trains in fp32). "
                            "'auto': fp16 on CUDA (or the --precision asked for), fp32 on CPU. Default: %(default)s.")


def weight_dtype_name(dtype: str, device: str, precision: str = "auto") -> str:
    """The `--dtype` to load in: 'auto' is fp16 on CUDA and fp32 elsewhere, unless --precision names a dtype,
    which the weights then follow on CUDA (so `--precision bf16` alone never meets fp16 weights)."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "fp32"
    return precision if precision in WEIGHT_DTYPES else "fp16"


def load_backend(args: argparse.Namespace):
    """Build the standalone backend the flags ask for (imported lazily: it needs the extra deps)."""
    import torch

    from .backends.standalone import embedded_default, load_checkpoint
    from .core.training.precision import DTYPES

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[weight_dtype_name(args.dtype, device, getattr(args, "precision", "auto"))]
    if args.model in EMBEDDED_MODELS:
        return embedded_default(args.model, device=device, dtype=dtype)
    return load_checkpoint(Path(args.model), family=args.family, prediction=args.prediction, device=device,
                           dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m textual_inversion_ext",
        description="Textual Inversion for Stable Diffusion: create, train, inspect and convert embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug logging.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create", help="Create a new embedding from an init text.",
                       description="Create a new embedding whose vectors start from the init text's tokens.")
    add_arguments(p, CreateParams, skip=("name",))
    p.add_argument("name", help="Embedding name = trigger word = file stem.")
    p.add_argument("--out", type=Path, default=Path("embeddings"), help="Folder to write to. Default: %(default)s.")
    p.add_argument("--format", choices=(".pt", ".safetensors"), default=None,
                   help="File type. Default: .pt for SD1/SD2, .safetensors (clip_l + clip_g) for SDXL.")
    _model_args(p)

    p = sub.add_parser("train", help="Train an embedding on a folder of images.",
                       description="Train an embedding on a folder of images with .txt caption sidecars.")
    p.add_argument("embedding", type=Path, help="Embedding file to train (trained in place unless --output).")
    p.add_argument("data", type=Path, help="Folder of training images (+ optional .txt captions).")
    p.add_argument("--output", type=Path, default=None, help="Write the trained embedding here instead.")
    p.add_argument("--log-dir", type=Path, default=Path("textual_inversion"),
                   help="Root of the per-run log folders (snapshots, previews, CSV, run record). "
                        "Default: %(default)s.")
    p.add_argument("--recursive", action="store_true", help="Also read images in sub-folders.")
    p.add_argument("--resume-from", type=Path, default=None, metavar="SNAPSHOT",
                   help="Continue from a snapshot (<name>-<step>.pt, with its .optim for an exact resume); the "
                        "result is still written to EMBEDDING (or --output).")
    p.add_argument("--preset", type=Path, default=None, metavar="FILE",
                   help="Train preset (JSON, as the UI saves them): its values become the defaults; flags given "
                        "here override them.")
    p.add_argument("--save-preset", type=Path, default=None, metavar="FILE",
                   help="Also save these training parameters as a preset.")
    add_arguments(p, TrainParams)
    _model_args(p)

    p = sub.add_parser("promote", help="Make a snapshot the embedding (replaces the embedding file).",
                       description="Copy a snapshot's vectors (and optimizer state and run record) to the embedding "
                                   "file, under the embedding's name, e.g. to keep the best step.")
    p.add_argument("snapshot", type=Path, help="Snapshot file <name>-<step>.pt from a run's embeddings/ folder.")
    p.add_argument("embedding", type=Path, help="The embedding file to replace (its format comes from its suffix).")

    p = sub.add_parser("grid", help="Render a run's comparison grid (snapshots × prompts, same seed).",
                       description="Render every snapshot of a finished run (and its starting vectors) with the run's "
                                   "preview prompts and seed into LOG_DIR/<name>-comparison.png.")
    p.add_argument("log_dir", type=Path, help="The run's log folder (holds run.json).")
    p.add_argument("--prompt", action="append", default=[], help="A prompt to use instead (repeatable).")
    _model_args(p)

    p = sub.add_parser("info", help="Describe an embedding file.",
                       description="Print trigger word, format, vectors × dim, step and model hash.")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="Print JSON.")

    p = sub.add_parser("convert", help="Convert an embedding between formats.",
                       description="Write any supported format from any other: .pt (A1111), .safetensors, "
                                   ".bin (diffusers), .png (A1111 image embedding), diffusers SDXL pair.")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--format", choices=formats.FORMATS, default=None,
                   help="Output format; default: from the destination's extension.")
    p.add_argument("--name", default=None,
                   help="Name stored in the output; default: the destination's file name (A1111's trigger word).")

    p = sub.add_parser("demo", help="Make a sample dataset and train on the embedded model.",
                       description="Generate a small sample dataset with PIL, create an embedding from an init "
                                   "text, train it on --model (default: the embedded tiny one), and write the "
                                   "embedding (.pt and .safetensors), the loss CSV and a loss plot.")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="Output folder. Default: %(default)s.")
    p.add_argument("--steps", type=int, default=300, help="Training steps. Default: %(default)s.")
    p.add_argument("--seed", type=int, default=0, help="Seed. Default: %(default)s.")
    _model_args(p)

    _preprocess_parser(sub)
    _captions_parser(sub)
    p = sub.add_parser("check", help="Check a training folder before training.",
                       description="List corrupt, tiny, oddly shaped, duplicate or uncaptioned images and captions "
                                   "that still mention the subject; ends with 'N usable images, M warnings'.")
    p.add_argument("folder", type=Path, help="Dataset folder.")
    add_arguments(p, CheckParams)
    p.add_argument("--json", action="store_true", help="Print the findings as JSON.")
    p.add_argument("--all", action="store_true", help="Also show informational notes (modes, EXIF rotation…).")
    return parser


def _preprocess_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="Prepare a folder of images for training (crop, split, flip, caption).",
                       description="Crop/resize every image of SOURCE to the training size into DESTINATION "
                                   "(default SOURCE-Processed); the source folder is never modified. Outputs keep "
                                   "the source file name: <stem>.png, <stem>-tile2.png, <stem>-flip.png.")
    p.add_argument("source", type=Path, help="Folder of source images.")
    p.add_argument("destination", type=Path, nargs="?", default=None,
                   help="Output folder. Default: SOURCE-Processed.")
    add_arguments(p, PreprocessParams, skip=("source", "destination"))
    p.add_argument("--json", action="store_true", help="Print the per-file report as JSON.")


def _captions_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("captions", help="Edit the .txt captions of a folder (every change can be undone).",
                       description="List, edit, find/replace, strip the subject from, prepend/append to the "
                                   "<image>.txt captions of a folder; 'undo' reverts the last change.")
    ops = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    o = ops.add_parser("list", help="Show images and captions, one page at a time.")
    o.add_argument("folder", type=Path)
    o.add_argument("--page", type=int, default=1, help="Page number (from 1). Default: %(default)s.")
    o.add_argument("--per-page", type=int, default=50, help="Images per page. Default: %(default)s.")
    o = ops.add_parser("set", help="Set one image's caption.")
    o.add_argument("image", type=Path)
    o.add_argument("text")
    o = ops.add_parser("replace", help="Find and replace in every caption.")
    o.add_argument("folder", type=Path)
    o.add_argument("find")
    o.add_argument("replace")
    o.add_argument("--regex", action="store_true", help="FIND is a Python regular expression (\\1 in REPLACE).")
    o.add_argument("--ignore-case", action="store_true", help="Match regardless of case.")
    o = ops.add_parser("strip", help="Remove the subject words from every caption.",
                       description="Remove SUBJECT (and --also phrases) with any leading a/an/the and plural or "
                                   "possessive endings, case-insensitively, and tidy the commas left behind.")
    o.add_argument("folder", type=Path)
    o.add_argument("subject", help="e.g. 'blue bmw' (usually the init text).")
    o.add_argument("--also", action="append", default=[], metavar="PHRASE",
                   help="Another phrase to remove, e.g. --also 'blue car' (repeatable).")
    for name in ("prepend", "append"):
        o = ops.add_parser(name, help=f"{name.capitalize()} text to every caption.")
        o.add_argument("folder", type=Path)
        o.add_argument("text")
        o.add_argument("--separator", default=", ", help="Between the text and the caption. Default: '%(default)s'.")
        o.add_argument("--include-missing", action="store_true", help="Also create captions for images without.")
    o = ops.add_parser("tags", help="Comma-separated tags by frequency.")
    o.add_argument("folder", type=Path)
    o.add_argument("--top", type=int, default=50, help="How many to show; 0 = all. Default: %(default)s.")
    o = ops.add_parser("undo", help="Revert the last caption change in the folder.")
    o.add_argument("folder", type=Path)
    o = ops.add_parser("history", help="List the changes undo can revert, newest first.")
    o.add_argument("folder", type=Path)
    for name in ("list", "replace", "strip", "prepend", "append", "tags"):
        ops.choices[name].add_argument("--recursive", action="store_true", help="Include sub-folders.")


def _preset_defaults(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """`train --preset FILE`: the preset's values become the train command's defaults, so flags override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--preset", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.command != "train" or known.preset is None:
        return
    from .core.training.presets import load_preset

    params, _extra = load_preset(known.preset.parent, known.preset.stem)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["train"].set_defaults(**to_record(params))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        _preset_defaults(parser, argv)
    except TIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except TIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder or file the OS refused (read-only, full, missing): a message, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_create(args: argparse.Namespace) -> int:
    params = from_namespace(CreateParams, args, name=args.name)
    created = create_embedding(load_backend(args), params, args.out, suffix=args.format)
    print(created.message)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .core.training.run import RunRequest

    params = from_namespace(TrainParams, args)
    if args.save_preset:
        from .core.training.presets import save_preset

        print(f"Saved preset {save_preset(args.save_preset.parent, args.save_preset.stem, params)}")
    backend = load_backend(args)
    request = RunRequest(args.embedding, args.data, args.log_dir, params, args.output, args.recursive,
                         resume_from=args.resume_from)
    outcome = train_with_progress_bar(backend, request)
    result = outcome.result
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(result.message)
    print(f"Log folder: {outcome.paths.log_dir}")
    if outcome.grid:
        print(f"Comparison grid: {outcome.grid}")
    if result.best_path and result.best_step != result.step:
        print(f"To keep the best step instead: python -m textual_inversion_ext promote {result.best_path} "
              f"{result.final_path}")
    if result.final_path != outcome.paths.final:  # saved to a fallback (see the warning): not where it was asked
        return 1
    return 0 if result.status in ("finished", "interrupted") else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from .core.training.snapshots import promote

    target = promote(args.snapshot, args.embedding)
    print(f"{target} now holds {args.snapshot.name} (step {formats.load_embedding(target).embedding.step}).")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .core.training.run import render_run_grid

    if not (args.log_dir / "run.json").is_file():
        raise TIError(f"{args.log_dir} has no run.json: give a run's log folder.")
    path = render_run_grid(load_backend(args), args.log_dir, "\n".join(args.prompt), status=print)
    print(f"Comparison grid: {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .core.training.records import recorded_step

    info = formats.describe(args.file)
    if not info["step"]:  # a file that holds no step (an SDXL .pt): the run record saved beside it may know it
        info["step"] = recorded_step(formats.load_embedding(args.file).embedding, Path(info["path"]))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {terminal_safe(str(value))}")
    return 0


def terminal_safe(text: str) -> str:
    """`text` with control and format characters escaped (`\\x1b`, `\\u202e`): a name stored in a file must not
    drive the terminal (escape sequences, bidi overrides). JSON output is safe already (ensure_ascii)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def cmd_convert(args: argparse.Namespace) -> int:
    converted = formats.convert(args.src, args.dst, fmt=args.format, name=args.name)
    for path in converted.paths:
        print(f"wrote {path} (name {converted.name!r})")
    for note in converted.notes:
        print(f"note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed, backend=load_backend(args))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .core.data.preprocess import preprocess

    params = from_namespace(PreprocessParams, args, source=str(args.source),
                            destination=str(args.destination) if args.destination else "")
    stop = threading.Event()
    update, close = progress_printer("img")
    try:
        with stop_on_sigint(stop, "\nStopping preprocessing after the current image… (Ctrl+C again to abort)"):
            result = preprocess(params, progress=update, stop=stop)
    finally:
        close()
    if args.json:
        print(json.dumps({"summary": result.summary(), "status": result.status, "messages": result.messages,
                          "files": [{"source": str(f.source), "status": f.status,
                                     "outputs": [str(o) for o in f.outputs], "notes": f.notes}
                                    for f in result.files]}, indent=2, ensure_ascii=False))
    else:
        for message in result.messages:
            print(message)
        for f in result.files:
            if f.status != "ok" or f.notes:
                print(f"  {f.line()}")
        print(result.summary())
    if result.status != "finished":
        return 130
    return 0 if result.outputs else 1  # nothing produced (no usable image): a script must notice


def cmd_captions(args: argparse.Namespace) -> int:
    from .core.data import captions

    recursive = getattr(args, "recursive", False)
    if args.action == "list":
        page = captions.list_captions(args.folder, args.page, args.per_page, recursive=recursive)
        for item in page.items:
            shown = item.caption if item.exists else "(no caption)"
            print(f"{item.image.relative_to(page.folder)}\t{shown}" + (f"\t[{item.error}]" if item.error else ""))
        print(f"page {page.page}/{page.pages}, {page.total} image(s)")
        return 0
    if args.action == "tags":
        tags = captions.tag_frequency(args.folder, recursive=recursive)
        for tag, count in tags[: args.top or None]:
            print(f"{count:6d}  {tag}")
        print(f"{len(tags)} distinct tag(s)")
        return 0
    if args.action == "history":
        for h in captions.history(args.folder):
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h.created))}  {h.operation} "
                  f"({h.files} file(s))")
        return 0
    if args.action == "undo":
        print(captions.undo(args.folder).message)
        return 0
    if args.action == "set":
        result = captions.set_caption(args.image, args.text)
    elif args.action == "replace":
        result = captions.find_replace(args.folder, args.find, args.replace, regex=args.regex,
                                       ignore_case=args.ignore_case, recursive=recursive)
    elif args.action == "strip":
        result = captions.strip_subject(args.folder, args.subject, extra_phrases=args.also, recursive=recursive)
    else:
        result = captions.add_text(args.folder, args.text, where=args.action, separator=args.separator,
                                   include_missing=args.include_missing, recursive=recursive)
    print(result.message)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .core.data.dataset_check import INFO, check_dataset

    params = from_namespace(CheckParams, args)
    stop = threading.Event()
    update, close = progress_printer("file")
    try:
        with stop_on_sigint(stop, "\nStopping the check after the current image… (Ctrl+C again to abort)"):
            report = check_dataset(args.folder, params, progress=update, stop=stop)
    finally:
        close()
    if args.json:
        print(json.dumps({"summary": report.summary(), "usable": report.usable, "warnings": report.warnings,
                          "errors": report.errors, "findings": [
                              {"path": str(f.path), "kind": f.kind, "severity": f.severity, "message": f.message}
                              for f in report.findings]}, indent=2, ensure_ascii=False))
    else:
        for f in report.findings:
            if f.severity != INFO or args.all:
                print(f"{f.severity:7s} {f.path.relative_to(report.folder)}: {f.message}")
        print(report.summary())
    return 0 if report.usable else 1


COMMANDS = {"create": cmd_create, "train": cmd_train, "info": cmd_info, "convert": cmd_convert,
            "demo": cmd_demo, "preprocess": cmd_preprocess, "captions": cmd_captions, "check": cmd_check,
            "promote": cmd_promote, "grid": cmd_grid}
