"""Terminal output shared by the CLI and the demo: progress bars and the one Ctrl+C handler."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def stop_on_sigint(stop: threading.Event, notice: str, write: Callable[[str], None] | None = None) -> Iterator[None]:
    """First Ctrl+C sets `stop` (the work ends cleanly and saves); a second one raises KeyboardInterrupt."""
    write = write or (lambda text: print(text, file=sys.stderr))

    def on_sigint(signum, frame) -> None:
        write(notice)
        stop.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def progress_printer(unit: str):
    """A tqdm bar when tqdm is installed (standalone extra), else a line every 5 %."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the standalone extra
        tqdm = None
    state: dict = {}

    def update(done: int, total: int, message: str) -> None:
        if tqdm is not None:
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=0.5)
            bar.update(done - bar.n)
        elif total and (done == total or done * 20 // total != (done - 1) * 20 // total):
            print(f"{done}/{total} {message}", file=sys.stderr)

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()

    return update, close


def train_with_progress_bar(backend, request):
    """Run training with a terminal progress bar; Ctrl+C stops cleanly and saves."""
    from tqdm import tqdm

    from .core.training.run import run_training

    stop = threading.Event()
    bar = tqdm(total=request.params.max_steps, unit="step", dynamic_ncols=True, mininterval=0.5)

    def on_progress(p) -> None:
        bar.total = p.end_step
        val = f" val {p.validation[-1][1]:.4f}" if p.validation else ""
        bar.set_postfix_str(f"loss {p.loss:.4f}{val} lr {p.learn_rate:.2g} {p.s_per_step:.3f}s/step "
                            f"ETA {p.eta_s:.0f}s", refresh=False)
        bar.update(p.step - bar.n)  # redraws at most every mininterval, not every step

    try:
        with stop_on_sigint(stop, "Stopping after this step and saving… (Ctrl+C again to abort)", tqdm.write):
            return run_training(backend, request, progress=on_progress, status=tqdm.write, stop=stop)
    finally:
        bar.close()
