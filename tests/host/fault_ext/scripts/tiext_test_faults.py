"""Test-only A1111 extension for tests/host: fault injection and model state, from outside the package.

Link it into the lab beside the extension and restart the web UI:
`ext.sh link <repo>/tests/host/fault_ext tiext-test-faults`. It adds two routes (never shipped):
- `GET /tiext-test/model`: what the host's model looks like now (trainable tensors per part, VAE device,
  gradient checkpointing, whether a trainable embedding is registered in the host's DB);
- `POST /tiext-test/fail {"after": N}`: the training-loss call after the next N raises once — the
  extension's service gets its backend wrapped in tests/_faults.py's FaultyBackend, as the CPU tests do.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from modules import script_callbacks

logger = logging.getLogger("tiext_test_faults")
FAULTS_FILE = Path(__file__).resolve().parents[3] / "_faults.py"  # tests/_faults.py


def _faulty_backend_class() -> Any:
    spec = importlib.util.spec_from_file_location("tiext_test_faults_impl", FAULTS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FaultyBackend


def _sgm_checkpointing() -> bool:
    import sgm.modules.attention

    return sgm.modules.attention.checkpoint.__name__ == "torch_checkpoint"


def _forge_model_state() -> dict[str, Any]:
    """The same questions of Forge's model: its parts live in `forge_objects`, its embedding databases in the
    text-processing engines (one per encoder)."""
    import torch
    from modules import shared

    m = shared.sd_model
    if not hasattr(m, "forge_objects"):
        return {"loaded": False}
    objects = m.forge_objects
    engines = [getattr(m, n) for n in ("text_processing_engine", "text_processing_engine_l",
                                       "text_processing_engine_g") if hasattr(m, n)]
    import backend.nn.unet as forge_unet

    def trainable(module: torch.nn.Module) -> int:
        return sum(1 for p in module.parameters() if p.requires_grad)

    return {
        "loaded": True,
        "unet_trainable_tensors": trainable(objects.unet.model.diffusion_model),
        "text_encoder_trainable_tensors": trainable(objects.clip.cond_stage_model),
        "vae_trainable_tensors": trainable(objects.vae.first_stage_model),
        "vae_device": str(next(objects.vae.first_stage_model.parameters()).device),
        "gradient_checkpointing": getattr(forge_unet, "checkpoint", None).__name__ == "torch_checkpoint",
        "embedding_registered": any(not hasattr(e, "filename") for eng in engines
                                    for e in eng.embeddings.word_embeddings.values()),
        "engines": len(engines),
    }


def model_state() -> dict[str, Any]:
    if importlib.util.find_spec("modules_forge") is not None:
        return _forge_model_state()
    from modules import sd_hijack, sd_hijack_checkpoint, shared

    def trainable(module: Any) -> int:
        return sum(1 for p in module.parameters() if p.requires_grad)

    m = shared.sd_model
    db = sd_hijack.model_hijack.embedding_db
    return {
        "unet_trainable_tensors": trainable(m.model),
        "text_encoder_trainable_tensors": trainable(m.cond_stage_model),
        "vae_trainable_tensors": trainable(m.first_stage_model),
        "vae_device": str(next(m.first_stage_model.parameters()).device),
        "gradient_checkpointing": bool(sd_hijack_checkpoint.stored),
        # SDXL: the extension's own checkpointing of sgm's blocks (the host's covers ldm only)
        "sgm_checkpointing": _sgm_checkpointing(),
        # The extension registers its trainable vectors as an Embedding made in memory (no file).
        "embedding_registered": any(e.filename is None for e in db.word_embeddings.values()),
    }


def latents_check() -> dict[str, Any]:
    """Our backend's latent distribution against the host's own `encode_first_stage` (+ the host's
    `get_first_stage_encoding`) on one random image, with the same random draw: what the host's pipeline
    makes of that image is our mean + std * noise, in the same (scaled) units."""
    import torch
    from modules import shared

    from textual_inversion_ext.backends.a1111 import glue

    m = shared.sd_model
    first_stage = m.forge_objects.vae.first_stage_model if hasattr(m, "forge_objects") else m.first_stage_model
    dtype = next(first_stage.parameters()).dtype
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = glue.current_backend().encode_images(pixels)
    with torch.no_grad():
        torch.manual_seed(1)
        if hasattr(m, "forge_objects"):  # Forge: encode_first_stage samples and applies the VAE's process_in
            host = m.encode_first_stage(pixels.to(ours.mean.device)).float()
        else:
            host = m.get_first_stage_encoding(m.encode_first_stage(pixels.to(ours.mean.device, dtype))).float()
    torch.manual_seed(1)
    sample = ours.mean + ours.std * torch.randn(ours.mean.shape).to(ours.mean.device)
    scale = getattr(m, "scale_factor", None) or first_stage.scaling_factor  # Forge: the VAE's own
    return {"scale_factor": float(scale), "max_abs_diff": float((host - sample).abs().max()),
            "host_std": float(host.std()), "shape": list(host.shape)}


def on_app_started(_demo: Any, app: Any) -> None:
    from fastapi import Body

    from textual_inversion_ext.backends.a1111 import glue

    faulty_backend = _faulty_backend_class()
    service = glue.get_service()
    plain = service.backend
    armed: dict[str, Any] = {"wrapper": None}

    def backend() -> Any:
        inner, wrapper = plain(), armed["wrapper"]
        return wrapper if wrapper is not None and wrapper._inner is inner else inner

    service.backend = backend

    def fail(body: dict = Body(...)) -> dict:  # noqa: B008 (FastAPI idiom)
        after = body.get("after")
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            return {"error": "'after' must be a non-negative integer."}
        armed["wrapper"] = faulty_backend(plain(), {after + 1}, fault="raise")
        return {"armed": True, "after": after}

    app.add_api_route("/tiext-test/model", model_state, methods=["GET"], response_model=None)
    app.add_api_route("/tiext-test/fail", fail, methods=["POST"], response_model=None)
    app.add_api_route("/tiext-test/latents", latents_check, methods=["GET"], response_model=None)
    logger.warning("tiext-test-faults: test-only routes /tiext-test/model and /tiext-test/fail are served")


script_callbacks.on_app_started(on_app_started)
