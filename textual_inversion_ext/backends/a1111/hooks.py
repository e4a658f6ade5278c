"""`HostHooks` on the host's GPU queue lock and its progress/interrupt state (`shared.state`)."""

from __future__ import annotations

import logging

from ...jobs import HostHooks

logger = logging.getLogger(__name__)


def host_hooks() -> HostHooks:
    from modules import call_queue, progress, shared

    current: list[str] = []  # the job id begin() announced, for end()

    def begin(job_id: str, total: int) -> None:
        current[:] = [job_id]
        shared.state.begin(job=job_id)  # also clears a stale `interrupted`
        shared.state.job_count = total
        shared.state.textinfo = "Preparing textual inversion training…"
        progress.start_task(job_id)  # /internal/progress and /sdapi/v1/progress show it

    def update(step: int, total: int, text: str) -> None:
        shared.state.job_count = total
        shared.state.job_no = step
        shared.state.textinfo = text

    def end() -> None:
        shared.state.end()
        if current:
            progress.finish_task(current.pop())

    return HostHooks(
        lock=lambda: call_queue.queue_lock,  # generation, model switches and training take turns
        begin=begin,
        update=update,
        host_interrupted=lambda: bool(shared.state.interrupted),
        end=end,
    )
