"""Waiting for a background job in tests."""

from __future__ import annotations

import time
from typing import Any


def wait_for_job(service: Any, job_id: str, timeout: float = 300) -> dict:
    """Poll `service.job_status(job_id)` until the job ends; its final status dict."""
    deadline = time.time() + timeout
    status: dict = {}
    while time.time() < deadline:
        status = service.job_status(job_id)
        if not status["active"]:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout} s: {status}")
