"""The synthetic world: attributes, a deterministic renderer and prompts that name what is drawn."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "purple": (150, 60, 190),
}
TEXTURES = ("plain", "striped")
BACKGROUNDS = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "red": (200, 45, 45),
}
ATTRIBUTES = ("shape", "colour", "texture", "background")
SIZE = 64
# Centred objects of nearly one size: with the object anywhere (±8 px, radius 15-21) a few CPU-minutes
# of pretraining never learnt the shapes (chance); centred, shape reached 1.00 (benchmarks/README.md).
RADIUS = (19.0, 20.0)  # outer radius in pixels, drawn per image
POSITION_JITTER = 0.0  # centre offset in pixels, drawn per image and axis
_SUPER = 2  # supersampling factor: smooth edges without PIL's version-dependent antialiasing


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    texture: str
    background: str

    def index(self) -> tuple[int, int, int, int]:
        return (SHAPES.index(self.shape), list(COLOURS).index(self.colour), TEXTURES.index(self.texture),
                list(BACKGROUNDS).index(self.background))


def choices(attribute: str) -> tuple[str, ...]:
    return {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES,
            "background": tuple(BACKGROUNDS)}[attribute]


@dataclass(frozen=True)
class WorldConfig:
    """Which (colour, shape) pairs the pretrained model never sees, and the TI concept among them."""

    held_out: tuple[tuple[str, str], ...] = (("purple", "star"),)
    concept: tuple[str, str, str] = ("striped", "purple", "star")  # texture, colour, shape
    concept_backgrounds: tuple[str, ...] = ("white", "black", "white", "black", "white")  # never red
    edit_background: str = "red"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def concept_spec(self, background: str) -> Spec:
        texture, colour, shape = self.concept
        return Spec(shape, colour, texture, background)

    def is_concept(self, spec: Spec) -> bool:
        return (spec.texture, spec.colour, spec.shape) == self.concept


def valid(spec: Spec) -> bool:
    """A red object on a red background would be invisible: such images do not exist in the world."""
    return spec.colour != spec.background


def all_specs() -> list[Spec]:
    return [s for s in itertools.starmap(Spec, itertools.product(SHAPES, COLOURS, TEXTURES, BACKGROUNDS))
            if valid(s)]


def seen_specs(world: WorldConfig) -> list[Spec]:
    return [s for s in all_specs() if (s.colour, s.shape) not in world.held_out]


def _mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test in coordinates scaled so the shape's outer radius is 1 (y points up)."""
    if shape == "circle":
        return x * x + y * y <= 0.85**2
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.75
    if shape == "triangle":
        inside = np.ones_like(x, dtype=bool)
        for angle in (-90.0, 30.0, 150.0):  # outward edge normals; inradius 0.5
            a = math.radians(angle)
            inside &= x * math.cos(a) + y * math.sin(a) <= 0.5
        return inside
    if shape == "star":
        r = np.hypot(x, y)
        theta = (np.arctan2(y, x) - math.pi / 2) % (2 * math.pi / 5)
        frac = np.abs(theta / (2 * math.pi / 5) - 0.5) * 2  # 1 at a tip, 0 between tips
        return r <= 0.42 + (1.0 - 0.42) * frac
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: Spec, rng: random.Random) -> np.ndarray:
    """A (64, 64, 3) uint8 image; position and size jitter come from `rng` only."""
    n = SIZE * _SUPER
    radius = rng.uniform(*RADIUS) * _SUPER
    cx = n / 2 + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * _SUPER
    cy = n / 2 + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * _SUPER
    phase = rng.uniform(0.0, 1.0)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    x, y = (xx - cx) / radius, (cy - yy) / radius
    inside = _mask(spec.shape, x, y)
    img = np.empty((n, n, 3), dtype=np.float64)
    img[:] = BACKGROUNDS[spec.background]
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    fill = np.broadcast_to(colour, img.shape).copy()
    if spec.texture == "striped":
        period = 16.0 * _SUPER  # diagonal bands ~6 px wide: wide enough to survive a 4x VAE
        band = (((xx + yy) / period + phase) % 1.0) < 0.5
        fill[band] = colour * 0.5
    img[inside] = fill[inside]
    img = img.reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, 64, 64) float32 in [-1, 1], the range the VAE and the classifier take."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def labels(specs: list[Spec]) -> torch.Tensor:
    return torch.tensor([s.index() for s in specs], dtype=torch.long)


@dataclass(frozen=True)
class Caption:
    """A pretraining caption and what it names: attribute -> value, or None where the words leave it
    out (the text encoder's pretraining target)."""

    text: str
    named: dict[str, str | None]


def subject_words(spec: Spec) -> str:
    """'striped purple star': every object attribute, in prompt order."""
    return f"{spec.texture} {spec.colour} {spec.shape}"


def _partial_subject(spec: Spec, rng: random.Random, drop: float) -> tuple[str, dict[str, str | None]]:
    """Texture and colour each go missing with probability `drop`, and the shape becomes the word
    'shape'; returns the words and what they name (attribute -> value or None)."""
    named: dict[str, str | None] = {}
    for attribute, value in (("texture", spec.texture), ("colour", spec.colour), ("shape", spec.shape)):
        named[attribute] = value if rng.random() >= drop else None
    words = [named["texture"], named["colour"], named["shape"] or "shape"]
    return " ".join(w for w in words if w), named


def background_words(background: str) -> str:
    return f"on a {background} background"


def training_caption(spec: Spec, rng: random.Random, template_lines: list[str]) -> Caption:
    """A caption for pretraining. 30 % use the trainer's own template lines, so the phrasing a TI run
    uses ('a photo of [name], [filewords]') means something to the model; attributes go missing
    now and then so a partial prompt (or the init text 'shape') leaves the rest to chance."""
    if rng.random() < 0.1:
        return Caption("", dict.fromkeys(ATTRIBUTES))  # unconditional, for classifier-free guidance
    subject, named = _partial_subject(spec, rng, drop=0.15)
    with_background = rng.random() >= 0.15
    named["background"] = spec.background if with_background else None
    background = background_words(spec.background) if with_background else ""
    if rng.random() < 0.3:
        line = rng.choice(template_lines)
        text = line.replace("[name]", subject)
        text = text.replace("[filewords]", background) if background else text.replace(
            ", [filewords]", "").replace("[filewords], ", "")
        return Caption(text, named)
    article = "a " if rng.random() < 0.5 else ""
    return Caption(f"{article}{subject} {background}".strip(), named)


def caption_targets(captions: list[Caption]) -> torch.Tensor:
    """(B, 4) class indices in `ATTRIBUTES` order; an attribute the caption leaves out is the extra
    class len(choices)."""
    rows = []
    for caption in captions:
        row = []
        for attribute in ATTRIBUTES:
            value, values = caption.named[attribute], choices(attribute)
            row.append(values.index(value) if value is not None else len(values))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def sample_specs(specs: list[Spec], count: int, rng: random.Random) -> list[Spec]:
    return [rng.choice(specs) for _ in range(count)]
