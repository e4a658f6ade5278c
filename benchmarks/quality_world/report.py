"""The benchmark's outputs: a text table, a JSON record and a plot of the scores against steps."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from textual_inversion_ext.core.fileio import atomic_write_text

from .task import Row, TaskResult


def table(rows: list[Row]) -> str:
    lines = ["| step | val loss | fidelity | editability |", "| --- | --- | --- | --- |"]
    for r in rows:
        label = {"init": "init text (step 0)", "text": "concept named in words"}.get(r.label, r.label)
        loss = f"{r.val_loss:.5f}" if r.val_loss is not None else "–"
        lines.append(f"| {label} | {loss} | {r.fidelity:.3f} | {r.editability:.3f} |")
    return "\n".join(lines)


def write_json(path: Path, record: dict, result: TaskResult) -> Path:
    data = dict(record)
    data["rows"] = [asdict(r) for r in result.rows]
    data["best_step"] = result.best_step
    data["val_step"] = result.val_step
    data["trainer_best_step"] = result.trainer_best_step
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    return path


def plot(path: Path, result: TaskResult, floor: float, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.step is not None]
    steps = [r.step for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    ax.plot(steps, [r.fidelity for r in rows], "o-", label="fidelity")
    ax.plot(steps, [r.editability for r in rows], "s-", label="editability (red background)")
    ax.axhline(floor, color="grey", lw=0.8, ls=":", label=f"editability floor {floor:g}")
    if result.best_step is not None:
        ax.axvline(result.best_step, color="tab:green", lw=1, ls="--", label=f"chosen step {result.best_step}")
    if result.val_step is not None:
        ax.axvline(result.val_step, color="tab:red", lw=1, ls="-.", label=f"lowest val loss {result.val_step}")
    ax.set_xlabel("step (0 = init text)")
    ax.set_ylabel("share of generated images")
    ax.set_ylim(-0.02, 1.02)
    losses = [(r.step, r.val_loss) for r in rows if r.val_loss is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in losses], [v for _, v in losses], "^--", color="tab:purple", alpha=0.7,
                 label="validation loss")
        ax2.set_ylabel("validation loss (fixed noise)")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_sheet(path: Path, result: TaskResult, labels: list[str]) -> Path:
    """One row per label ('init', a step, 'text'): the first images of 'a photo of <name>', then of
    '<name> on a red background', the same start noise in every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"init": "init text", "text": "in words"}
    labels = [label for label in labels if label in result.samples]
    per_row = max(len(result.samples[label]) for label in labels)
    fig, axes = plt.subplots(len(labels), per_row, figsize=(per_row * 0.9 + 0.9, len(labels) * 0.95 + 0.4),
                             dpi=100, squeeze=False)
    for i, label in enumerate(labels):
        images = (result.samples[label].clamp(-1, 1) + 1) / 2
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                ax.imshow(images[j].permute(1, 2, 0).numpy())
        axes[i][0].set_ylabel(names.get(label, f"step {label}"), fontsize=8)
    half = per_row // 2
    axes[0][0].set_title("a photo of <name>", fontsize=8, loc="left")
    axes[0][half].set_title("<name> on a red background", fontsize=8, loc="left")
    fig.tight_layout(pad=0.3)
    fig.savefig(path)
    plt.close(fig)
    return path
