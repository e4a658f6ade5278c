from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class OptionInfo:
    def __init__(self, default: Any = None, label: str = "", component: Any = None, component_args: Any = None,
                 onchange: Any = None, section: Any = None, refresh: Any = None, category_id: Any = None,
                 **_: Any) -> None:
        self.default, self.label, self.section, self.category_id = default, label, section, category_id


class Options:
    def __init__(self) -> None:
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key: str) -> Any:
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value


class State:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.interrupted = False
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.textinfo = None

    def begin(self, job: str = "(unknown)") -> None:
        self.calls.append(("begin", job))
        self.interrupted = False
        self.job, self.job_count, self.job_no = job, -1, 0

    def end(self) -> None:
        self.calls.append(("end", self.job))
        self.job, self.job_count = "", 0


opts = Options()
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, api_auth=None, embeddings_dir="embeddings")
state = State()
sd_model: Any = None
parallel_processing_allowed = True
