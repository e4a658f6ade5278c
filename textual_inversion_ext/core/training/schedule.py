"""A1111's "rate until step" schedule grammar, used for the learning rate and the gradient-clip value.

Grammar (whitespace around tokens is allowed)::

    schedule := item ("," item)*
    item     := RATE | RATE ":" STEP
    RATE     := a finite number > 0          (0.005, 5e-3)
    STEP     := a whole number > 0, or -1    (100; no "1e3", no "100.0")

Semantics, identical to A1111's `LearnScheduleIterator`/`LearnRateScheduler` for every schedule
both accept (see HOST-NOTES §2):

* `RATE:STEP` is used for the steps before STEP; items whose STEP <= the resume step are skipped.
* `RATE:STEP` with STEP > max_steps is clamped to max_steps and ends the schedule.
* `RATE:-1` and a bare `RATE` run until max_steps and end the schedule.
* Training stops when the last segment ends, so `0.005:1000` caps training at step 1000.

Where we differ on purpose: A1111 silently ignores empty items, items after the end of the
schedule that are not numbers, `0.1:10:20` (read as rate 0.1) and steps <= 0; a typo there changes
the schedule without a word. Every item must be well-formed here, steps must increase, and the
error names the item. A1111 also spends one step on a segment that clamping made empty
(`0.01:1000, 0.001` with max 1000); we drop empty segments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..errors import ScheduleError

logger = logging.getLogger(__name__)

UNTIL_MAX = -1  # the STEP value that means "until max_steps"

_EXAMPLE = '"0.005", or "0.05:50, 0.01:100, 0.005" (0.05 until step 50, 0.01 until 100, then 0.005)'


@dataclass(frozen=True)
class ScheduleItem:
    """One parsed item: `rate` until `until_step` (None = bare rate, -1 = explicitly until max_steps)."""

    rate: float
    until_step: int | None = None

    @property
    def ends_schedule(self) -> bool:
        """Bare rates and `:-1` end parsing in A1111: every later item is ignored."""
        return self.until_step is None or self.until_step == UNTIL_MAX

    def __str__(self) -> str:
        # repr() of a float is the shortest text that reads back to the same float.
        rate = repr(self.rate)
        return rate if self.until_step is None else f"{rate}:{self.until_step}"


@dataclass(frozen=True)
class Segment:
    """`rate` applies to the steps `start <= step < end`."""

    rate: float
    start: int
    end: int


def _fail(what: str, position: int, raw: str, problem: str) -> ScheduleError:
    return ScheduleError(
        f"Invalid {what} schedule: item {position} {raw.strip()!r} {problem}. Write a number or "
        f"comma-separated RATE:STEP items, e.g. {_EXAMPLE}."
    )


def _parse_rate(text: str, what: str, position: int, raw: str) -> float:
    token = text.strip()
    if not token:
        raise _fail(what, position, raw, "has no rate before ':'")
    try:
        rate = float(token)
    except ValueError:
        raise _fail(what, position, raw, f"has a rate {token!r} that is not a number") from None
    if not math.isfinite(rate):
        raise _fail(what, position, raw, f"has a rate {token!r} that is not a finite number")
    if rate <= 0:
        raise _fail(what, position, raw, f"has a rate {token!r} that is not greater than 0")
    return rate


def _parse_step(text: str, what: str, position: int, raw: str) -> int:
    token = text.strip()
    if not token:
        raise _fail(what, position, raw, "has no step after ':'")
    try:
        step = int(token)  # like A1111: "100" and "-1" work, "1e3" and "100.0" do not
    except ValueError:
        raise _fail(what, position, raw, f"has a step {token!r} that is not a whole number") from None
    if step <= 0 and step != UNTIL_MAX:
        raise _fail(what, position, raw, f"has a step {token!r}; steps are > 0, or -1 for 'until the end'")
    return step


def parse_schedule(text: str, *, what: str = "learning rate") -> list[ScheduleItem]:
    """Parse the syntax of every item (also those the semantics would ignore); raise ScheduleError.

    `what` names the schedule in messages ("learning rate", "gradient clip value").
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))  # an API caller passing 0.005 means "0.005"
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError(f"The {what} schedule is empty. Write e.g. {_EXAMPLE}.")
    items: list[ScheduleItem] = []
    last_step: tuple[int, int] | None = None  # (step, position) of the latest explicit step
    for position, raw in enumerate(text.split(","), start=1):
        if not raw.strip():
            raise _fail(what, position, raw, "is empty (two commas in a row, or a comma at the start or end)")
        parts = raw.split(":")
        if len(parts) > 2:
            raise _fail(what, position, raw, "has more than one ':'")
        rate = _parse_rate(parts[0], what, position, raw)
        step = _parse_step(parts[1], what, position, raw) if len(parts) == 2 else None
        if step is not None and step != UNTIL_MAX:
            # A1111 would give a non-increasing step a zero-length segment: almost surely a typo.
            if last_step is not None and step <= last_step[0]:
                raise _fail(
                    what, position, raw,
                    f"has step {step}, which is not after step {last_step[0]} of item {last_step[1]}",
                )
            last_step = (step, position)
        items.append(ScheduleItem(rate, step))
    return items


