from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textual_inversion_ext.core.errors import ScheduleError
from textual_inversion_ext.core.training.schedule import (
    LRSchedule,
    ScheduleItem,
    Segment,
    format_schedule,
    parse_schedule,
)


def a1111_rates(text: str, max_steps: int, cur_step: int) -> list[float] | None:
    """Oracle: the host's parse rules and its scheduler loop (HOST-NOTES §2, §1.8), written from the
    notes. Returns the rate used for each optimizer step from cur_step until training stops, or None
    where the host raises (no segment left)."""
    rates: list[tuple[float, int]] = []
    for pair in text.split(","):
        if not pair.strip():
            continue
        tmp = pair.split(":")
        if len(tmp) == 2:
            step = int(tmp[1])
            if step > cur_step:
                rates.append((float(tmp[0]), min(step, max_steps)))
                if step > max_steps:
                    break
            elif step == -1:
                rates.append((float(tmp[0]), max_steps))
                break
        else:
            rates.append((float(tmp[0]), max_steps))
            break
    if not rates:
        return None
    pending = iter(rates)
    lr, end = next(pending)
    used: list[float] = []
    step = cur_step
    while True:
        if step >= end:  # LearnRateScheduler.step(): advance one segment, or finish
            try:
                lr, end = next(pending)
            except StopIteration:
                break
        used.append(lr)
        step += 1
    return used


# --- examples -------------------------------------------------------------------------------


def test_single_rate_runs_to_max_steps() -> None:
    s = LRSchedule("0.005", 1000)
    assert s.segments == (Segment(0.005, 0, 1000),)
    assert s.end_step == 1000
    assert s.rate_at(0) == s.rate_at(999) == 0.005
    assert not s.finished(999) and s.finished(1000)


def test_documented_example() -> None:
    s = LRSchedule("0.05:50, 0.01:100, 0.005", 1000)
    assert [s.rate_at(i) for i in (0, 49, 50, 99, 100, 999)] == [0.05, 0.05, 0.01, 0.01, 0.005, 0.005]
    assert s.end_step == 1000


def test_long_example() -> None:
    s = LRSchedule("0.05:50, 0.01:100, 0.005:500, 0.001:1000, 0.0005", 3000)
    assert [seg.end for seg in s.segments] == [50, 100, 500, 1000, 3000]
    assert s.rate_at(1000) == 0.0005


def test_last_explicit_step_caps_training() -> None:
    s = LRSchedule("0.005:1000", 3000)
    assert s.end_step == 1000
    assert s.finished(1000)


def test_until_max_marker_stops_parsing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="textual_inversion_ext.core.training.schedule"):
        s = LRSchedule("0.01:-1, 0.001", 500)
    assert s.segments == (Segment(0.01, 0, 500),)
    assert "0.001" in caplog.text  # the ignored tail is logged


def test_bare_rate_stops_parsing() -> None:
    s = LRSchedule("0.1, 0.05:10", 100)
    assert s.segments == (Segment(0.1, 0, 100),)


def test_step_past_max_clamps_and_stops() -> None:
    s = LRSchedule("0.05:50, 0.01:2000, 0.001", 1000)
    assert s.segments == (Segment(0.05, 0, 50), Segment(0.01, 50, 1000))
    assert s.end_step == 1000


def test_segment_emptied_by_clamping_is_dropped() -> None:
    # A1111 would train one extra step at 0.001 here.
    s = LRSchedule("0.01:1000, 0.001", 1000)
    assert s.segments == (Segment(0.01, 0, 1000),)


def test_resume_skips_passed_items() -> None:
    s = LRSchedule("0.05:50, 0.01:100, 0.005", 1000, start_step=70)
    assert s.segments == (Segment(0.01, 70, 100), Segment(0.005, 100, 1000))


