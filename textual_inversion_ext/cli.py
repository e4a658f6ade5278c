"""Command line: `python -m textual_inversion_ext create|train|info|convert|demo …`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .core import formats
from .core.create import CreateParams, create_embedding
from .core.errors import TIError
from .core.params import add_arguments, from_namespace
from .core.train_params import TrainParams

logger = logging.getLogger(__name__)

MODEL_HELP = ("'tiny' (embedded default, no download), 'tiny-real-clip' (tiny UNet/VAE with a real-shape "
              "CLIP text encoder), or the path of an SD1.x/SD2.x single-file checkpoint (.safetensors/.ckpt).")


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument("--model", default="tiny", help=MODEL_HELP + " Default: %(default)s.")
    group.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'…")
    group.add_argument("--family", choices=("sd1", "sd2"), default=None,
                       help="Model family of a checkpoint when it cannot be detected from its keys.")
    group.add_argument("--prediction", choices=("epsilon", "v_prediction"), default=None,
                       help="Prediction type of an SD2 checkpoint (768-v models use v_prediction).")


def load_backend(args: argparse.Namespace):
    """Build the standalone backend the flags ask for (imported lazily: it needs the extra deps)."""
    import torch

    from .backends.standalone import embedded_default, load_checkpoint

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model in ("tiny", "tiny-real-clip"):
        return embedded_default(args.model, device=device)
    return load_checkpoint(Path(args.model), family=args.family, prediction=args.prediction, device=device)


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
    p.add_argument("--format", choices=(".pt", ".safetensors"), default=".pt", help="File type. Default: %(default)s.")
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
    add_arguments(p, TrainParams)
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

    p = sub.add_parser("demo", help="Make a sample dataset and train on the embedded model.",
                       description="Generate a small sample dataset with PIL, create an embedding from an init "
                                   "text, train it on the embedded default model, and write the embedding "
                                   "(.pt and .safetensors), the loss CSV and a loss plot.")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="Output folder. Default: %(default)s.")
    p.add_argument("--steps", type=int, default=300, help="Training steps. Default: %(default)s.")
    p.add_argument("--seed", type=int, default=0, help="Seed. Default: %(default)s.")
    _model_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except TIError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
    from .core.run import RunRequest

    params = from_namespace(TrainParams, args)
    backend = load_backend(args)
    request = RunRequest(args.embedding, args.data, args.log_dir, params, args.output, args.recursive)
    outcome = train_with_progress_bar(backend, request)
    print(outcome.result.message)
    print(f"Log folder: {outcome.paths.log_dir}")
    return 0 if outcome.result.status in ("finished", "interrupted") else 1


def train_with_progress_bar(backend, request):
    """Run training with a terminal progress bar; Ctrl+C stops cleanly and saves."""
    from tqdm import tqdm

    from .core.run import run_training

    stop = threading.Event()
    bar = tqdm(total=request.params.max_steps, unit="step", dynamic_ncols=True, mininterval=0.5)

    def on_progress(p) -> None:
        bar.total = p.end_step
        bar.set_postfix_str(f"loss {p.loss:.4f} lr {p.learn_rate:.2g} {p.s_per_step:.3f}s/step "
                            f"ETA {p.eta_s:.0f}s", refresh=False)
        bar.update(p.step - bar.n)  # redraws at most every mininterval, not every step

    def on_sigint(signum, frame) -> None:
        # First Ctrl+C: stop after this step and save; a second one aborts (still saving, atomically).
        tqdm.write("Stopping after this step and saving… (Ctrl+C again to abort)")
        stop.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return run_training(backend, request, progress=on_progress, status=tqdm.write, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()


def cmd_info(args: argparse.Namespace) -> int:
    info = formats.describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    for path in formats.convert(args.src, args.dst, fmt=args.format):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed, backend=load_backend(args))
    return 0


COMMANDS = {"create": cmd_create, "train": cmd_train, "info": cmd_info, "convert": cmd_convert,
            "demo": cmd_demo}