def format_schedule(items: list[ScheduleItem] | tuple[ScheduleItem, ...]) -> str:
    """The canonical text of parsed items; `parse_schedule(format_schedule(x)) == x`."""
    return ", ".join(str(item) for item in items)


def _segment_ends(
    items: list[ScheduleItem], max_steps: int, start_step: int
) -> tuple[list[tuple[float, int]], list[ScheduleItem]]:
    """A1111's parse semantics: (rate, end step) pairs, and the items ignored after the schedule ended."""
    ends: list[tuple[float, int]] = []
    for index, item in enumerate(items):
        stop = False
        if item.ends_schedule:
            ends.append((item.rate, max_steps))
            stop = True
        elif item.until_step is not None and item.until_step > start_step:
            ends.append((item.rate, min(item.until_step, max_steps)))
            stop = item.until_step > max_steps
        # else: the step has already been trained past (resume): skipped, as in A1111
        if stop:
            return ends, items[index + 1 :]
    return ends, []


class LRSchedule:
    """A parsed schedule bound to `max_steps` and the step training starts (or resumes) at.

    Steps count optimizer steps already done: the update made when `embedding.step == s` uses
    `rate_at(s)`, and training stops once `finished(embedding.step)` is true. When start_step is
    already at or past the end (e.g. start_step >= max_steps), the schedule is built with no segments
    and `finished(start_step)` is true, so the caller can say so in its own words.
    """

    def __init__(self, text: str, max_steps: int, start_step: int = 0, *, what: str = "learning rate"):
        if max_steps < 1:
            raise ScheduleError(f"Max steps must be at least 1, got {max_steps}.")
        if start_step < 0:
            raise ScheduleError(f"The start step cannot be negative, got {start_step}.")
        self.what = what
        self.max_steps = max_steps
        self.start_step = start_step
        self.items: tuple[ScheduleItem, ...] = tuple(parse_schedule(text, what=what))
        ends, ignored = _segment_ends(list(self.items), max_steps, start_step)
        if not ends:  # A1111 raises here too
            last = max(i.until_step or 0 for i in self.items)
            raise ScheduleError(
                f"The {what} schedule {format_schedule(self.items)!r} ends at step {last}, but training "
                f"resumes at step {start_step}: add a later step, or end the schedule with a bare rate "
                f"(or RATE:-1) to train until max steps ({max_steps})."
            )
        segments: list[Segment] = []
        begin = start_step
        for rate, end in ends:
            if end > begin:  # a segment that clamping made empty would get one extra step in A1111
                segments.append(Segment(rate, begin, end))
                begin = end
        self.segments: tuple[Segment, ...] = tuple(segments)
        # Ends never decrease, so the last one is where training stops (also with no segments left).
        self.end_step: int = ends[-1][1]
        self._final_rate = segments[-1].rate if segments else ends[-1][0]
        if ignored:
            logger.info(
                "%s schedule ends at step %d; ignoring the later items %s",
                what.capitalize(), self.end_step, format_schedule(ignored),
            )

    def finished(self, step: int) -> bool:
        return step >= self.end_step

    def segment_at(self, step: int) -> Segment | None:
        """The segment whose range holds `step`; None at or past the end."""
        if step < self.start_step:
            raise ValueError(f"step {step} is before the schedule's start step {self.start_step}")
        for segment in self.segments:
            if step < segment.end:
                return segment
        return None

    def rate_at(self, step: int) -> float:
        """The rate for the update at `step`; at or past the end, the last rate (as A1111 keeps it)."""
        segment = self.segment_at(step)
        return segment.rate if segment is not None else self._final_rate

    def describe(self) -> str:
        """One line per segment, for logs and the UI."""
        if not self.segments:
            return f"nothing left to train: the schedule ends at step {self.end_step}"
        return "; ".join(f"{s.rate:g} for steps {s.start}–{s.end - 1}" for s in self.segments)

    def __repr__(self) -> str:
        return (
            f"LRSchedule({format_schedule(self.items)!r}, max_steps={self.max_steps}, "
            f"start_step={self.start_step})"
        )
