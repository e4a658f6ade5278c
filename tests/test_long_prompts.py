"""Prompts over 75 tokens: split into 77-id chunks by A1111's rules, encoded per chunk, joined (issue 13)."""

from __future__ import annotations

import logging

import pytest
import torch

from textual_inversion_ext.backends.standalone import StandaloneBackend, splice
from textual_inversion_ext.core.embedding import SINGLE
from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.core.tokens import token_ids

TRIGGER = "my-bmw"  # three CLIP tokens
CPU = torch.device("cpu")


def _words(word: str, n: int) -> str:
    return " ".join([word] * n)


def _vectors(backend: StandaloneBackend, n: int = 2, seed: int = 0, grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {SINGLE: (torch.randn(n, backend.embedding_dim, generator=g) * 0.5).requires_grad_(grad)}


def _plain(backend: StandaloneBackend, text: str) -> torch.Tensor:
    """One chunk encoded alone from hand-made ids: BOS, tokens, EOS, EOS padding (SD1)."""
    ids = [splice.BOS, *token_ids(text), splice.EOS]
    ids += [splice.EOS] * (77 - len(ids))
    with torch.no_grad():
        return backend.text_encoder(torch.tensor([ids])).last_hidden_state


def _content(chunk: tuple[int, ...]) -> list[int]:
    """A chunk's prompt tokens: after BOS, up to its first EOS."""
    return list(chunk[1:chunk.index(splice.EOS, 1)])


# ------------------------------------------------------------------ chunk rules (ids only)


def test_chunk_count_at_the_75_token_boundary() -> None:
    assert len(splice.prompt_chunks(_words("car", 75), "", 0, splice.EOS).ids) == 1
    two = splice.prompt_chunks(_words("car", 76), "", 0, splice.EOS)
    assert [len(c) for c in two.ids] == [77, 77] and len(_content(two.ids[1])) == 1
    empty = splice.prompt_chunks("", TRIGGER, 2, 0)
    assert empty.ids == ((splice.BOS, splice.EOS, *[0] * 75),)  # SD2 pads with 0


def test_trigger_straddling_the_boundary_moves_whole_to_the_next_chunk() -> None:
    chunks = splice.prompt_chunks(f"{_words('car', 74)} {TRIGGER} dog", TRIGGER, 3, splice.EOS)
    assert len(chunks.ids) == 2
    assert _content(chunks.ids[0]) == [1615] * 74 and max(chunks.slots[0]) == -1  # padded, no slot
    assert list(chunks.slots[1][1:5]) == [0, 1, 2, -1]
    assert chunks.ids[1][1:4] == (splice.PLACEHOLDER,) * 3 and chunks.ids[1][4] == token_ids("dog")[0]


def test_comma_backtrack_moves_the_words_after_the_comma_with_their_slots() -> None:
    # 60 + comma + 10 + 2 slots + 2 = 75; the next word is 15 tokens after the comma (A1111 default: 20).
    prompt = f"{_words('car', 60)}, {_words('dog', 10)} {TRIGGER} {_words('dog', 5)}"
    chunks = splice.prompt_chunks(prompt, TRIGGER, 2, splice.EOS)
    first, second = (_content(c) for c in chunks.ids)
    assert first == [1615] * 60 + token_ids(",") and max(chunks.slots[0]) == -1
    assert len(second) == 10 + 2 + 5 and [s for s in chunks.slots[1] if s >= 0] == [0, 1]
    assert chunks.slots[1][11:13] == (0, 1)
    # A comma further back than 20 tokens does not move anything.
    far = splice.prompt_chunks(f"{_words('car', 50)}, {_words('dog', 30)}", "", 0, splice.EOS)
    assert len(_content(far.ids[0])) == 75


def test_more_vectors_than_a_chunk_holds_is_refused() -> None:
    with pytest.raises(ModelError, match="at most 75 vectors"):
        splice.prompt_chunks("a photo", TRIGGER, 76, splice.EOS)


def test_batch_pads_the_short_prompt_with_empty_chunks() -> None:
    ids, slots = splice.batch_chunks(["a dog", _words("car", 100)], "", 0, splice.EOS, CPU)
    assert ids.shape == slots.shape == (2, 2, 77)
    assert ids[0, 1].tolist() == [splice.BOS] + [splice.EOS] * 76 and (slots[0, 1] == -1).all()
    assert ids[1, 1, 1:26].tolist() == [1615] * 25


def test_encode_chunked_joins_chunks_and_takes_extras_from_the_first_chunk() -> None:
    ids = torch.arange(2 * 3 * 77).reshape(2, 3, 77)

    def run_one(chunk_ids: torch.Tensor, chunk_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert chunk_ids.shape == chunk_slots.shape == (6, 77)
        return chunk_ids.unsqueeze(-1).float(), chunk_ids[:, 0].float()  # "pooled" = first id of the row

    hidden, pooled = splice.encode_chunked(run_one, ids, -torch.ones_like(ids))
    assert hidden.shape == (2, 231, 1) and torch.equal(hidden[..., 0], ids.reshape(2, 231).float())
    assert pooled.tolist() == [0.0, 231.0]  # each prompt's first chunk


def test_pad_to_match() -> None:
    cond, uncond, empty = torch.randn(1, 154, 4), torch.randn(1, 77, 4), torch.randn(1, 77, 4)
    a, b = splice.pad_to_match(cond, uncond, empty)
    assert a is cond and b.shape == (1, 154, 4) and torch.equal(b[:, 77:], empty)
    b2, a2 = splice.pad_to_match(uncond, cond, empty)
    assert torch.equal(b2, b) and a2 is cond


# ------------------------------------------------------------------ encoding on the tiny model


def test_long_prompt_is_two_chunks_without_warning(tiny_backend, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = tiny_backend.encode_text([_words("car", 100)] * 2, TRIGGER, {})
    assert out.shape == (2, 154, tiny_backend.embedding_dim)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ref = torch.cat([_plain(tiny_backend, _words("car", 75)), _plain(tiny_backend, _words("car", 25))], dim=1)
    torch.testing.assert_close(out[:1], ref, rtol=0, atol=1e-5)


def test_chunks_equal_each_chunk_encoded_alone(tiny_backend) -> None:
    # Vectors equal to the rows of "red car blue": the spliced chunk must encode like those words.
    rows = tiny_backend.token_rows(token_ids("red car blue"))
    with torch.no_grad():
        got = tiny_backend.encode_text([f"{_words('car', 74)} {TRIGGER} dog"], TRIGGER, rows)
    ref = torch.cat([_plain(tiny_backend, _words("car", 74)), _plain(tiny_backend, "red car blue dog")], dim=1)
    assert got.shape == (1, 154, tiny_backend.embedding_dim)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_trigger_after_token_75_gets_a_gradient(tiny_backend) -> None:
    prompt = f"{_words('car', 80)} {TRIGGER} on a road"
    vec = _vectors(tiny_backend, n=3, grad=True)
    cond = tiny_backend.encode_text([prompt], TRIGGER, vec)
    cond.pow(2).sum().backward()
    grad = vec[SINGLE].grad
    assert grad is not None and torch.isfinite(grad).all() and (grad.abs().sum(dim=1) > 0).all()
    with torch.no_grad():
        other = tiny_backend.encode_text([prompt], TRIGGER, _vectors(tiny_backend, n=3, seed=1))
    assert torch.equal(cond[:, :77], other[:, :77])  # the vectors sit in the second chunk only
    assert not torch.allclose(cond[:, 77:], other[:, 77:])


def test_batch_of_short_and_long_prompt(tiny_backend) -> None:
    vec = _vectors(tiny_backend)
    short = f"a photo of {TRIGGER}"
    with torch.no_grad():
        both = tiny_backend.encode_text([short, f"{_words('car', 90)} {TRIGGER}"], TRIGGER, vec)
        alone = tiny_backend.encode_text([short], TRIGGER, vec)
    assert both.shape == (2, 154, tiny_backend.embedding_dim)
    torch.testing.assert_close(both[:1, :77], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[:1, 77:], _plain(tiny_backend, ""), rtol=0, atol=1e-5)  # an empty chunk


def test_short_prompts_encode_exactly_as_before(tiny_backend) -> None:
    vec = _vectors(tiny_backend, n=3, grad=True)
    prompts = [f"a photo of {TRIGGER}", f"{TRIGGER} next to {TRIGGER}"]
    got = tiny_backend.encode_text(prompts, TRIGGER, vec)
    # The single-chunk path as it was: batch_ids, one splice, one encoder call.
    ids, slots, truncated = splice.batch_ids(prompts, TRIGGER, 3, tiny_backend.pad_id, CPU)
    with splice.install(tiny_backend.text_encoder).splicing(slots, vec[SINGLE]):  # the installed table
        before = tiny_backend.text_encoder(ids).last_hidden_state
    assert truncated == [0, 0] and got.shape == (2, 77, tiny_backend.embedding_dim)
    assert torch.equal(got, before)


def test_preview_with_a_long_prompt_and_a_short_negative(tiny_backend) -> None:
    kwargs = {"seed": 3, "steps": 2, "width": 64, "height": 48, "cfg_scale": 4.0}
    long = f"{_words('car', 80)} {TRIGGER}"
    a = tiny_backend.preview(long, TRIGGER, _vectors(tiny_backend), negative_prompt="blurry", **kwargs)
    b = tiny_backend.preview(long, TRIGGER, _vectors(tiny_backend, seed=4), negative_prompt="blurry", **kwargs)
    assert a.size == (64, 48)
    assert a.tobytes() != b.tobytes()  # the second chunk (the vectors) reaches the UNet
    c = tiny_backend.preview(f"a {TRIGGER}", TRIGGER, _vectors(tiny_backend), negative_prompt=long, **kwargs)
    assert c.size == (64, 48)
