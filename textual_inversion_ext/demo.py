"""`demo`: a sample dataset drawn with PIL, an embedding created from an init text, a short run on
the embedded default model, and the artefacts a user looks at (embedding files and their run record,
loss CSV with the validation loss, plot, previews, comparison grid)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .console import train_with_progress_bar
from .core import formats
from .core.create import CreateParams, create_embedding
from .core.training.metrics import read_loss_csv
from .core.training.run import RunRequest
from .core.training.train_params import TrainParams
from .core.training.trainer import sidecar_path

logger = logging.getLogger(__name__)

DEMO_NAME = "demo-robot"
DEMO_INIT = "red robot"
BACKGROUNDS = [
    ("a blue sky", (90, 150, 230), None),
    ("green grass", (70, 160, 70), None),
    ("a striped wall", (220, 220, 200), (180, 60, 60)),
    ("a wooden floor", (150, 100, 60), (120, 80, 45)),
    ("a white table", (240, 240, 240), None),
    ("a night street", (30, 30, 50), (200, 190, 90)),
]


def draw_subject(draw: ImageDraw.ImageDraw, cx: int, cy: int, s: int) -> None:
    """The 'robot': a red body, a yellow head with dark eyes, grey arms."""
    draw.rectangle([cx - s, cy - s // 2, cx + s, cy + s], fill=(200, 30, 30))
    draw.ellipse([cx - s // 2, cy - s * 3 // 2, cx + s // 2, cy - s // 2], fill=(240, 200, 40))
    for ex in (cx - s // 5, cx + s // 5):
        draw.ellipse([ex - s // 10, cy - s, ex + s // 10, cy - s * 8 // 10], fill=(20, 20, 20))
    draw.rectangle([cx - s * 3 // 2, cy - s // 3, cx - s, cy + s // 2], fill=(130, 130, 130))
    draw.rectangle([cx + s, cy - s // 3, cx + s * 3 // 2, cy + s // 2], fill=(130, 130, 130))


def make_sample_dataset(folder: Path, *, size: int = 256, seed: int = 0) -> list[Path]:
    """Six images of the same subject on different backgrounds; captions describe everything but it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, (caption, base, stripe) in enumerate(BACKGROUNDS):
        img = Image.new("RGB", (size, size), base)
        draw = ImageDraw.Draw(img)
        if stripe is not None:
            for x in range(0, size, 24):
                draw.rectangle([x, 0, x + 8, size], fill=stripe)
        s = rng.randint(size // 8, size // 5)
        draw_subject(draw, rng.randint(2 * s, size - 2 * s), rng.randint(2 * s, size - 2 * s), s)
        path = folder / f"sample-{i:02d}.png"
        img.save(path)
        (folder / f"sample-{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def plot_losses(csv_path: Path, out: Path, title: str, validation: list[tuple[int, float]] = (),
                best_step: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_loss_csv(csv_path)
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss (per step)")
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    if validation:  # on its own axis: fixed noise makes it far smoother, and its level differs
        val_ax = ax.twinx()
        val_ax.plot([s for s, _ in validation], [v for _, v in validation], "o-", color="tab:red",
                    label="validation loss")
        if best_step is not None:
            val_ax.axvline(best_step, color="tab:red", linestyle=":", label=f"best step {best_step}")
        val_ax.set_ylabel("validation loss")
        val_ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def run_demo(out: Path, *, steps: int = 300, seed: int = 0, backend=None) -> dict[str, object]:
    out = Path(out)
    data_dir = out / "dataset"
    make_sample_dataset(data_dir, seed=seed)
    emb_dir = out / "embeddings"
    # Both file types for every model family: the model's own type is trained (it keeps the step: an SDXL .pt
    # cannot), the other is written from it below.
    created = create_embedding(backend, CreateParams(name=DEMO_NAME, init_text=DEMO_INIT, overwrite=True), emb_dir)
    params = TrainParams(max_steps=steps, csv_every=1, save_every=max(1, steps // 3),
                         preview_every=max(1, steps // 3), val_every=max(1, steps // 12), seed=seed,
                         val_budget=0.0)  # a curve worth plotting: the tiny model validates in no time
    request = RunRequest(created.path, data_dir, out / "logs", params)
    outcome = train_with_progress_bar(backend, request)
    result = outcome.result
    trained = formats.load_embedding(result.final_path).embedding
    other = ".pt" if result.final_path.suffix == ".safetensors" else ".safetensors"
    files = {result.final_path.suffix: result.final_path,
             other: formats.save_embedding(trained, emb_dir / f"{DEMO_NAME}{other}")[0]}
    plot = plot_losses(outcome.paths.loss_csv, out / "loss.png", f"{DEMO_NAME}: {result.step} steps",
                       result.validation, result.best_step)
    # The validation loss (training images, fixed noise and timesteps) at the start and at the end.
    start, end = result.validation[0][1], result.validation[-1][1]
    summary = {
        "embedding_pt": files[".pt"],
        "embedding_safetensors": files[".safetensors"],
        "run_record": sidecar_path(result.final_path),
        "loss_csv": outcome.paths.loss_csv,
        "loss_plot": plot,
        "comparison_grid": outcome.grid,
        "log_folder": outcome.paths.log_dir,
        "validation": result.validation,
        "best_step": result.best_step,
        "fixed_loss_before": start,
        "fixed_loss_after": end,
    }
    print(result.message)
    print(f"Validation loss (training images, fixed noise and timesteps): {start:.5f} at the start, {end:.5f} at "
          f"the end ({(end - start) / start:+.1%}); lowest at step {result.best_step}.")
    for key in ("embedding_pt", "embedding_safetensors", "run_record", "loss_csv", "loss_plot", "comparison_grid",
                "log_folder"):
        print(f"{key.replace('_', ' '):>22}: {summary[key]}")
    return summary
