"""Parameters of a training run, declared once (see `params.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import param

LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_GRAD_MODES = ("disabled", "value", "norm")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class TrainParams:
    learn_rate: str = param(
        "0.005",
        "Learning rate",
        "A rate, or a schedule 'RATE:UNTIL_STEP, …, RATE' as in A1111, e.g. "
        "'0.05:50, 0.01:100, 0.005:500, 0.001:1000, 0.0005'. Training ends where the schedule ends.",
    )
    scale_lr: bool = param(
        True, "Scale LR by batch", "Multiply the learning rate by batch size × gradient accumulation."
    )
    max_steps: int = param(3000, "Max steps", "Train until this step (counts steps already in the file).",
                           minimum=1, maximum=1_000_000)
    batch_size: int = param(1, "Batch size", "Images per micro-batch.", minimum=1, maximum=64)
    grad_accum: int = param(1, "Gradient accumulation", "Micro-batches per optimizer step.", minimum=1,
                            maximum=64)
    resolution: int = param(0, "Resolution", "Training size in pixels; 0 = the model's native size.",
                            minimum=0, maximum=2048, step=64)
    buckets: bool = param(True, "Aspect buckets",
                          "Keep each image's aspect ratio (sizes in multiples of 64); off = square crops.")
    template: str = param("subject_filewords", "Prompt template",
                          "Template name or path to a template file ([name] and [filewords] placeholders).")
    shuffle_tags: bool = param(False, "Shuffle tags", "Shuffle the comma-separated caption tags every step.",
                               section="captions")
    tag_dropout: float = param(0.0, "Tag dropout", "Drop each caption tag with this probability every step.",
                               minimum=0.0, maximum=1.0, step=0.05, section="captions")
    flip_p: float = param(0.0, "Flip probability",
                          "Train on a horizontally flipped image with this probability (not for text or faces).",
                          minimum=0.0, maximum=1.0, step=0.05)
    latent_sampling: str = param("once", "Latent sampling",
                                 "'once': sample each image's latent once; 'deterministic': use its mean; "
                                 "'random': resample every step.", choices=LATENT_SAMPLING)
    alpha_weight: bool = param(False, "Use PNG alpha channel as loss weight",
                               "Weight each pixel's loss by its opacity, as in A1111: transparent parts teach "
                               "nothing. Images without transparency weigh 1 everywhere; (almost) fully "
                               "transparent ones are skipped.")
    clip_grad_mode: str = param("disabled", "Gradient clipping", "Clip gradients by value or norm (after "
                                "unscaling).", choices=CLIP_GRAD_MODES, section="optimizer")
    clip_grad_value: str = param("0.1", "Clip value", "Clip threshold; a number or a schedule like the LR.",
                                 section="optimizer")
    precision: str = param("auto", "Precision",
                           "'auto': compute in the dtype the model is loaded in (fp16/bf16 on GPU, fp32 on CPU); "
                           "fp16/bf16 on an fp32 model: mixed precision; a choice the loaded model cannot run is "
                           "refused before training. The embedding always stays fp32.",
                           choices=PRECISIONS, section="performance")
    gradient_checkpointing: bool = param(False, "Gradient checkpointing",
                                         "Trade speed for memory in the UNet (off: faster).",
                                         section="performance")
    attention_optimizations: bool = param(True, "Attention optimizations",
                                          "Use memory-efficient attention (SDPA) while training.",
                                          section="performance")
    offload_vae: bool = param(False, "Move VAE to RAM", "Keep the VAE in RAM once latents are cached.",
                              section="performance")
    pin_memory: bool = param(False, "Pin memory",
                             "Keep cached latents in page-locked RAM for faster, asynchronous copies to the GPU "
                             "(CUDA only; more RAM).", section="performance")
    save_every: int = param(500, "Snapshot every", "Save a copy of the embedding every N steps; 0 = off.",
                            minimum=0, section="output")
    preview_every: int = param(500, "Preview every", "Save a preview image every N steps; 0 = off.",
                               minimum=0, section="output")
    csv_every: int = param(10, "CSV every", "Append the loss to the CSV every N steps; 0 = off.", minimum=0,
                           section="output")
    save_optimizer_state: bool = param(True, "Save optimizer state",
                                       "Write a .optim file next to each saved embedding, for exact resume.",
                                       section="output")
    preview_prompt: str = param("", "Preview prompts",
                                "One prompt per line (use the embedding's name in it); each gives a preview. "
                                "Empty = one prompt built from the template.", section="preview")
    preview_negative: str = param("", "Preview negative prompt", "Negative prompt for previews.",
                                  section="preview")
    preview_sampler: str = param("", "Preview sampler",
                                 "Sampler name as in txt2img (e.g. 'Euler a', 'DPM++ 2M', 'DDIM'); empty = the "
                                 "model's default.", section="preview")
    preview_steps: int = param(20, "Preview steps", "Sampling steps of a preview.", minimum=1, maximum=150,
                               section="preview")
    preview_cfg: float = param(7.0, "Preview CFG scale", "Classifier-free guidance of previews.", minimum=1.0,
                               maximum=30.0, section="preview")
    preview_seed: int = param(1, "Preview seed", "Fixed seed so previews are comparable.", minimum=0,
                              section="preview")
    preview_width: int = param(0, "Preview width", "Preview width in pixels; 0 = the training size.", minimum=0,
                               maximum=2048, step=64, section="preview")
    preview_height: int = param(0, "Preview height", "Preview height in pixels; 0 = the training size.",
                                minimum=0, maximum=2048, step=64, section="preview")
    comparison_grid: bool = param(True, "Comparison grid",
                                  "After training, render every snapshot (and the starting vectors) with the "
                                  "preview prompts and seed into one grid image.", section="preview")
    val_every: int = param(50, "Validate every",
                           "Every N steps, the loss on a fixed set with fixed noise and timesteps (comparable "
                           "across steps and runs); 0 = off.", minimum=0, section="validation")
    val_split: float = param(0.0, "Validation split",
                             "Share of the images held out for validation; 0 = validate on the training images.",
                             minimum=0.0, maximum=0.5, step=0.05, section="validation")
    val_timesteps: int = param(4, "Validation timesteps", "Fixed noise levels per image in the validation loss.",
                               minimum=1, maximum=32, section="validation")
    val_budget: float = param(0.1, "Validation budget",
                              "Most of the training time validation may take (0.1 = 10 %): when the images × "
                              "timesteps at every N steps would cost more, fewer (fixed) samples are used and N "
                              "grows; a run too short for even a start and end check skips it. 0 = no limit.",
                              minimum=0.0, maximum=1.0, step=0.05, section="validation")
    overtrain_patience: int = param(3, "Overtraining patience",
                                    "Warn when the validation loss rose this many evaluations in a row while the "
                                    "training loss fell.", minimum=1, maximum=100, section="validation")
    early_stop: bool = param(False, "Early stop", "Stop (and save) when the overtraining warning fires.",
                             section="validation")
    keep_best: bool = param(True, "Keep best snapshot",
                            "Save a snapshot at the step with the lowest validation loss.", section="validation")
    norm_warn: float = param(4.0, "Norm warning",
                             "Warn when a vector's norm exceeds this multiple of the median norm of the model's "
                             "vocabulary (inflated vectors override every prompt); 0 = off.", minimum=0.0,
                             maximum=100.0, step=0.5, section="health")
    norm_cap: float = param(0.0, "Norm cap",
                            "Scale vectors down to at most this multiple of the vocabulary's median norm after "
                            "every step; 0 = off.", minimum=0.0, maximum=100.0, step=0.5, section="health")
    nan_retries: int = param(3, "NaN recoveries",
                             "On a non-finite loss, roll back to the last good vectors, halve the learning rate "
                             "and continue, at most this many times; 0 = stop at once.", minimum=0, maximum=20,
                             section="health")
    seed: int = param(0, "Seed", "Seed for data order, templates, noise and timesteps (same seed, same run).",
                      minimum=0)
