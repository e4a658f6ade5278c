"""Loading a user's single-file SD1.x/SD2.x/SDXL checkpoint (A1111/ldm layout), fully offline.

We read the file once ourselves (safetensors, or `torch.load(weights_only=True)` for `.ckpt`, so no
pickle code runs), convert each component with diffusers' own `single_file_utils` converters and
load it strictly into modules built from the bundled configs. Nothing calls `from_pretrained`, so
no Hugging Face repository (or network) is ever consulted. We do not use the per-component
`from_single_file`: without `accelerate` it loads with `strict=False`, so a config that does not
fit the file would silently leave random weights, and it would read a multi-GB file three times.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ...core.backend import ModelInfo
from ...core.embedding import SDXL_KEYS, SINGLE
from ...core.errors import ModelError
from . import loading_sdxl as xl
from .backend import StandaloneBackend
from .base import VaeSource
from .loading_yaml import config_from_yaml, read_original_config
from .memory import trim_memory
from .models import ModelConfig, model_config
from .sdxl import StandaloneSDXLBackend

logger = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("epsilon", "v_prediction")

# Some SD1 files store the CLIP text model without its `text_model.` level (A1111 renames them too).
_SD1_TEXT_RENAMES = {
    CLIP_L + "embeddings.": CLIP_L + "text_model.embeddings.",
    CLIP_L + "encoder.": CLIP_L + "text_model.encoder.",
    CLIP_L + "final_layer_norm.": CLIP_L + "text_model.final_layer_norm.",
}


def file_short_hash(path: Path) -> str:
    """A1111's short hash of a checkpoint: the first 10 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.ckpt` file; a `.ckpt` is unpickled with weights_only=True."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"{path.name} is not a readable .safetensors file ({exc}).") from exc
    if suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelError(f"{path.name}: expected a .safetensors or .ckpt Stable Diffusion checkpoint.")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path.name} contains Python objects other than tensors, and loading it could run code, so it "
            "was not loaded. If you trust the file, convert it to .safetensors (e.g. with the A1111 "
            "checkpoint merger or a conversion script) and load that instead."
        ) from exc
    except Exception as exc:
        raise ModelError(f"{path.name} is not a readable checkpoint ({type(exc).__name__}: {exc}).") from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} holds a {type(data).__name__}, not a checkpoint state dict.")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise ModelError(f"{path.name} cannot be read any more ({exc}); load the model again.") from exc
    return st.st_size, st.st_mtime_ns


def vae_reader(path: Path, config: ModelConfig) -> VaeSource:
    """The VAE's weights read again from the checkpoint file (only its VAE tensors where the format allows),
    converted as at load; a ModelError once the file has changed or gone."""
    stamp = _stamp(path)

    def read() -> dict[str, torch.Tensor]:
        if _stamp(path) != stamp:
            raise ModelError(f"{path.name} has changed since the model was loaded; load the model again.")
        if path.suffix.lower() == ".safetensors":
            with safetensors.safe_open(str(path), "pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(VAE)}  # noqa: SIM118 (not iterable)
        else:
            state = {k: v for k, v in read_state_dict(path).items() if k.startswith(VAE)}
        return convert_ldm_vae_checkpoint(state, config.vae)

    return read


def detect_family(state: dict[str, torch.Tensor], name: str = "checkpoint") -> str:
    """"sd1", "sd2" or "sdxl" from the key layout; ModelError for SDXL refiners and anything unknown."""
    keys = state.keys()
    has_unet = any(k.startswith(UNET) for k in keys)
    has_vae = any(k.startswith(VAE) for k in keys)
    if xl.is_sdxl(keys, name):  # raises for a refiner or half a conditioner
        has_sd1, has_sd2, family = True, False, "sdxl"
    else:
        has_sd1 = any(k.startswith(CLIP_L) for k in keys)
        has_sd2 = any(k.startswith(OPEN_CLIP) for k in keys)
        family = "sd1" if has_sd1 else "sd2"
    if has_unet and has_vae and has_sd1 != has_sd2:
        return family
    found = sorted({".".join(k.split(".")[:2]) for k in keys})[:8]
    missing = [n for n, ok in (("UNet " + UNET, has_unet), ("VAE " + VAE, has_vae),
                               ("text encoder " + CLIP_L + " or " + OPEN_CLIP, has_sd1 or has_sd2)) if not ok]
    raise ModelError(
        f"{name} is not a complete SD1.x/SD2.x/SDXL checkpoint in A1111/ldm layout"
        + (f" (missing {', '.join(missing)}*)" if missing else " (it has two text encoders)")
        + f"; its keys start with {found}. Use a full single-file .safetensors/.ckpt as the web UI loads it "
        "(not a diffusers folder, LoRA, VAE-only or UNet-only file)."
    )


def detect_prediction(path: Path, state: dict[str, torch.Tensor]) -> str | None:
    """"v_prediction" or "epsilon" if the file says so (sibling .yaml, `v_pred` key), else None."""
    if "v_pred" in state:
        return "v_prediction"
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        text = yaml_path.read_text("utf-8", errors="replace")
        match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.MULTILINE)
        if match:
            return "v_prediction" if match.group(1) == "v" else "epsilon"
        return "epsilon"  # an ldm yaml without the key means the ldm default, eps
    return None


