"""A tiny stand-in for the A1111 host's `modules` package: only the names our glue touches, with
recording behaviour, so settings mapping, hooks and refusals are tested without the host."""

from __future__ import annotations
