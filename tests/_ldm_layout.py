"""Test helper: write diffusers/transformers modules as an A1111/ldm-layout single-file state dict.

diffusers only converts ldm -> diffusers; tests need the inverse to produce checkpoints shaped like
the files users have. Written for any number of blocks / layers per block (the tiny test models),
following the ldm layout that `diffusers.loaders.single_file_utils` reads.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_RESNET = [  # diffusers -> ldm, inside UNet resnets
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    per = int(config["layers_per_block"]) + 1  # ldm: layers_per_block (+1 for the down/upsampler slot)
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        top = ".".join(parts[:-1])
        if top in _UNET_TOP:
            new = f"{_UNET_TOP[top]}.{parts[-1]}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * per + j
            new = f"input_blocks.{idx}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * per + j
            new = f"output_blocks.{idx}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            new = f"output_blocks.{i * per + per - 1}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no ldm name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value.reshape(*value.shape, 1, 1)  # ldm uses 1x1 convs here
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value
    return out


def _text_state(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    state = text_encoder.state_dict()
    if hasattr(text_encoder, "text_model"):  # older transformers nest the model
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """SD1 layout: the HF CLIP text model under `cond_stage_model.transformer.text_model.`."""
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in _text_state(text_encoder).items()}


_OPEN_CLIP = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


def open_clip_to_ldm(text_encoder: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """SD2 layout (OpenCLIP under `cond_stage_model.model.`), plus the extra last resblock and
    text projection a real SD2 file has; diffusers' SD2 text encoder ignores both."""
    state = _text_state(text_encoder)
    p = "cond_stage_model.model."
    out: dict[str, torch.Tensor] = {
        p + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        p + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        p + "ln_final.weight": state.pop("final_layer_norm.weight"),
        p + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
        if m is None:
            raise KeyError(f"no OpenCLIP name for text-encoder key {key}")
        block, rest = f"{p}transformer.resblocks.{m[1]}.", m[2]
        if q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            qkv.setdefault(f"{block}attn.in_proj_{q[2]}", {})[q[1]] = value
            continue
        for old, new in _OPEN_CLIP:
            rest = rest.replace(old, new)
        out[block + rest] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    # The last OpenCLIP block, which SD2 skips (penultimate layer): random, must be ignored.
    gen = torch.Generator().manual_seed(seed)
    last = len({k.split(".")[4] for k in out if ".resblocks." in k})
    template = f"{p}transformer.resblocks.0."
    for key in [k for k in out if k.startswith(template)]:
        out[key.replace(".resblocks.0.", f".resblocks.{last}.")] = torch.randn(out[key].shape, generator=gen)
    dim = out[p + "ln_final.weight"].shape[0]
    out[p + "text_projection"] = torch.randn(dim, dim, generator=gen)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out
