"""The SDXL peers' training loops for train_speed.py, written on the model's diffusers/transformers modules.

  diffusers-sdxl-style  diffusers' examples/textual_inversion/textual_inversion_sdxl.py (the version that trains
                        both encoders): `resize_token_embeddings` on both text encoders, their whole token tables
                        trainable under one AdamW (weight decay 1e-2), the VAE encoding every step, both
                        encoders' penultimate hidden states concatenated, the pooled `text_embeds` of encoder 2,
                        `add_time_ids` from the image's size and crop, SDPA attention (diffusers' default),
                        `F.mse_loss`, every row but the placeholder's restored from a copy after every step
                        (the keep-mask rebuilt every step, as the script does), `loss.item()` for its log
  kohya-style           kohya-ss/sd-scripts sdxl_train_textual_inversion.py on train_textual_inversion.py, its
                        defaults: latents NOT cached (`--cache_latents` is off by default: the VAE encodes every
                        step), plain attention (no `--sdpa`/`--xformers`), no gradient checkpointing, both whole
                        token tables trainable (AdamW, torch's weight decay 1e-2) with the rows before the new
                        tokens restored every step, gradients clipped to norm 1 (`--max_grad_norm`), the text
                        encoders in train mode with only encoder/final norm/positions frozen (encoder 2's
                        projection keeps its gradient), clip_l's hidden state 11 and clip_g's penultimate one,
                        the pooled vector by its EOS-position workaround, per-sample MSE then mean, `.item()`
                        of the loss every step. kohya's own SDXL UNet class is diffusers' here (same
                        architecture; its size embedding is diffusers' `add_time_proj`).

Precision (the scripts' rules): the UNet, VAE (diffusers: also text encoder 2) in the weight dtype; the trained
tables float32 otherwise. On a CPU everything is float32, as both scripts run without mixed precision.

`count_flops` builds the same modules on the meta device and counts one training step of each loop (ours
included, through the SDXL backend's own splice tables and `training_loss`) with torch's FlopCounterMode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PEER_LOOPS = ("diffusers-sdxl-style", "kohya-style")


@dataclass
class Step:
    """What a peer loop needs: the backend's modules, the new token's init rows and the timing hook."""

    unet: Any
    vae: Any
    te1: Any
    te2: Any
    scheduler: Any  # diffusers DDPMScheduler
    init: dict[str, torch.Tensor]  # "clip_l" (n, 768) / "clip_g" (n, 1280) rows for the new token(s)


def _text_model(te: torch.nn.Module) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); CLIPTextModelWithProjection still nests it.
    return getattr(te, "text_model", te)


def _add_tokens(te: torch.nn.Module, rows: torch.Tensor) -> tuple[int, torch.nn.Embedding]:
    """`resize_token_embeddings` by the new tokens, their rows set to `rows`, as both scripts do; the old size.

    No mean-resizing: the scripts overwrite the new rows with the init token's at once."""
    vocab = te.get_input_embeddings().num_embeddings
    table = te.resize_token_embeddings(vocab + rows.shape[0], mean_resizing=False)
    with torch.no_grad():
        table.weight[vocab:] = rows.to(table.weight)
    return vocab, table


def _ids(prompt: str, trigger: str, n: int, vocab: int, pad_id: int, device: torch.device) -> torch.Tensor:
    """The prompt's 77 ids with the trigger as the n added tokens (vocab .. vocab+n-1), as a tokenizer with
    the added tokens gives them."""
    from textual_inversion_ext.backends.standalone import splice

    row = splice.prompt_ids(prompt, trigger, n, pad_id)
    return torch.tensor([[vocab + s if s >= 0 else tok for tok, s in zip(row.ids, row.slots)]], device=device)


def _time_ids(size: int) -> torch.Tensor:
    # original (h, w) + crop top-left (y, x) + target (h, w): the benchmark's images are cut to `size` already
    return torch.tensor([size, size, 0, 0, size, size])


# ------------------------------------------------------------------ diffusers' example


