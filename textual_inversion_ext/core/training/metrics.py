"""Loss CSV and progress numbers (s/step, ETA) reported while training."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

# A1111's five columns first (tools that read its CSV keep working), then ours; empty = not measured.
CSV_COLUMNS = ("step", "epoch", "epoch_step", "loss", "learn_rate", "val_loss", "norm_ratio")


class LossCsv:
    """Loss log `step,epoch,epoch_step,loss,learn_rate,val_loss,norm_ratio`, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(CSV_COLUMNS)
            self._file.flush()

    def write(self, step: int, epoch: int, epoch_step: int, loss: float, learn_rate: float,
              val_loss: float | None = None, norm_ratio: float | None = None) -> None:
        self._writer.writerow([step, epoch, epoch_step, f"{loss:.7f}", learn_rate,
                               "" if val_loss is None else f"{val_loss:.7f}",
                               "" if norm_ratio is None else f"{norm_ratio:.4f}"])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_loss_csv(path: Path) -> list[dict[str, float | None]]:
    """Rows as numbers; an empty cell (not measured at that step) is None."""
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done, counting steps already in the file
    end_step: int
    loss: float
    learn_rate: float
    s_per_step: float
    eta_s: float
    epoch: int
    message: str = ""
    validation: tuple[tuple[int, float], ...] = ()  # (step, validation loss) measured since the last report
    best_step: int | None = None  # lowest validation loss so far
    norm_ratios: tuple[float, ...] = ()  # each vector's norm / the vocabulary's median norm
    warnings: tuple[str, ...] = ()  # every warning so far (overtraining, inflated norms, recoveries)


class StepTimer:
    """Smoothed seconds per step; the first steps (warm-up, caching) are weighted out quickly."""

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.s_per_step = 0.0
        self._last = time.perf_counter()
        self.started = self._last

    def tick(self) -> float:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.s_per_step = dt if self.s_per_step == 0 else (
            self.smoothing * dt + (1 - self.smoothing) * self.s_per_step
        )
        return self.s_per_step

    def eta(self, steps_left: int) -> float:
        return max(0.0, steps_left * self.s_per_step)