def test_resume_past_every_step_is_a_clear_error() -> None:
    with pytest.raises(ScheduleError, match=r"ends at step 500.*resumes at step 600"):
        LRSchedule("0.005:500", 1000, start_step=600)
    with pytest.raises(ScheduleError, match="resumes at step 500"):
        LRSchedule("0.005:500", 1000, start_step=500)


def test_resume_at_or_past_max_steps_is_finished_at_once() -> None:
    # The trainer reports this case itself, in training terms.
    s = LRSchedule("0.005", 1000, start_step=1000)
    assert s.segments == ()
    assert s.end_step == 1000 and s.finished(1000)
    assert s.rate_at(1000) == 0.005
    assert "nothing left" in s.describe()
    assert LRSchedule("0.01:50, 0.005:2000", 1000, start_step=1200).end_step == 1000


def test_bad_bounds() -> None:
    with pytest.raises(ScheduleError):
        LRSchedule("0.005", 0)
    with pytest.raises(ScheduleError):
        LRSchedule("0.005", 10, start_step=-1)
    with pytest.raises(ValueError):
        LRSchedule("0.005", 100, start_step=10).rate_at(5)


def test_rate_after_end_keeps_last_rate() -> None:
    s = LRSchedule("0.05:50, 0.01:100", 1000)
    assert s.end_step == 100
    assert s.rate_at(100) == s.rate_at(5000) == 0.01


def test_whitespace_and_number_forms() -> None:
    assert parse_schedule(" 5e-3 : 10 ,\t1E-4:-1 ") == [ScheduleItem(0.005, 10), ScheduleItem(1e-4, -1)]
    assert parse_schedule(0.005) == [ScheduleItem(0.005)]  # type: ignore[arg-type]


def test_message_names_the_schedule() -> None:
    with pytest.raises(ScheduleError, match="gradient clip value"):
        LRSchedule("x", 10, what="gradient clip value")