def looks_v_prediction(unet: UNet2DConditionModel) -> bool:
    """A1111's test for SD2 (`is_using_v_parameterization_for_sd2`): at t=999 a v-model's output
    of a constant input is far below the input, an eps-model's is not."""
    p = next(unet.parameters())
    with torch.no_grad():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
        cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
        t = torch.tensor([999], device=p.device)
        out = (unet(x, t, encoder_hidden_states=cond).sample - x).float().mean().item()
    return out < -1


def _strict_assign(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str,
                   dtype: torch.dtype) -> torch.nn.Module:
    """Build on the meta device (no random init of ~1 B weights) and assign the converted tensors."""
    with torch.device("meta"):
        model = build()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelError(
            f"The checkpoint's {what} does not fit the {what} config ({first}). Is it a fine-tune with a "
            "different architecture? Pass config=... describing it."
        ) from exc
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing:
        raise ModelError(
            f"The checkpoint's {what} does not fit the {what} config: {len(missing)} weights are missing "
            f"(e.g. {missing[:3]}). Is it a fine-tune with a different architecture?"
        )
    if unexpected:
        logger.warning("%d unused %s weights in the checkpoint (e.g. %s)",
                       len(unexpected), what, unexpected[:3])
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers are not in the file
            if not name.endswith("position_ids"):
                raise ModelError(f"{what} buffer {name} was not loaded")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            ids = torch.arange(buf.shape[-1]).expand(buf.shape)
            owner.register_buffer("position_ids", ids, persistent=False)
    return model


