from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from textual_inversion_ext.core.data.templates import (
    BUILTIN_DIR,
    PromptBuilder,
    TemplateError,
    list_templates,
    load_template,
    split_tags,
)

BUILTIN = ["none.txt", "style.txt", "style_filewords.txt", "subject.txt", "subject_filewords.txt"]


def _clean(text: str) -> bool:
    """No dangling or doubled commas, no stray whitespace."""
    return not re.search(r"^[\s,]|[\s,]$|\s,|,,|,\s*,|\s\s", text)


def test_builtin_templates_are_listed_and_valid() -> None:
    found = list_templates()
    assert set(BUILTIN) <= set(found)
    for name in BUILTIN:
        lines = load_template(name)
        PromptBuilder(lines, "x")  # every line has [name]
        if name == "none.txt":
            assert lines == ["[name]"]
            continue
        assert 15 <= len(lines) <= 25
        assert len(set(lines)) == len(lines)
        assert all(("[filewords]" in line) == ("filewords" in name) for line in lines)


@pytest.mark.parametrize("name", BUILTIN)
def test_empty_caption_leaves_no_dangling_commas(name: str) -> None:
    builder = PromptBuilder(load_template(name), "my-bmw")
    for line in builder.lines:
        text = PromptBuilder([line], "my-bmw").render("", random.Random(0))
        assert "my-bmw" in text and "[" not in text
        assert _clean(text), text


def test_load_by_name_without_suffix_and_by_path() -> None:
    assert load_template("style") == load_template("style.txt") == load_template(BUILTIN_DIR / "style.txt")


def test_a1111_style_user_folder(tmp_path: Path) -> None:
    folder = tmp_path / "textual_inversion_templates" / "nested"
    folder.mkdir(parents=True)
    text = "\ufeffa photo of [name]\r\n\r\n  art by [name], [filewords]  \r\n"
    (folder / "mine.txt").write_bytes(text.encode())
    (folder / "style.txt").write_text("my own style line by [name]\n", encoding="utf-8")
    found = list_templates([tmp_path / "textual_inversion_templates"])
    assert found["mine.txt"] == folder / "mine.txt"
    assert found["style.txt"] == folder / "style.txt"  # the user's folder overrides ours
    assert load_template("mine", [tmp_path / "textual_inversion_templates"]) == [
        "a photo of [name]",
        "art by [name], [filewords]",
    ]
    assert load_template(folder / "mine.txt") == ["a photo of [name]", "art by [name], [filewords]"]


def test_missing_extra_folder_is_skipped(tmp_path: Path) -> None:
    assert set(BUILTIN) <= set(list_templates([tmp_path / "nope"]))


def test_missing_template_lists_available() -> None:
    with pytest.raises(TemplateError, match=r"'nosuch' was not found.*subject_filewords\.txt"):
        load_template("nosuch")
    with pytest.raises(TemplateError, match="not found"):
        load_template("/no/such/dir/template.txt")


def test_empty_template_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n\t\n", encoding="utf-8")
    with pytest.raises(TemplateError, match="no lines"):
        load_template(path)


def test_lines_without_name_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"lack \[name\].*'picture'"):
        PromptBuilder(["picture"], "x")  # A1111's none.txt would train nothing
    with pytest.raises(TemplateError, match="1 template line"):
        PromptBuilder(["a photo of [name]", "[filewords]"], "x")
    path = tmp_path / "hypernetwork.txt"
    path.write_text("[filewords]\n", encoding="utf-8")
    with pytest.raises(TemplateError, match="hypernetwork"):
        PromptBuilder.from_template(path, "x")


def test_bad_arguments() -> None:
    with pytest.raises(TemplateError):
        PromptBuilder([], "x")
    with pytest.raises(TemplateError):
        PromptBuilder(["[name]"], "  ")
    with pytest.raises(TemplateError):
        PromptBuilder(["[name]"], "x", tag_dropout=1.5)
    with pytest.raises(TypeError):
        PromptBuilder("[name]", "x")


def test_split_tags_normalises_whitespace() -> None:
    assert split_tags(" red  car,\n blue\nsky , ,tree\n") == ["red car", "blue sky", "tree"]
    assert split_tags("") == split_tags(None) == []


def test_render_joins_with_comma_space() -> None:
    b = PromptBuilder(["a photo of [name], [filewords]"], "my-bmw")
    assert b.render("red car,\n blue  sky\n", random.Random(0)) == "a photo of my-bmw, red car, blue sky"
    assert b.render("", random.Random(0)) == "a photo of my-bmw"
    assert b.render(" , ,", random.Random(0)) == "a photo of my-bmw"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[filewords], art by [name]", "art by x"),
        ("a [filewords] photo of [name]", "a photo of x"),
        ("[name], [filewords], high detail", "x, high detail"),
        ("[filewords]  [name]", "x"),
    ],
)
def test_empty_filewords_placements(line: str, expected: str) -> None:
    assert PromptBuilder([line], "x").render("", random.Random(0)) == expected


def test_placeholders_in_captions_stay_literal() -> None:
    b = PromptBuilder(["[name], [filewords]"], "[filewords]")
    assert b.render("a [name] tag", random.Random(0)) == "[filewords], a [name] tag"


def test_a_line_is_drawn_for_every_prompt() -> None:
    lines = load_template("subject_filewords")
    b = PromptBuilder(lines, "x")
    rng = random.Random(1)
    seen = {b.render("red car", rng) for _ in range(2000)}
    assert len(seen) == len(lines)  # the same caption got every line


def test_same_seed_same_prompts() -> None:
    b = PromptBuilder(load_template("style_filewords"), "x", shuffle_tags=True, tag_dropout=0.3)
    caption = "a, b, c, d, e, f"
    first = [b.render(caption, rng) for rng in [random.Random(7)] for _ in range(50)]
    second = [b.render(caption, rng) for rng in [random.Random(7)] for _ in range(50)]
    assert first == second


def test_dropout_one_drops_every_tag() -> None:
    b = PromptBuilder(["a photo of [name], [filewords]"], "x", tag_dropout=1.0)
    rng = random.Random(0)
    assert {b.render("red, green, blue", rng) for _ in range(50)} == {"a photo of x"}


def test_dropout_zero_keeps_every_tag_in_order() -> None:
    b = PromptBuilder(["[name], [filewords]"], "x", tag_dropout=0.0)
    assert b.render("c, a, b", random.Random(0)) == "x, c, a, b"


def test_partial_dropout_drops_about_that_share() -> None:
    b = PromptBuilder(["[name]: [filewords]"], "x", tag_dropout=0.5)
    rng = random.Random(3)
    tags = [f"t{i}" for i in range(20)]
    kept = sum(len(b.tags(", ".join(tags), rng)) for _ in range(200))
    assert 0.4 < kept / (200 * 20) < 0.6


def test_shuffle_changes_order_but_keeps_the_set() -> None:
    b = PromptBuilder(["[filewords] by [name]"], "x", shuffle_tags=True)
    rng = random.Random(5)
    tags = ["one", "two", "three", "four", "five"]
    orders = set()
    for _ in range(30):
        text = b.render(", ".join(tags), rng)
        got = text.removesuffix(" by x").split(", ")
        assert sorted(got) == sorted(tags)
        orders.add(tuple(got))
    assert len(orders) > 5


def test_uses_filewords() -> None:
    assert PromptBuilder(load_template("subject_filewords"), "x").uses_filewords
    assert not PromptBuilder(load_template("subject"), "x").uses_filewords
