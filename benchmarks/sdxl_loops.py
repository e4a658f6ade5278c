"""The SDXL peers' training loops for train_speed.py, written on the model's diffusers/transformers modules.

  diffusers-sdxl-style  diffusers' examples/textual_inversion/textual_inversion_sdxl.py (trains both encoders since
                        diffusers#9010): `resize_token_embeddings` on both text encoders, their whole token tables
                        under one AdamW (weight decay 1e-2), the encoders trainable but for encoder/final
                        norm/positions (clip_g's projection gets a gradient it never uses), the VAE encoding every
                        step, both encoders' penultimate hidden states concatenated, the pooled `text_embeds` of
                        encoder 2, `add_time_ids` from the image's size and crop, SDPA attention (diffusers'
                        default), `F.mse_loss`, every row but the placeholders' restored from a copy after every
                        step (the keep-mask rebuilt every step, as the script does), `loss.item()` for its log
  kohya-style           kohya-ss/sd-scripts sdxl_train_textual_inversion.py on train_textual_inversion.py, its
                        defaults: latents NOT cached (`--cache_latents` is off by default: the VAE encodes every
                        step), plain attention (no `--sdpa`/`--xformers`), no gradient checkpointing, both whole
                        token tables trainable (AdamW, torch's weight decay 1e-2) with the rows before the new
                        tokens restored every step, gradients clipped to norm 1 (`--max_grad_norm`) on the last
                        encoder's table, the text encoders in train mode with only encoder/final norm/positions
                        frozen (encoder 2's projection keeps its gradient), clip_l's hidden state 11 (= the
                        penultimate of its 12 layers; [-2] here so the 2-layer tiny models run too) and clip_g's
                        penultimate one, the pooled vector by its EOS-position workaround, per-sample MSE then
                        mean, `.item()` of the loss every step. kohya's own SDXL UNet class is diffusers' here
                        (same architecture; its size embedding is diffusers' `add_time_proj`).

Precision (the scripts' rules): diffusers casts the UNet, VAE and text encoder 2 to the weight dtype (its mixed
precision choice; text encoder 1 stays float32); kohya casts the UNet, keeps both text encoders float32 (no
`--full_bf16`) and the VAE as loaded (the SDXL backend's float32 VAE = its `--no_half_vae`); both run their
prepared text encoders (kohya also its UNet call) under autocast to the weight dtype. The models come from the
backend in the weight dtype and are cast here as the scripts have them. On a CPU with the scripts' defaults (no
mixed precision) everything is float32 and autocast is off.

`count_flops` builds the same modules on the meta device and counts one training step of each loop (ours
included, through the SDXL backend's own splice tables and `training_loss`) with torch's FlopCounterMode.
"""

from __future__ import annotations

import contextlib
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


def _prepared(weight_dtype: torch.dtype, device: torch.device) -> Any:
    """What accelerate's mixed precision wraps a prepared model's forward in: autocast to the weight dtype (off
    in full precision)."""
    if weight_dtype == torch.float32:
        return contextlib.nullcontext()  # (torch.autocast refuses the meta device even when disabled)
    return torch.autocast(device.type, dtype=weight_dtype)


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
    torch.nn.Module.to(m.te1, dtype=torch.float32)  # loaded float32 and never cast
    torch.nn.Module.to(m.vae, dtype=weight_dtype)  # the script casts VAE and text encoder 2 to the weight dtype
    torch.nn.Module.to(m.te2, dtype=weight_dtype)
    for module in (m.vae, m.unet):
        module.requires_grad_(False)
    for te in (m.te1, m.te2):  # loaded trainable; the script freezes only these parts
        te.requires_grad_(True)
        inner = _text_model(te)
        inner.encoder.requires_grad_(False)
        inner.final_layer_norm.requires_grad_(False)
        inner.embeddings.position_embedding.requires_grad_(False)
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
        with _prepared(weight_dtype, device):  # accelerate runs the prepared text encoders under autocast
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
    vae_dtype = next(m.vae.parameters()).dtype  # the backend's float32 SDXL VAE, as kohya's --no_half_vae
    n = m.init["clip_l"].shape[0]
    tables, vocabs, origs, keeps = [], [], [], []
    for te, key in ((m.te1, "clip_l"), (m.te2, "clip_g")):
        torch.nn.Module.to(te, dtype=torch.float32)  # loaded float32 (no --full_bf16/--full_fp16)
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
        with _prepared(weight_dtype, device):  # accelerate's prepared text encoders
            out1 = m.te1(ids1, output_hidden_states=True, return_dict=True)
            h1 = out1["hidden_states"][-2]  # kohya: hidden_states[11], the penultimate of CLIP-L's 12 layers
            out2 = m.te2(ids2, output_hidden_states=True, return_dict=True)
        h2 = out2["hidden_states"][-2]
        pool2 = _pool_workaround(m.te2, out2["last_hidden_state"], ids2)
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        timesteps = torch.randint(0, 1000, (1,), generator=gen).to(device).long()
        noisy = m.scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
        context = torch.cat([h1, h2], dim=2).to(weight_dtype)
        with _prepared(weight_dtype, device):  # accelerator.autocast() around its UNet call
            pred = m.unet(noisy, timesteps, context, added_cond_kwargs={
                "text_embeds": pool2.to(weight_dtype), "time_ids": _time_ids(size)[None].to(device, weight_dtype)
            }).sample
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
              latents: torch.Tensor, gen_device: torch.device, backward: bool = True) -> torch.Tensor:
    """One step of our trainer's compute on any device, the meta one included: the backend's splice tables,
    `_unet_kwargs` and `training_loss` (`encode_text` itself asks a tensor for a bool, which meta cannot)."""
    from textual_inversion_ext.backends.standalone import splice
    from textual_inversion_ext.backends.standalone.memory import lean_geglu
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
    with lean_geglu(backend.unet):  # as our training session runs the UNet
        loss = backend.training_loss(latents, cond, noise, timesteps).mean()
        if backward:
            loss.backward()
    return loss


