from __future__ import annotations

import weakref
from collections import Counter

import torch
from _linear_backend import LinearBackend
from PIL import Image

from textual_inversion_ext.core.data import images
from textual_inversion_ext.core.data.dataset import ENCODE_BATCH, BatchOrder, derive_seed, prepare


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2) == derive_seed(1, 2)
    assert len({derive_seed(0, s) for s in range(100)}) == 100


def test_every_image_once_per_epoch_in_same_size_batches():
    sizes = [(512, 512)] * 5 + [(448, 576)] * 3
    order = BatchOrder(sizes, batch_size=2, seed=3)
    batches = order.epoch_batches(0)
    assert order.batches_per_epoch == len(batches) == 3 + 2
    seen = Counter(i for b in batches for i in b)
    assert set(seen) == set(range(8))  # nobody left out
    for b in batches:
        assert len(b) == 2 and len({sizes[i] for i in b}) == 1


def test_order_is_deterministic_per_seed_and_changes_per_epoch():
    sizes = [(64, 64)] * 10
    a, b = BatchOrder(sizes, 1, seed=0), BatchOrder(sizes, 1, seed=0)
    assert [a.batch(i) for i in range(25)] == [b.batch(i) for i in range(25)]
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert BatchOrder(sizes, 1, seed=1).epoch_batches(0) != a.epoch_batches(0)


def test_prepare_streams_per_chunk_so_decoded_pixels_never_pile_up(tmp_path, monkeypatch):
    """Issue 12.10: at most one chunk of decoded pixel tensors is alive when the encoder runs (all of them were,
    before), in scan order, with a file broken since the scan reported and the others kept."""
    for k in range(11):  # two buckets at 256 px: squares and 1:2 portraits
        Image.new("RGB", (64, 128) if k % 3 == 0 else (64, 64), (20 * k, 0, 0)).save(tmp_path / f"{k:02d}.png")
    scan = images.scan_dataset(tmp_path)
    (tmp_path / "05.png").write_bytes(b"broken since the scan")
    decoded: list[weakref.ref] = []
    real_to_tensor = images.to_tensor

    def to_tensor(img):
        tensor = real_to_tensor(img)
        decoded.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(images, "to_tensor", to_tensor)
    alive_at_encode: list[int] = []

    class Recording(LinearBackend):
        def encode_images(self, pixels):
            alive_at_encode.append(sum(ref() is not None for ref in decoded))
            return super().encode_images(pixels)

    data = prepare(Recording(), scan, resolution=256, use_buckets=True, with_flips=True, latent_sampling="once",
                   seed=0)
    assert len(decoded) == 10 and len(alive_at_encode) == 3 * 2  # chunks (2 square, 1 portrait) × flips
    assert max(alive_at_encode) <= ENCODE_BATCH, alive_at_encode
    assert [p.name for p in data.paths] == [f"{k:02d}.png" for k in range(11) if k != 5]
    assert [s.path.name for s in data.skipped] == ["05.png"] and "could not be read" in data.skipped[0].reason
    assert data.buckets[0] != data.buckets[1] and all(len(v) == 2 for v in data.latents)
    kept = [k for k in range(11) if k != 5]
    red = torch.tensor([float(v[False].mean[0, 0, 0]) for v in data.latents])  # each latent is its own image's
    torch.testing.assert_close(red, torch.tensor([20 * k / 127.5 - 1 for k in kept]))