def diffusers_sdxl_style(m: Step, prompts: Callable[[int], str], pixels: Callable[[int], torch.Tensor],
                         steps: int, trigger: str, lr: float, gen: torch.Generator,
                         step_done: Callable[[int], None] = lambda step: None, update: bool = True) -> None:
    from textual_inversion_ext.backends.standalone import splice

    device, weight_dtype = m.unet.device, m.unet.dtype
    n = m.init["clip_l"].shape[0]
    vocab1, table1 = _add_tokens(m.te1, m.init["clip_l"])
    vocab2, table2 = _add_tokens(m.te2, m.init["clip_g"])
    for module in (m.vae, m.unet, m.te1, m.te2):
        module.requires_grad_(False)
    for table in (table1, table2):  # only the token tables, whole
        table.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([table1.weight, table2.weight], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    orig1, orig2 = table1.weight.data.clone(), table2.weight.data.clone()
    m.te1.train()
    m.te2.train()
    scale = float(m.vae.config.scaling_factor)
    size = pixels(0).shape[-1]
    for step in range(steps):
        x = pixels(step).unsqueeze(0).to(device, weight_dtype)
        latents = m.vae.encode(x).latent_dist.sample().detach() * scale
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        timesteps = torch.randint(0, m.scheduler.config.num_train_timesteps, (1,), generator=gen).to(device)
        noisy = m.scheduler.add_noise(latents, noise, timesteps)
        prompt = prompts(step)
        ids1 = _ids(prompt, trigger, n, vocab1, splice.EOS, device)
        ids2 = _ids(prompt, trigger, n, vocab2, 0, device)  # SDXL's second tokenizer pads with "!" (0)
        h1 = m.te1(ids1, output_hidden_states=True).hidden_states[-2].to(dtype=weight_dtype)
        out2 = m.te2(ids2, output_hidden_states=True)
        h2 = out2.hidden_states[-2].to(dtype=weight_dtype)
        add_time_ids = torch.cat([_time_ids(size)]).to(device, dtype=weight_dtype)
        pred = m.unet(noisy, timesteps, torch.cat([h1, h2], dim=-1),
                      added_cond_kwargs={"text_embeds": out2[0], "time_ids": add_time_ids}).sample
        if m.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = m.scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        if not update:  # FLOP counting on the meta device: the rest has no matmuls and needs real values
            continue
        optimizer.step()
        optimizer.zero_grad()
        keep1 = torch.ones((vocab1 + n,), dtype=torch.bool)
        keep1[vocab1:vocab1 + n] = False
        keep2 = torch.ones((vocab2 + n,), dtype=torch.bool)
        keep2[vocab2:vocab2 + n] = False
        with torch.no_grad():
            table1.weight[keep1] = orig1[keep1]
            table2.weight[keep2] = orig2[keep2]
        _ = loss.detach().item()  # its progress-bar log
        step_done(step + 1)


# ------------------------------------------------------------------ kohya-ss/sd-scripts


def _pool_workaround(te2: torch.nn.Module, last_hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """kohya's pooled output: clip_g's last hidden state at the first EOS, through its projection."""
    from textual_inversion_ext.backends.standalone import splice

    eos_index = torch.argmax((ids == splice.EOS).int(), dim=1).to(last_hidden.device)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), eos_index]
    return te2.text_projection(pooled.to(te2.text_projection.weight.dtype)).to(last_hidden.dtype)


def kohya_style(m: Step, prompts: Callable[[int], str], pixels: Callable[[int], torch.Tensor], steps: int,
                trigger: str, lr: float, gen: torch.Generator,
                step_done: Callable[[int], None] = lambda step: None, update: bool = True) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    from textual_inversion_ext.backends.standalone import splice

    device, weight_dtype = m.unet.device, m.unet.dtype
    vae_dtype = next(m.vae.parameters()).dtype  # --no_half_vae: float32
    n = m.init["clip_l"].shape[0]
    tables, vocabs, origs, keeps = [], [], [], []
    for te, key in ((m.te1, "clip_l"), (m.te2, "clip_g")):
        vocab, table = _add_tokens(te, m.init[key])
        tables.append(table)
        vocabs.append(vocab)
    m.unet.set_attn_processor(AttnProcessor())  # no --sdpa / --xformers
    m.unet.requires_grad_(False)
    m.unet.eval()
    m.vae.requires_grad_(False)
    m.vae.eval()
    for te, table, vocab in zip((m.te1, m.te2), tables, vocabs):
        keeps.append(torch.arange(vocab + n) < vocab)
        origs.append(table.weight.data.detach().clone())
        te.requires_grad_(True)
        inner = _text_model(te)
        inner.encoder.requires_grad_(False)
        inner.final_layer_norm.requires_grad_(False)
        inner.embeddings.position_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW([t.weight for t in tables], lr=lr)  # torch's defaults: weight decay 1e-2
    scale = float(m.vae.config.scaling_factor)
    size = pixels(0).shape[-1]
    for te in (m.te1, m.te2):
        te.train()
    for step in range(steps):
        with torch.no_grad():  # latents not cached: the VAE encodes every step
            x = pixels(step).unsqueeze(0).to(device, vae_dtype)
            latents = m.vae.encode(x).latent_dist.sample().to(dtype=weight_dtype) * scale
        prompt = prompts(step)
        ids1 = _ids(prompt, trigger, n, vocabs[0], splice.EOS, device)
        ids2 = _ids(prompt, trigger, n, vocabs[1], 0, device)
        out1 = m.te1(ids1, output_hidden_states=True, return_dict=True)
        h1 = out1["hidden_states"][-2]  # kohya: hidden_states[11], the penultimate of CLIP-L's 12 layers
        out2 = m.te2(ids2, output_hidden_states=True, return_dict=True)
        h2 = out2["hidden_states"][-2]
        pool2 = _pool_workaround(m.te2, out2["last_hidden_state"], ids2)
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        timesteps = torch.randint(0, 1000, (1,), generator=gen).to(device).long()
        noisy = m.scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
        context = torch.cat([h1, h2], dim=2).to(weight_dtype)
        pred = m.unet(noisy, timesteps, context, added_cond_kwargs={
            "text_embeds": pool2.to(weight_dtype), "time_ids": _time_ids(size)[None].to(device, weight_dtype)}).sample
        if m.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = m.scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean([1, 2, 3])
        loss = (loss * torch.ones_like(loss)).mean()  # per-sample loss weights (1.0)
        loss.backward()
        if not update:
            continue
        torch.nn.utils.clip_grad_norm_(tables[1].parameters(), 1.0)  # the last text encoder's table, as kohya
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for table, orig, keep in zip(tables, origs, keeps):
                table.weight[keep] = orig.to(table.weight.dtype)[keep]
        _ = loss.detach().item()  # its progress-bar log
        step_done(step + 1)


