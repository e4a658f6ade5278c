from __future__ import annotations

events: list[tuple[str, str]] = []


def start_task(id_task: str) -> None:
    events.append(("start", id_task))


def finish_task(id_task: str) -> None:
    events.append(("finish", id_task))
