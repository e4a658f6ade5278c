from __future__ import annotations

from collections import Counter

from textual_inversion_ext.core.data.dataset import BatchOrder, derive_seed


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
