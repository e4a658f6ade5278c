"""Forge (lllyasviel/stable-diffusion-webui-forge) backend: the only place that imports Forge's `backend`
package. The glue (tabs, settings, REST, progress) is the A1111 glue: Forge keeps that host API."""

from __future__ import annotations
