"""The comparison grid: every snapshot of a run (columns, starting vectors first) × the preview prompts
(rows), all with the same seed, so the step to keep can be chosen by eye."""

from __future__ import annotations

import logging
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .. import formats
from ..backend import Backend
from ..errors import Interrupted, TIError
from .previews import PreviewSettings
from .records import recorded_step
from .validation import FORWARD_COST

logger = logging.getLogger(__name__)

HEADER, LABEL_WIDTH, PAD = 28, 200, 4


def snapshot_step(path: Path) -> int | None:
    """The step in a snapshot's file name `<name>-<step>.pt`, or None."""
    tail = path.stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def is_snapshot_of(path: Path, name: str) -> bool:
    """`path` is named `<name>-<step>.pt`."""
    return snapshot_step(path) is not None and path.stem.rsplit("-", 1)[0] == name


def snapshot_files(folder: Path, name: str) -> list[Path]:
    """A run's snapshots of `name`, by step."""
    found = [p for p in Path(folder).glob(f"{name}-*.pt") if is_snapshot_of(p, name)]
    return sorted(found, key=lambda p: snapshot_step(p) or 0)


def columns_from(files: Sequence[Path], final: Path | None = None) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(label, vectors) per column: the first file is the baseline ("init" at step 0), then "step N";
    `final` is added when its step is not among the snapshots."""
    columns, steps = [], set()
    for i, path in enumerate(files):
        emb = formats.load_embedding(path).embedding
        emb.step = recorded_step(emb, path)
        steps.add(emb.step)
        label = ("init" if emb.step == 0 else f"start ({emb.step})") if i == 0 else f"step {emb.step}"
        columns.append((label, emb.vectors))
    if final is not None and final.exists():
        emb = formats.load_embedding(final).embedding
        emb.step = recorded_step(emb, final)
        if emb.step not in steps:
            columns.append((f"final ({emb.step})", emb.vectors))
    if not columns:
        raise TIError("No snapshots to compare: train with 'Snapshot every' > 0 or keep the best step.")
    return columns


@dataclass(frozen=True)
class GridCost:
    """What a grid will take, told before it starts."""

    images: int
    steps: int  # sampling steps per image
    seconds: float | None  # estimated; None = no training speed to go by

    def text(self) -> str:
        about = f", about {duration(self.seconds)}" if self.seconds is not None else ""
        return (f"Comparison grid: {self.images} images × {self.steps} sampling steps{about}. Interrupt skips it "
                "(the embedding is already saved); turn 'Comparison grid' off to skip it in later runs.")


def estimate_cost(images: int, settings: PreviewSettings, run: Mapping) -> GridCost:
    """From a run record (`run.json`): a sampling step runs the UNet on 2 samples (with and without the prompt)
    at the preview size; a training step ran `batch × accumulation` samples, each a forward and a backward
    (≥ 1/FORWARD_COST forwards), at the training size."""
    s_per_step = run.get("s_per_step")
    if not s_per_step:
        return GridCost(images, settings.steps, None)
    params, side = run.get("params", {}), run.get("resolution") or settings.width
    samples = max(1, int(params.get("batch_size", 1)) * int(params.get("grad_accum", 1)))
    per_forward = s_per_step / samples * FORWARD_COST * settings.width * settings.height / side**2
    return GridCost(images, settings.steps, images * settings.steps * 2 * per_forward)


def duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 05 min'."""
    s = round(seconds)
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def render_grid(backend: Backend, trigger: str, columns: Sequence[tuple[str, dict[str, torch.Tensor]]],
                prompts: Sequence[str], settings: PreviewSettings, *,
                progress: Callable[[int, int], None] | None = None,
                stop: threading.Event | None = None) -> Image.Image:
    w, h = settings.width, settings.height
    grid = Image.new("RGB", (LABEL_WIDTH + len(columns) * (w + PAD), HEADER + len(prompts) * (h + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(14)
    total, done = len(columns) * len(prompts), 0
    for c, (label, _) in enumerate(columns):
        draw.text((LABEL_WIDTH + c * (w + PAD) + 4, 6), label, fill="black", font=font)
    for r, prompt in enumerate(prompts):
        y = HEADER + r * (h + PAD)
        wrapped = "\n".join(textwrap.wrap(prompt, 26)[: max(1, h // 16)])
        draw.multiline_text((4, y + 4), wrapped, fill="black", font=_font(12))
        for c, (_, vectors) in enumerate(columns):
            try:
                if stop is not None and stop.is_set():
                    raise Interrupted("stopped")
                # The backend checks `stop` between sampling steps too: an interrupt does not wait for a cell.
                image = settings.render(backend, prompt, trigger, vectors, stop.is_set if stop else None)
            except Interrupted as exc:
                raise Interrupted(f"Comparison grid interrupted after {done} of {total} images.") from exc
            grid.paste(image.convert("RGB").resize((w, h)), (LABEL_WIDTH + c * (w + PAD), y))
            done += 1
            if progress:
                progress(done, total)
    return grid


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()