def _text_encoder_state(
    state: dict[str, torch.Tensor], family: str, model: CLIPTextModel
) -> dict[str, torch.Tensor]:
    if family == "sd1":
        converted = convert_ldm_clip_checkpoint(state)
    else:
        # diffusers' SD2 text encoder stops one layer early (OpenCLIP's penultimate layer, as SD2
        # uses it): drop the resblocks it does not have (its ignore list hard-codes ViT-H's 24).
        layers = model.config.num_hidden_layers
        pattern = re.compile(re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.")

        def keep(k: str) -> bool:
            m = pattern.match(k)
            return m is None or int(m.group(1)) < layers

        kept = {k: v for k, v in state.items() if keep(k)}
        converted = convert_open_clip_checkpoint(model, kept, prefix=OPEN_CLIP)
    converted = _fit_text_model(converted, model)
    return {k: v for k, v in converted.items() if not k.startswith("text_projection")}


def _fit_text_model(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers converts to `text_model.*` keys; transformers >= 5.6 flattened `CLIPTextModel` (only)."""
    if hasattr(model, "text_model"):
        return converted
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def _unet_and_vae(
    state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype, vae_dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    try:
        unet_state = convert_ldm_unet_checkpoint(state, config.unet)
        vae_state = convert_ldm_vae_checkpoint(state, config.vae)
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelError(f"The checkpoint's UNet/VAE could not be converted ({exc!r}).") from exc
    unet = _strict_assign(lambda: UNet2DConditionModel.from_config(config.unet), unet_state, "UNet", dtype)
    vae = _strict_assign(lambda: AutoencoderKL.from_config(config.vae), vae_state, "VAE", vae_dtype)
    return unet, vae  # type: ignore[return-value]


def build_from_state(
    state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Convert an ldm-layout state dict with diffusers' converters and load it strictly."""
    unet, vae = _unet_and_vae(state, config, dtype, dtype)
    text_config = CLIPTextConfig(**config.text_encoder)
    with torch.device("meta"):
        probe = CLIPTextModel(text_config)
    text_state = _text_encoder_state(state, config.family, probe)
    text_encoder = _strict_assign(lambda: CLIPTextModel(text_config), text_state, "text encoder", dtype)
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder  # type: ignore[return-value]


def build_sdxl_from_state(
    state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's UNet, VAE (float32 whatever `dtype`: it overflows in fp16), clip_l and clip_g, loaded strictly."""
    if config.text_encoder_2 is None:
        raise ModelError("An SDXL model config needs text_encoder_2 (see standalone/configs/sdxl.json).")
    unet, vae = _unet_and_vae(state, config, dtype, torch.float32)
    l_config, g_config = CLIPTextConfig(**config.text_encoder), CLIPTextConfig(**config.text_encoder_2)
    with torch.device("meta"):
        probe_l, probe_g = CLIPTextModel(l_config), CLIPTextModelWithProjection(g_config)
    clip_l = _strict_assign(lambda: CLIPTextModel(l_config), _fit_text_model(xl.clip_l_state(state), probe_l),
                            "clip_l text encoder", dtype)
    clip_g = _strict_assign(lambda: CLIPTextModelWithProjection(g_config),
                            _fit_text_model(xl.clip_g_state(state, probe_g), probe_g), "clip_g text encoder", dtype)
    for module in (unet, vae, clip_l, clip_g):
        module.eval()
    return unet, vae, clip_l, clip_g  # type: ignore[return-value]


def load_checkpoint(
    path: str | Path,
    *,
    family: str | None = None,
    prediction: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | Path | dict[str, Any] | None = None,
) -> StandaloneBackend | StandaloneSDXLBackend:
    """Load an SD1.x/SD2.x/SDXL single-file checkpoint (`.safetensors`, or `.ckpt` without running pickle code).

    `family` ("sd1"/"sd2"/"sdxl") is detected from the keys; passing it only double-checks. `prediction`
    ("epsilon"/"v_prediction") overrides detection: a sibling `<name>.yaml` with `parameterization: "v"`,
    a `v_pred` key, else for SD2 A1111's test forward pass, else epsilon. `config` replaces the
    bundled architecture (a JSON file or dict shaped like `configs/sd1.json`, SDXL's with a
    `text_encoder_2` as in `configs/sdxl.json`) for non-standard models; without it, an ldm/sgm `<name>.yaml`
    beside the file gives the UNet, VAE and schedule (as in A1111; see loading_yaml). SDXL refiners and inpainting
    models are refused: embeddings are trained on a base model."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Checkpoint {path} does not exist (give the path to a .safetensors or .ckpt file).")
    if family is not None and family not in FAMILIES:
        raise ModelError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if prediction is not None and prediction not in PREDICTIONS:
        raise ModelError(f"prediction must be one of {', '.join(PREDICTIONS)}, not {prediction!r}")
    state = read_state_dict(path)
    state = {next((new + k[len(old):] for old, new in _SD1_TEXT_RENAMES.items() if k.startswith(old)), k): v
             for k, v in state.items()}
    detected = detect_family(state, path.name)
    if family is not None and family != detected:
        raise ModelError(f"{path.name} has the key layout of {detected.upper()}, not {family.upper()}.")
    original = read_original_config(path.with_suffix(".yaml")) if config is None else None
    if original is not None:  # A1111's convention: the yaml beside the file describes its architecture
        cfg = config_from_yaml(original, model_config(detected), state, path.name)
    else:
        cfg = model_config(config if config is not None else detected)
    if cfg.family != detected:
        raise ModelError(f"The model config is for {cfg.family} but {path.name} is {detected}.")
    conv_in = state.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != cfg.unet.get("in_channels", 4):
        kind = "an SDXL inpainting model?" if detected == "sdxl" else "an inpainting or instruct-pix2pix model?"
        raise ModelError(
            f"{path.name} has a UNet with {conv_in.shape[1]} input channels ({kind}); train embeddings on "
            "the matching base model instead (they then work with its inpainting variant too)."
        )
    pred = prediction or detect_prediction(path, state)
    build = build_sdxl_from_state if detected == "sdxl" else build_from_state
    modules = build(state, cfg, dtype)
    del state
    for module in modules:
        module.to(device)
    trim_memory()  # the file's tensors and their converted copies are freed by now
    unet = modules[0]
    if pred is None and detected == "sd2":
        logger.info("Testing whether %s is a v-prediction model (pass prediction=... to skip)", path.name)
        pred = "v_prediction" if looks_v_prediction(unet) else "epsilon"
        logger.info("%s looks like an SD2 %s model; pass prediction=... if that is wrong", path.name, pred)
    pred = pred or "epsilon"
    resolution = int(cfg.resolution)
    if detected == "sd2" and config is None:
        resolution = 768 if pred == "v_prediction" else 512  # SD2 768-v vs 512-base
    widths = [int(c["hidden_size"]) for c in (cfg.text_encoder, cfg.text_encoder_2) if c is not None]
    info = ModelInfo(
        family=detected,
        encoders=dict(zip(SDXL_KEYS, widths)) if detected == "sdxl" else {SINGLE: widths[0]},
        resolution=resolution,
        name=path.stem,
        short_hash=file_short_hash(path),
        prediction=pred,
        latent_channels=int(cfg.unet.get("in_channels", 4)),
        vae_scale=2 ** (len(cfg.vae["block_out_channels"]) - 1),
    )
    scheduler = {**cfg.scheduler, "prediction_type": pred}
    logger.info("Loaded %s (%s, %s, %d px, hash %s)", path.name, detected, pred, resolution, info.short_hash)
    vae_source = vae_reader(path, cfg)
    if detected == "sdxl":
        return StandaloneSDXLBackend(*modules, scheduler, info, vae_source)
    return StandaloneBackend(*modules, scheduler, info, vae_source)
