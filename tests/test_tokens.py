from __future__ import annotations

import logging
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from textual_inversion_ext.core import tokens
from textual_inversion_ext.core.tokens import (
    PROMPT_TOKEN_BUDGET,
    count_tokens,
    decode_tokens,
    init_vectors,
    suggest_vectors,
    token_ids,
)

# Well-known CLIP BPE ids (the same in A1111's SD1 tokenizer and OpenCLIP); 265 is the "*" that
# A1111 writes into string_to_token.
KNOWN = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "blue bmw": [1746, 7869],
    "*": [265],
}


def test_blue_bmw_is_two_tokens() -> None:
    assert count_tokens("blue bmw") == 2
    assert suggest_vectors("blue bmw") == 2


@pytest.mark.parametrize(("text", "ids"), KNOWN.items())
def test_known_ids(text: str, ids: list[int]) -> None:
    assert token_ids(text) == ids


def test_cleaned_and_lower_cased_like_clip() -> None:
    assert token_ids("  Blue\n  BMW ") == token_ids("blue bmw")
    assert token_ids("caf&amp;e") == token_ids("caf&e")  # html entities are unescaped


def test_decode_tokens() -> None:
    assert decode_tokens(token_ids("blue bmw")) == ["blue", "bmw"]
    with pytest.raises(ValueError):
        decode_tokens([10**7])


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text: str) -> None:
    assert token_ids(text) == []
    assert count_tokens(text) == 0
    assert suggest_vectors(text) == 1


def test_suggest_is_capped_by_the_prompt_budget() -> None:
    assert count_tokens("cat " * 100) == 100
    assert suggest_vectors("cat " * 100) == PROMPT_TOKEN_BUDGET


def test_counting_does_not_import_the_open_clip_package() -> None:
    if "open_clip" in sys.modules:
        pytest.skip("another test imported open_clip already")
    count_tokens("a photo")
    assert "open_clip" not in sys.modules


@pytest.mark.slow
def test_same_ids_as_open_clip() -> None:
    from open_clip.tokenizer import SimpleTokenizer  # imports open_clip (~5 s): one test only

    reference = SimpleTokenizer()
    for text in ["blue bmw", "A photo of a CAT, 4k!", "naïve café – 東京", "zzzqqq xyzzy", "sks person"]:
        assert token_ids(text) == reference.encode(text)


def test_loader_prefers_an_already_imported_open_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = object()
    imported = []

    def fake_import(name: str) -> object:
        imported.append(name)
        return sentinel

    monkeypatch.setitem(sys.modules, "open_clip", object())
    monkeypatch.setattr(tokens.importlib, "import_module", fake_import)
    assert tokens._load_tokenizer_module() is sentinel
    assert imported == ["open_clip.tokenizer"]


def test_loader_falls_back_to_a_normal_import(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = object()
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    monkeypatch.delitem(sys.modules, tokens._PRIVATE_MODULE, raising=False)
    monkeypatch.setattr(tokens.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(tokens.importlib, "import_module", lambda name: sentinel)
    assert tokens._load_tokenizer_module() is sentinel


# --- init_vectors ---------------------------------------------------------------------------


def _rows(n: int, dim: int = 4) -> torch.Tensor:
    return torch.arange(n * dim, dtype=torch.float32).reshape(n, dim)


def test_equal_counts_copy_rows() -> None:
    rows = _rows(3)
    out, message = init_vectors(rows, 3)
    assert message is None
    assert torch.equal(out, rows)
    assert out.data_ptr() != rows.data_ptr()


def test_pool_averages_consecutive_groups(caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(5)
    names = ["a", "red", "vintage", "sports", "car"]
    with caplog.at_level(logging.WARNING, logger="textual_inversion_ext.core.tokens"):
        out, message = init_vectors(rows, 2, tokens=names)
    assert torch.allclose(out[0], rows[0:2].mean(0))
    assert torch.allclose(out[1], rows[2:5].mean(0))
    assert message is not None and "average" in message and "'car'" in message
    assert "5 tokens" in caplog.text


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80))
def test_pool_uses_every_token_once(n_tokens: int, n_vectors: int) -> None:
    if n_tokens <= n_vectors:
        return
    out, _ = init_vectors(torch.eye(n_tokens), n_vectors)  # row i of out shows which tokens fed it
    members = out > 0
    assert members.sum(0).tolist() == [1] * n_tokens  # each token in exactly one group
    sizes = members.sum(1)
    assert int(sizes.max() - sizes.min()) <= 1  # near-equal groups
    order = [int(torch.nonzero(members[:, j])[0]) for j in range(n_tokens)]
    assert order == sorted(order)  # consecutive groups, in text order
    assert torch.allclose(out.sum(1), torch.ones(n_vectors))  # plain means


def test_truncate_names_dropped_tokens() -> None:
    names = ["a", "red", "vintage", "sports", "car"]
    out, message = init_vectors(_rows(5), 2, "truncate", tokens=names)
    assert torch.equal(out, _rows(5)[:2])
    assert message is not None
    assert "'vintage', 'sports', 'car'" in message and "dropped" in message


def test_truncate_without_names_uses_positions() -> None:
    _, message = init_vectors(_rows(4), 3, "truncate")
    assert message is not None and "#4" in message


def test_spread_is_the_host_rule() -> None:
    rows = _rows(5)
    out, message = init_vectors(rows, 2, "spread", tokens=list("abcde"))
    assert torch.equal(out, rows[[0, 2]])  # i * 5 // 2 for i in (0, 1)
    assert message is not None and "'b'" in message and "skipped" in message


@pytest.mark.parametrize("mode", ["pool", "truncate", "spread"])
def test_fewer_tokens_repeat_evenly(mode: str) -> None:
    rows = _rows(2)
    out, message = init_vectors(rows, 5, mode, tokens=["blue", "bmw"])
    assert torch.equal(out, rows[[0, 0, 0, 1, 1]])
    assert message is not None and "repeated" in message and "'blue'×3" in message


def test_empty_init_text_gives_zeros() -> None:
    out, message = init_vectors(torch.zeros(0, 8), 3)
    assert out.shape == (3, 8) and not out.any()
    assert message is not None and "empty" in message


def test_zeros_mode() -> None:
    out, message = init_vectors(_rows(2), 4, "zeros")
    assert out.shape == (4, 4) and not out.any()
    assert message is not None and "zero" in message


def test_output_is_float32_and_detached() -> None:
    rows = _rows(3).half().requires_grad_()
    out, _ = init_vectors(rows, 2)
    assert out.dtype == torch.float32
    assert not out.requires_grad


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        init_vectors(_rows(2), 2, "median")
    with pytest.raises(ValueError, match="n_vectors"):
        init_vectors(_rows(2), 0)
    with pytest.raises(ValueError, match="2-D"):
        init_vectors(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="token names"):
        init_vectors(_rows(2), 2, tokens=["a"])
