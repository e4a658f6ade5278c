"""The job runner: a failing host hook never leaves a job running; interrupt never rewrites a finished job."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

from textual_inversion_ext.jobs import HostHooks, Job, JobManager


def _wait(jobs: JobManager, job: Job, timeout: float = 10) -> Job:
    deadline = time.time() + timeout
    while job.active and time.time() < deadline:
        time.sleep(0.01)
    assert not job.active, f"job {job.id} still {job.status}"
    for thread in threading.enumerate():  # and the runner's last steps (end hook, its log) are done
        if thread.name == f"tiext-{job.id}":
            thread.join(timeout)
    return job


def _raise(*_args: Any) -> None:
    raise RuntimeError("host progress state is broken")


@pytest.mark.parametrize("broken", ["begin", "end", "lock"])
def test_a_raising_host_hook_ends_the_job_and_the_next_one_starts(broken, caplog):
    ended: list[str] = []
    hooks = HostHooks(end=lambda: ended.append("end"))
    if broken == "begin":
        hooks.begin = _raise
    elif broken == "end":
        hooks.end = _raise
    else:
        @contextlib.contextmanager
        def lock():
            _raise()
            yield
        hooks.lock = lock
    jobs = JobManager(hooks)
    job = _wait(jobs, jobs.start("train", "toy", lambda job: {"message": "done"}))
    if broken == "end":  # the work had finished: its outcome stands, the hook's failure is only logged
        assert (job.status, job.message) == ("finished", "done")
    else:
        assert job.status == "error" and "host progress state is broken" in job.message
    assert job.finished is not None and "host progress state is broken" in caplog.text
    if broken == "begin":
        assert ended == ["end"]  # the host's state is still cleaned up
    jobs.hooks = HostHooks()
    assert _wait(jobs, jobs.start("train", "next", lambda job: {})).status == "finished"


def test_interrupt_shows_the_note_while_stopping_and_never_rewrites_a_finished_job():
    go = threading.Event()

    def work(job: Job) -> dict[str, Any]:
        job.message = "Training…"
        go.wait(10)
        job.message = "Saving…"  # the runner's own writes go on while it stops
        return {"status": "interrupted" if job.stop.is_set() else "finished", "message": "Stopped at step 3."}

    jobs = JobManager()
    job = jobs.start("train", "toy", work)
    while job.message != "Training…":
        time.sleep(0.01)
    assert jobs.interrupt().to_dict()["message"].startswith("Interrupting")
    go.set()
    _wait(jobs, job)
    assert (job.status, job.to_dict()["message"]) == ("interrupted", "Stopped at step 3.")

    done = _wait(jobs, jobs.start("train", "toy", lambda job: {"message": "Finished."}))
    late = jobs.interrupt(done.id)  # a late click: the final status and message stay
    assert not late.stop.is_set()
    assert (late.status, late.to_dict()["message"]) == ("finished", "Finished.")


def test_an_interrupt_racing_the_end_of_a_job_keeps_the_final_message():
    """The job ends between interrupt()'s "still active?" check and its reaction (forced here by a stop
    flag whose set() lets the job finish first): the final message must survive."""
    go = threading.Event()

    class RacingStop(threading.Event):
        def set(self) -> None:
            go.set()
            deadline = time.time() + 1  # the fixed runner waits for the guard interrupt() holds: give up
            while job.finished is None and time.time() < deadline:
                time.sleep(0.01)
            super().set()

    def work(job: Job) -> dict[str, Any]:
        go.wait(10)
        return {"message": "Finished."}

    jobs = JobManager()
    job = jobs.start("train", "toy", work)
    job.stop = RacingStop()
    jobs.interrupt(job.id)
    _wait(jobs, job)
    assert (job.status, job.to_dict()["message"]) == ("finished", "Finished.")