@pytest.mark.parametrize(
    ("text", "position", "bad"),
    [
        ("0.05:fifty", 1, "0.05:fifty"),
        (":10", 1, ":10"),
        ("-0.1", 1, "-0.1"),
        ("0", 1, "0"),
        ("0.1:10:20", 1, "0.1:10:20"),
        ("nan", 1, "nan"),
        ("inf", 1, "inf"),
        ("0.05:50, 1e999", 2, "1e999"),
        ("0.05:", 1, "0.05:"),
        ("0.05:1e3", 1, "0.05:1e3"),
        ("0.05:100.0", 1, "0.05:100.0"),
        ("0.05:0", 1, "0.05:0"),
        ("0.05:-5", 1, "0.05:-5"),
        ("0.05:50, 0.01:50", 2, "0.01:50"),
        ("0.05:50, 0.01:40", 2, "0.01:40"),
        ("0.005, garbage", 2, "garbage"),  # A1111 ignores everything after a bare rate; we still check it
    ],
)
def test_malformed_items(text: str, position: int, bad: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(text)
    assert f"item {position} {bad!r}" in str(info.value)


@pytest.mark.parametrize(("text", "position"), [("0.05:50,,0.01", 2), (",0.01", 1), ("0.01,", 2)])
def test_empty_items_name_their_position(text: str, position: int) -> None:
    with pytest.raises(ScheduleError, match=f"item {position} '' is empty"):
        parse_schedule(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_schedule(text: str) -> None:
    with pytest.raises(ScheduleError, match="empty"):
        parse_schedule(text)


# --- properties -----------------------------------------------------------------------------

_rates = st.one_of(
    st.sampled_from(["0.005", "5e-3", "1e-4", "0.1", "2", "0.0005"]),
    st.floats(min_value=1e-8, max_value=10.0, allow_nan=False).map(repr),
)
_pad = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def valid_schedules(draw: st.DrawFn) -> str:
    """Valid schedule text: strictly increasing explicit steps, maybe a bare or -1 item at the end."""
    steps = sorted(draw(st.sets(st.integers(1, 3000), min_size=0, max_size=6)))
    ending = draw(st.sampled_from(["none", "bare", "minus1"]))
    if not steps and ending == "none":
        ending = "bare"
    parts = []
    for step in steps:
        parts.append(f"{draw(_pad)}{draw(_rates)}{draw(_pad)}:{draw(_pad)}{step}{draw(_pad)}")
    if ending == "bare":
        parts.append(f"{draw(_pad)}{draw(_rates)}{draw(_pad)}")
    elif ending == "minus1":
        parts.append(f"{draw(_rates)}:-1")
    return ",".join(parts)


@settings(max_examples=300, deadline=None)
@given(valid_schedules(), st.integers(1, 3500), st.data())
def test_matches_a1111_semantics(text: str, max_steps: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, max_steps - 1))
    expected = a1111_rates(text, max_steps, start)
    if expected is None:
        with pytest.raises(ScheduleError):
            LRSchedule(text, max_steps, start)
        return
    s = LRSchedule(text, max_steps, start)
    # The only deliberate difference: we drop a segment that clamping left empty (A1111 trains it
    # for one step), so compare step by step up to our end.
    actual = [s.rate_at(i) for i in range(start, s.end_step)]
    assert actual == expected[: len(actual)]
    assert len(expected) - len(actual) in (0, 1)
    if len(expected) != len(actual):
        assert s.end_step == max_steps


@settings(max_examples=200, deadline=None)
@given(valid_schedules(), st.integers(1, 3500))
def test_segments_are_contiguous_and_piecewise_constant(text: str, max_steps: int) -> None:
    s = LRSchedule(text, max_steps)
    assert s.segments[0].start == 0
    assert s.end_step <= max_steps
    for prev, seg in zip(s.segments, s.segments[1:]):
        assert prev.end == seg.start
    for seg in s.segments:
        assert seg.start < seg.end
        assert s.rate_at(seg.start) == s.rate_at(seg.end - 1) == seg.rate
        assert s.rate_at((seg.start + seg.end) // 2) == seg.rate


@settings(max_examples=200, deadline=None)
@given(valid_schedules(), st.integers(2, 3500), st.data())
def test_resume_gives_the_same_rates(text: str, max_steps: int, data: st.DataObject) -> None:
    fresh = LRSchedule(text, max_steps)
    k = data.draw(st.integers(0, fresh.end_step - 1))
    resumed = LRSchedule(text, max_steps, start_step=k)
    assert resumed.end_step == fresh.end_step
    probes = {k, fresh.end_step - 1, *data.draw(st.lists(st.integers(k, fresh.end_step - 1), max_size=10))}
    for step in probes:
        assert resumed.rate_at(step) == fresh.rate_at(step)


@settings(max_examples=200, deadline=None)
@given(valid_schedules())
def test_format_then_parse_is_identity(text: str) -> None:
    items = parse_schedule(text)
    assert parse_schedule(format_schedule(items)) == items
    assert format_schedule(parse_schedule(format_schedule(items))) == format_schedule(items)


_BAD_ITEMS = [
    "0.05:fifty", ":10", "-0.1", "0", "0.1:10:20", "nan", "inf", "-inf", "abc", "0.05:", "0.05:1.5",
    "0.05:1e3", "0.05:0", "0.05:-2", "1e-3:x", "0.05::10", "--1",
]


@settings(max_examples=300, deadline=None)
@given(valid_schedules(), st.sampled_from([*_BAD_ITEMS, ""]), st.data())
def test_malformed_item_anywhere_is_named(text: str, bad: str, data: st.DataObject) -> None:
    parts = text.split(",")
    position = data.draw(st.integers(0, len(parts)))
    parts.insert(position, f" {bad} ")
    with pytest.raises(ScheduleError) as info:
        parse_schedule(",".join(parts))
    assert f"item {position + 1} {bad!r}" in str(info.value)
