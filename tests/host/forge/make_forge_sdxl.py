#!/usr/bin/env python3
"""Make a small SDXL-family checkpoint (random weights) that Forge recognises as SDXL.

Forge picks a model's family from its weights (huggingface_guess): SDXL needs model_channels 320,
context 2048, adm 2816, a linear transformer and per-block transformer depths [0, 0, 2, 2, 10, 10]; it does
not check channel_mult, and it always builds the full-size VAE from its own config. So this is SDXL's
UNet with every level kept at 320 channels (channel_mult [1, 1, 1]; middle block depth 10, sgm's default),
the full-size VAE, and the real-shape clip_l + bigG text towers.

The checkpoint is made by the A1111 lab's make_tiny_sdxl.py (imported by path, not copied): this adds a
"forge" entry to its SIZES and calls its main(), which writes <out>.safetensors (fp16 weights) and
<out>.yaml (so the A1111 host loads it too). Run it with the A1111 lab's python (it needs sgm + open_clip):

  $HOME/a1111-lab/venv/bin/python make_forge_sdxl.py --webui $HOME/a1111-lab/webui \
      [--out $HOME/a1111-lab/webui/models/Stable-diffusion/forge-sdxl-small] [--host-lab DIR]

--host-lab (default $HOST_LAB, else <repo>/../shared/host-lab) is the folder holding make_tiny_sdxl.py.

Memory: make_tiny_sdxl.py builds open_clip's whole ViT-bigG-14 (2.5 B params, ~10 GB in fp32) and then drops
its image tower; here that image tower is built at a token size instead (it is dropped anyway, the text
tower is unchanged), so the build peaks at 8.4 GB RSS instead of 11.3 GB (~25 s on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
STEM = "forge-sdxl-small"

FORGE_SIZE = dict(
    title="small SDXL-family model (Forge-recognised)",
    stem=STEM,
    # transformer_depth is per level; with 2 res blocks per level huggingface_guess sees [0, 0, 2, 2, 10, 10].
    # Level 0 (ds 1) has no attention, as in SDXL (attention_resolutions [4, 2]).
    unet=dict(model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 1, 1],
              num_head_channels=64, transformer_depth=[0, 2, 10]),
    # Forge builds SDXL's VAE from its fixed diffusers config: the checkpoint's must match it.
    vae=dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2),
)


def load_maker(host_lab: str):
    path = os.path.join(host_lab, "make_tiny_sdxl.py")
    if not os.path.isfile(path):
        raise SystemExit(f"no {path}: pass --host-lab (the A1111 lab's scripts folder)")
    # make_tiny_sdxl imports make_tiny_sd1 from its own folder (it puts that on sys.path in main()).
    spec = importlib.util.spec_from_file_location("make_tiny_sdxl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def small_vision_tower():
    """Build open_clip's image towers at 1 layer x 64 wide while inside (make_tiny_sdxl.py discards bigG's)."""
    import open_clip.model as oc_model

    orig = oc_model._build_vision_tower

    def build(embed_dim, vision_cfg, *args, **kwargs):
        return orig(embed_dim, {"layers": 1, "width": 64, "head_width": 64, "patch_size": 14, "image_size": 224},
                    *args, **kwargs)

    oc_model._build_vision_tower = build
    try:
        yield
    finally:
        oc_model._build_vision_tower = orig


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--webui", required=True, help="the A1111 lab's webui folder (sgm in repositories/)")
    ap.add_argument("--out", help=f"path without extension (default: WEBUI/models/Stable-diffusion/{STEM})")
    ap.add_argument("--host-lab", default=os.environ.get("HOST_LAB") or os.path.join(REPO, "..", "shared", "host-lab"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    maker = load_maker(os.path.abspath(args.host_lab))
    maker.SIZES["forge"] = FORGE_SIZE
    out = args.out or os.path.join(args.webui, "models", "Stable-diffusion", STEM)
    logger.info("making %s with %s", out, maker.__file__)
    sys.argv = [maker.__file__, "--webui", args.webui, "--size", "forge", "--out", out, "--seed", str(args.seed)]
    with small_vision_tower():
        maker.main()


if __name__ == "__main__":
    main()
