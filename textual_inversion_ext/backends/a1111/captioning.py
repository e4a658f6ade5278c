"""The host's interrogators as captioners (BLIP, deepbooru) and its img2img upscaler for preprocessing.

Weights are looked for on disk first: the host would otherwise try to download them, which offline
fails slowly (or hangs on a dead network). Missing weights become `CaptionerUnavailable` with what
to put where; preprocessing then goes on without that captioner.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ...core.data.captioners import CaptionerUnavailable, register_captioner
from ...core.data.preprocess import Upscaler

logger = logging.getLogger(__name__)

BLIP_FILE = "model_base_caption_capfilt_large.pth"
BLIP_URL = f"https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/{BLIP_FILE}"
DEEPBOORU_FILE = "model-resnet_custom_v3.pt"
DEEPBOORU_URL = f"https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/{DEEPBOORU_FILE}"


def find_weights(folder: str | os.PathLike[str], suffix: str) -> list[Path]:
    """Weight files the host's `modelloader.load_models` would pick up (any file with `suffix`, nested)."""
    out = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        out += [Path(root, f) for f in sorted(files) if f.lower().endswith(suffix) and Path(root, f).exists()]
    return out


def missing_message(what: str, file: str, folder: str, url: str) -> str:
    return (f"{what} weights are not available offline: put {file} in {folder} (from {url}) and run again. "
            f"Images are processed without {what} captions.")


class HostBlip:
    """BLIP through `shared.interrogator`: only the BLIP half is loaded (its CLIP half would download)."""

    name = "blip"

    def __init__(self) -> None:
        from modules import devices, paths, shared, torch_utils

        folder = os.path.join(paths.models_path, "BLIP")
        if not find_weights(folder, ".pth"):
            raise CaptionerUnavailable(missing_message("BLIP", BLIP_FILE, folder, BLIP_URL))
        ic = shared.interrogator
        try:
            if ic.blip_model is None:
                ic.blip_model = ic.load_blip_model()
                if not shared.cmd_opts.no_half and not ic.running_on_cpu:
                    ic.blip_model = ic.blip_model.half()
            ic.blip_model = ic.blip_model.to(devices.device_interrogate)
        except Exception as exc:  # e.g. its BERT tokenizer is not cached offline
            logger.debug("BLIP failed to load", exc_info=True)
            raise CaptionerUnavailable(f"BLIP could not be loaded ({type(exc).__name__}: {exc}); images are "
                                       "processed without BLIP captions.") from exc
        ic.dtype = torch_utils.get_param(ic.blip_model).dtype  # generate_caption reads it (load() sets it)
        self._ic = ic

    def caption(self, img: Any) -> str:
        return str(self._ic.generate_caption(img))

    def close(self) -> None:
        from modules import devices

        self._ic.send_blip_to_ram()  # honours "keep models in memory"
        devices.torch_gc()


class HostDeepbooru:
    name = "deepbooru"

    def __init__(self) -> None:
        from modules import deepbooru, paths

        folder = os.path.join(paths.models_path, "torch_deepdanbooru")
        if not find_weights(folder, ".pt"):
            raise CaptionerUnavailable(missing_message("deepbooru", DEEPBOORU_FILE, folder, DEEPBOORU_URL))
        try:
            deepbooru.model.start()
        except Exception as exc:
            logger.debug("deepbooru failed to load", exc_info=True)
            raise CaptionerUnavailable(f"deepbooru could not be loaded ({type(exc).__name__}: {exc}); images "
                                       "are processed without deepbooru tags.") from exc
        self._model = deepbooru.model

    def caption(self, img: Any) -> str:
        return str(self._model.tag_multi(img))

    def close(self) -> None:
        self._model.stop()


def register_host_captioners() -> None:
    register_captioner("blip", HostBlip)
    register_captioner("deepbooru", HostDeepbooru)


def host_upscaler() -> Upscaler | None:
    """Settings → Upscaling → 'Upscaler for img2img' when it can run offline; None (= Lanczos) otherwise."""
    from modules import images, shared

    name = getattr(shared.opts, "upscaler_for_img2img", None)
    if not name or name == "None":
        return None
    found = next((u for u in shared.sd_upscalers if u.name == name), None)
    if found is None or str(found.data_path or "").startswith(("http://", "https://")):
        # Not on disk: the host would download it mid-run.
        logger.warning("Upscaler %r is not available offline; preprocessing upscales with Lanczos", name)
        return None

    def upscale(img: Any, width: int, height: int) -> Any:
        return images.resize_image(0, img, width, height, upscaler_name=name)

    return upscale
