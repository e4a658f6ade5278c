"""A small CNN with one head per attribute that reads an image of the world back into a `Spec`."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import world

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    pool: int = 3000  # renders drawn once; batches are sampled from them with augmentation
    steps: int = 400
    batch: int = 64
    lr: float = 3e-3
    width: int = 24

    def to_dict(self) -> dict:
        return asdict(self)


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout in ((3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w)):  # 64 -> 4 px
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(4 * w * 16, len(world.choices(a))) for a in world.ATTRIBUTES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x).flatten(1)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """(B, 4) attribute indices, in `world.ATTRIBUTES` order."""
        self.eval()
        out = []
        for i in range(0, len(x), batch):
            logits = self(x[i : i + batch])
            out.append(torch.stack([lg.argmax(1) for lg in logits], dim=1))
        return torch.cat(out)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generated images are blurrier and noisier than renders: train the reader on both."""
    blur = torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, blurred, x)
    x = x + torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(len(x), 1, 1, 1, generator=gen)
    return x.clamp(-1, 1)


def batch_of(specs: list[world.Spec], count: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = world.sample_specs(specs, count, rng)
    return world.to_tensor([world.render(s, rng) for s in chosen]), world.labels(chosen)


def train_classifier(config: ClassifierConfig, seed: int) -> AttributeClassifier:
    """Trained on fresh renders of every valid combination (the reader must know the held-out one)."""
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    model = AttributeClassifier(config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps)
    pool_x, pool_y = batch_of(world.all_specs(), config.pool, rng)
    model.train()
    for step in range(config.steps):
        pick = torch.randint(0, config.pool, (config.batch,), generator=gen)
        x, y = pool_x[pick], pool_y[pick]
        logits = model(_augment(x, gen))
        loss = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            logger.info("classifier step %d loss %.4f", step, float(loss.detach()))
    model.eval()
    return model


def accuracy(model: AttributeClassifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy and 'all' (every attribute right)."""
    pred = model.predict(x)
    right = pred == y
    scores = {a: float(right[:, i].float().mean()) for i, a in enumerate(world.ATTRIBUTES)}
    scores["all"] = float(right.all(dim=1).float().mean())
    return scores