CHECKPOINTED = "ours + UNet checkpointing"


def count_flops(config: str, sizes: list[int], prompt: str, trigger: str,
                checkpointed: bool = False) -> dict[int, dict[str, float]]:
    """FLOPs of one training step of every SDXL loop at each image size, counted on the meta device;
    `checkpointed`: ours with UNet gradient checkpointing too (its forward recomputed in the backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    result: dict[int, dict[str, float]] = {}
    for size in sizes:
        result[size] = {}
        for loop in ("ours", *PEER_LOOPS, *((CHECKPOINTED,) if checkpointed else ())):
            backend = meta_backend(config)
            if loop == CHECKPOINTED:
                backend.unet.enable_gradient_checkpointing()
                backend.unet.train()
            vectors = {k: torch.zeros(2, w, device="meta", requires_grad=True)
                       for k, w in backend.info.encoders.items()}
            pixels = torch.zeros(3, size, size, device="meta")
            with FlopCounterMode(display=False) as counter:
                if loop in ("ours", CHECKPOINTED):  # latents cached before the run: no VAE in the step
                    latents = torch.zeros(1, 4, size // 8, size // 8, device="meta")
                    ours_step(backend, vectors, prompt, trigger, latents, torch.device("meta"))
                else:
                    step = Step(backend.unet, backend.vae, backend.text_encoder, backend.text_encoder_2,
                                backend.noise_scheduler, {k: v.detach() for k, v in vectors.items()})
                    RUNNERS[loop](step, lambda i: prompt, lambda i, x=pixels: x, 1, trigger, 1e-3,
                                  torch.Generator().manual_seed(0), update=False)
            result[size][loop] = float(counter.get_total_flops())
    return result


def saved_activation_bytes(config: str, size: int, dtype: torch.dtype = torch.float32,
                           checkpointing: bool = False) -> dict[str, float]:
    """Our step's memory on the meta device: bytes of the weights and of the tensors autograd saves for the
    backward pass (what a training step holds at the end of its forward), UNet gradient checkpointing on or off.
    An estimate of the peak: the backward's own transients (activation gradients) come on top."""
    from torch.autograd.graph import saved_tensors_hooks

    backend = meta_backend(config, dtype)
    if checkpointing:
        backend.unet.enable_gradient_checkpointing()
        backend.unet.train()  # diffusers checkpoints in training mode
    params = {id(p) for m in backend.modules for p in m.parameters()}
    kept: dict[int, torch.Tensor] = {}  # held so that no id is reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:  # a weight (or a view of one) is counted with the weights
            kept.setdefault(id(base), base)
        return t

    sdpa = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        # On meta, SDPA takes its math path, which saves the attention matrix; the fused kernels on the CPU (and
        # flash/memory-efficient ones on a GPU) save only q, k, v, the output and the log-sum-exp.
        if attn_mask is None and not kw:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                               scale=scale)[0]
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    vectors = {k: torch.zeros(2, w, device="meta", requires_grad=True) for k, w in backend.info.encoders.items()}
    latents = torch.zeros(1, 4, size // 8, size // 8, device="meta")
    F.scaled_dot_product_attention = fused
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            ours_step(backend, vectors, "a photo of bench-token, shapes, picture 0", "bench-token", latents,
                      torch.device("meta"), backward=False)
    finally:
        F.scaled_dot_product_attention = sdpa
    weights = {m.__class__.__name__ if m is not backend.text_encoder_2 else "text_encoder_2":
               float(sum(p.numel() * p.element_size() for p in m.parameters())) for m in backend.modules}
    return {"saved": float(sum(t.numel() * t.element_size() for t in kept.values())), **weights}


def meta_backend(config: str, dtype: torch.dtype = torch.float32) -> Any:
    """The SDXL backend on modules built on the meta device (shapes only, nothing allocated)."""
    from textual_inversion_ext.backends.standalone import embedded, models

    cfg = embedded.embedded_config(config) if config in embedded.VARIANTS else models.model_config(config)
    with torch.device("meta"):
        unet, vae, te1 = models.build_random(cfg, 0)
        te2 = models.build_random_text_encoder_2(cfg, 0)
    for module in (unet, vae, te1, te2):
        models.cast(module, dtype)  # the backend keeps SDXL's VAE float32 whatever the weights
    from textual_inversion_ext.backends.standalone.sdxl import StandaloneSDXLBackend

    info = embedded.model_info(cfg, f"meta-{config}", None)
    return StandaloneSDXLBackend(unet, vae, te1, te2, cfg.scheduler, info)
