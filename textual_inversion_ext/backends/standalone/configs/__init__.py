"""Bundled diffusers/transformers configs (JSON), so no model repository is ever downloaded.

A package on purpose: setuptools' `"*.json"` package data then ships these files in a wheel."""

from __future__ import annotations