RUNNERS = {"diffusers-sdxl-style": diffusers_sdxl_style, "kohya-style": kohya_style}


# ------------------------------------------------------------------ FLOPs on the meta device


def ours_step(backend: Any, vectors: dict[str, torch.Tensor], prompt: str, trigger: str,
              latents: torch.Tensor, gen_device: torch.device) -> torch.Tensor:
    """One step of our trainer's compute on any device, the meta one included: the backend's splice tables,
    `_unet_kwargs` and `training_loss` (`encode_text` itself asks a tensor for a bool, which meta cannot)."""
    from textual_inversion_ext.backends.standalone import splice
    from textual_inversion_ext.backends.standalone.sdxl import SDXLConditioning

    outs = []
    for key, enc in backend.encoders.items():
        ids, slots, _ = splice.batch_ids([prompt], trigger, vectors[key].shape[0], enc.pad_id, torch.device("cpu"))
        with enc.table.splicing(slots.to(gen_device), vectors[key]):
            outs.append(enc.module(ids.to(gen_device), output_hidden_states=True))
    context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    cond = SDXLConditioning(context, outs[1].text_embeds, backend._time_ids(1, None))
    noise = torch.randn_like(latents)
    timesteps = torch.zeros(1, dtype=torch.long, device=gen_device)
    loss = backend.training_loss(latents, cond, noise, timesteps).mean()
    loss.backward()
    return loss


def count_flops(config: str, sizes: list[int], prompt: str, trigger: str) -> dict[int, dict[str, float]]:
    """FLOPs of one training step of every SDXL loop at each image size, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    result: dict[int, dict[str, float]] = {}
    for size in sizes:
        result[size] = {}
        for loop in ("ours", *PEER_LOOPS):
            backend = meta_backend(config)
            vectors = {k: torch.zeros(2, w, device="meta", requires_grad=True)
                       for k, w in backend.info.encoders.items()}
            pixels = torch.zeros(3, size, size, device="meta")
            with FlopCounterMode(display=False) as counter:
                if loop == "ours":  # latents cached before the run: no VAE in the step
                    latents = torch.zeros(1, 4, size // 8, size // 8, device="meta")
                    ours_step(backend, vectors, prompt, trigger, latents, torch.device("meta"))
                else:
                    step = Step(backend.unet, backend.vae, backend.text_encoder, backend.text_encoder_2,
                                backend.noise_scheduler, {k: v.detach() for k, v in vectors.items()})
                    RUNNERS[loop](step, lambda i: prompt, lambda i, x=pixels: x, 1, trigger, 1e-3,
                                  torch.Generator().manual_seed(0), update=False)
            result[size][loop] = float(counter.get_total_flops())
    return result


def meta_backend(config: str) -> Any:
    """The SDXL backend on modules built on the meta device (shapes only, nothing allocated)."""
    from textual_inversion_ext.backends.standalone import embedded, models

    cfg = embedded.embedded_config(config) if config in embedded.VARIANTS else models.model_config(config)
    with torch.device("meta"):
        unet, vae, te1 = models.build_random(cfg, 0)
        te2 = models.build_random_text_encoder_2(cfg, 0)
    from textual_inversion_ext.backends.standalone.sdxl import StandaloneSDXLBackend

    info = embedded.model_info(cfg, f"meta-{config}", None)
    return StandaloneSDXLBackend(unet, vae, te1, te2, cfg.scheduler, info)
