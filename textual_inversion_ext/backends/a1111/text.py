"""The host's text conditioning for one model family: where its token tables are, what it splices, and how a
batch of prompts becomes the conditioning its `apply_model` takes.

SD1/SD2 have one hijacked text encoder (`cond_stage_model(prompts)` → a tensor). SDXL has sgm's
`GeneralConditioner` holding two hijacked encoders (clip_l, clip_g) plus the size embedders: the host's
`get_learned_conditioning` feeds it a dict of prompts and size tuples and gets `{"crossattn", "vector"}`
back. Going through the conditioner keeps the splice, padding, emphasis and pooling the host's own; only the
size fields are ours, per sample from the crop that was actually applied (the host uses one for a batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...core.backend import SampleGeometry
from ...core.embedding import SDXL_KEYS, SINGLE
from ...core.errors import ModelError


def token_table(encoder: Any) -> torch.nn.Embedding:
    """The token-embedding table of one hijacked text encoder, under the hijack's `EmbeddingsWithFixes`."""
    return getattr(_fixes_module(encoder), "wrapped", _fixes_module(encoder))


def _fixes_module(encoder: Any) -> Any:
    """The module in the token-embedding slot (the hijack's `EmbeddingsWithFixes`, or the plain table)."""
    wrapped = getattr(encoder, "wrapped", encoder)
    if hasattr(wrapped, "transformer"):  # SD1 / SDXL clip_l: HF CLIPTextModel
        return wrapped.transformer.text_model.embeddings.token_embedding
    if hasattr(wrapped, "model") and hasattr(wrapped.model, "token_embedding"):  # SD2 / SDXL clip_g: OpenCLIP
        return wrapped.model.token_embedding
    raise ModelError(f"Cannot find the token-embedding table of {type(wrapped).__name__}.")


class SingleEncoderText:
    """SD1/SD2: the host's hijacked CLIP or OpenCLIP is `cond_stage_model`; its output is the conditioning."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.encoders = {SINGLE: int(token_table(model.cond_stage_model).weight.shape[1])}

    def tables(self) -> dict[str, torch.nn.Embedding]:
        return {SINGLE: token_table(self.model.cond_stage_model)}

    def host_vec(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the host's Embedding holds as `.vec`: one tensor."""
        return vectors[SINGLE]

    def encode(self, prompts: Sequence[str], geometry: Sequence[SampleGeometry] | None) -> Any:
        return self.model.cond_stage_model(list(prompts))  # no size conditioning in SD1/SD2


class SDXLText:
    """SDXL: the conditioner's clip_l + clip_g (the key each splices is its `EmbeddingsWithFixes`' own)."""

    def __init__(self, model: Any, resolution: int) -> None:
        self.model = model
        self.resolution = resolution
        found = {}
        for embedder in getattr(getattr(model, "conditioner", None), "embedders", ()):
            if not hasattr(embedder, "encode_embedding_init_text"):  # the size embedders
                continue
            key = getattr(_fixes_module(embedder), "textual_inversion_key", None)
            found[key] = embedder
        if set(found) != set(SDXL_KEYS):
            raise ModelError("This SDXL-family model does not have the clip_l + clip_g text encoders of SDXL base "
                             f"(found {sorted(str(k) for k in found)}): an SDXL refiner? Refiners only refine; "
                             "load an SDXL base-family checkpoint (SDXL, Pony, Illustrious, ...) to train.")
        self._text = [found[key] for key in SDXL_KEYS]
        self.encoders = {key: int(token_table(found[key]).weight.shape[1]) for key in SDXL_KEYS}

    def tables(self) -> dict[str, torch.nn.Embedding]:
        return {key: token_table(embedder) for key, embedder in zip(SDXL_KEYS, self._text, strict=True)}

    def host_vec(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A loaded SDXL embedding's `.vec` in the host: a dict the splice indexes by encoder key."""
        return {key: vectors[key] for key in SDXL_KEYS}

    def encode(self, prompts: Sequence[str], geometry: Sequence[SampleGeometry] | None) -> dict[str, torch.Tensor]:
        from modules import devices

        if geometry is None:  # unknown (previews, validation of old runs): whole images at the native size
            geometry = [SampleGeometry.uncropped(self.resolution, self.resolution)] * len(prompts)
        if len(geometry) != len(prompts):
            raise ValueError(f"{len(geometry)} geometries for {len(prompts)} prompts")

        def field(values: list[tuple[int, int]]) -> torch.Tensor:  # as the host's get_learned_conditioning
            return torch.tensor(values, device=devices.device, dtype=devices.dtype)

        batch = {
            "txt": list(prompts),
            "original_size_as_tuple": field([g.original for g in geometry]),
            "crop_coords_top_left": field([g.crop for g in geometry]),
            "target_size_as_tuple": field([g.target for g in geometry]),
        }
        with self._with_grad():
            return self.model.conditioner(batch)

    @contextlib.contextmanager
    def _with_grad(self) -> Iterator[None]:
        """sgm's conditioner runs an embedder under no_grad unless it `is_trainable`; our vectors need the
        gradient through both text encoders (their weights stay frozen). Dropout of the caption (`ucg_rate`)
        is off, as the host sets it for generation."""
        saved = [(e, e.is_trainable, getattr(e, "ucg_rate", 0.0)) for e in self.model.conditioner.embedders]
        for embedder in self._text:
            embedder.is_trainable = True
        for embedder, _, _ in saved:
            embedder.ucg_rate = 0.0
        try:
            yield
        finally:
            for embedder, trainable, rate in saved:
                embedder.is_trainable, embedder.ucg_rate = trainable, rate
