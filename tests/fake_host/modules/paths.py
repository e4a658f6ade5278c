from __future__ import annotations

data_path = "."
