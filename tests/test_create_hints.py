"""Create/Train helpers with the real CLIP tokenizer: name checks, init-text notes, the 75-token prompt
budget, the effective learning rate, and their UI handlers and API route."""

from __future__ import annotations

import pytest
from _ui_fakes import stub_service

from textual_inversion_ext import api
from textual_inversion_ext.core import create_hints as ch
from textual_inversion_ext.core.create import CreateParams
from textual_inversion_ext.core.create_hints import INFO, WARN, Hint
from textual_inversion_ext.core.data.templates import load_template
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.ui import handlers
from textual_inversion_ext.ui.controls import control_specs, values_of

LONG_LINE = "a detailed close-up studio photo of the [name] standing on a wooden table, [filewords]"


def warnings(hints: list[Hint]) -> list[str]:
    return [h.text for h in hints if h.level == WARN]


@pytest.mark.parametrize("name", ["car", "Car", "dog", "style", " dog "])
def test_a_name_that_is_a_vocabulary_word_warns(name):
    hints = ch.name_hints(name)
    assert hints[0] == Hint(INFO, "Name: 1 token as text (in a prompt the trigger word is replaced by its vectors)")
    (warn,) = warnings(hints)
    word = name.strip().lower()
    assert f"{word!r} is a whole word of CLIP's vocabulary" in warn
    assert f"in every prompt, also in 'a red {word}'" in warn


@pytest.mark.parametrize("name", ["tiext-robot", "sks-xyz", "my-bmw", "car!", "blue car2", "zxq"])
def test_names_that_are_not_one_word_do_not_warn(name):
    assert ch.vocabulary_word(name) is None
    assert warnings(ch.name_hints(name)) == []


def test_invalid_and_empty_names():
    assert ch.name_hints("") == [] and ch.name_hints("   ") == []
    (hint,) = ch.name_hints("a/b")
    assert hint.level == WARN and "not allowed" in hint.text


def test_collision_is_case_insensitive():
    (clash,) = warnings(ch.name_hints("Tiext-Robot", ["tiext-robot", "other"]))
    assert "An embedding named 'Tiext-Robot' already exists" in clash and "unless Overwrite is on" in clash
    assert warnings(ch.name_hints("tiext-robot2", ["tiext-robot"])) == []
    # with file names: the same file is refused; a case-only or file-type difference is a second file
    same = warnings(ch.name_hints("tiext-robot", ["tiext-robot"], ["tiext-robot.pt"]))
    assert same and "refuses the name unless Overwrite is on, which replaces tiext-robot.pt" in same[0]
    (other,) = warnings(ch.name_hints("TIEXT-robot", ["x"], ["tiext-robot.safetensors"]))
    assert "tiext-robot.safetensors already answers to 'TIEXT-robot'" in other and "Choose another name" in other


def test_init_text_hints():
    assert ch.init_text_hints("blue bmw") == [Hint(INFO, "2 tokens → suggested vectors 2")]
    assert ch.init_text_hints("blue bmw", 2) == [Hint(INFO, "2 tokens → suggested vectors 2")]
    pooled = ch.init_text_hints("a red vintage sports car", 2)
    assert pooled[1] == Hint(INFO, "5 tokens for 2 vectors (init mode 'pool'): tokens are pooled, each vector "
                                   "starts as the average of a group of neighbouring tokens.")
    cut = ch.init_text_hints("a red vintage sports car", 2, "truncate")[1]
    assert cut.level == WARN and "the first 2 are kept, 'vintage', 'sports', 'car' dropped" in cut.text
    assert "tokens are repeated" in ch.init_text_hints("car", 3)[1].text
    long = ch.init_text_hints("word " * 80)
    assert long[0].text == "80 tokens → suggested vectors 75"
    assert "more than the 75 one prompt chunk holds" in long[1].text and ch.vectors_for("word " * 80, 0) == 75
    assert ch.init_text_hints("") == [Hint(INFO, "Empty: the vectors start at zero (1 vector unless you set more).")]
    assert ch.init_text_hints("", 3) == [Hint(INFO, "Empty: the 3 vectors start at zero.")]


def test_prompt_budget_warns_for_a_long_line_with_many_vectors():
    (ok,) = ch.prompt_budget([LONG_LINE], 1)
    assert ok.level == INFO and ok.text.startswith("Longest training prompt: 15 of 75 tokens")
    (warn,) = ch.prompt_budget(["a photo of [name]", LONG_LINE], 70, name="tiext-robot")
    assert warn.level == WARN
    # 14 tokens of text + 70 vectors; the name's own 4 tokens do not count
    assert warn.text.startswith("The longest training prompt has 84 tokens, 9 over the 75-token budget: "
                                "'a detailed close-up studio photo of the tiext-robot standing on a wooden table'")
    assert "template line 2" in warn.text and "1 of 2 lines over" in warn.text
    assert "75-token chunks" in warn.text and "moved whole into the next chunk" in warn.text
    assert "cuts the tail off" not in warn.text  # the standalone trainer no longer truncates


def test_prompt_budget_counts_the_longest_caption_as_the_trainer_renders_it():
    lines = ["a photo of [name], [filewords]"]
    assert ch.prompt_budget(lines, 4)[0].text.startswith("Longest training prompt: 7 of 75")  # ", " dropped
    captions = ["red", " red ,  shiny,\nvintage sports car ", "blue"]
    assert ch.longest_caption(captions) == "red, shiny, vintage sports car"
    assert ch.prompt_budget(lines, 4, captions)[0].text.startswith("Longest training prompt: 15 of 75")
    assert "[filewords] = the longest caption" in ch.prompt_budget(lines, 4, captions)[0].text
    # the name inside a caption is expanded too, as the trainer and the host do
    assert ch.prompt_budget(lines, 10, ["tiext-robot on a table"], name="tiext-robot")[0].text.startswith(
        "Longest training prompt: 27 of 75")  # 3 + 10 + 1 + 10 + 3


def test_prompt_budget_template_problems_and_hidden_names():
    (bad,) = ch.prompt_budget(["a photo", "a photo of [name]"], 2)
    assert bad.level == WARN and "lack [name]" in bad.text
    hidden = warnings(ch.prompt_budget(["a photo of [name], [filewords]"], 1, ["red"], name="car!"))
    assert hidden and "not found in 1 training prompt" in hidden[0]
    with pytest.raises(ValueError):
        ch.prompt_budget(["[name]"], 0)


def test_prompt_budget_of_the_default_template():
    lines = load_template(TrainParams().template)
    assert not warnings(ch.prompt_budget(lines, 1))
    assert warnings(ch.prompt_budget(lines, 70))


def test_effective_lr():
    assert ch.effective_lr("0.005", 2, 2, True) == Hint(
        INFO, "Effective learning rate: 0.005 × 4 (batch 2 × accumulation 2) = 0.02.")
    assert ch.effective_lr("0.05:50, 0.01:100, 0.005", 2, 3, True).text == (
        "Effective learning rate: 0.05 × 6 (batch 2 × accumulation 3) = 0.3 for the first stage of the schedule; "
        "every stage is multiplied by 6.")
    assert ch.effective_lr("0.005", 2, 2, False).text == (
        "Learning rate 0.005, not scaled (batch 2 × accumulation 2; scaling by batch is off).")
    assert ch.effective_lr("0.005", 1, 1, True).text == (
        "Effective learning rate: 0.005 (batch 1 × accumulation 1: nothing to scale).")
    bad = ch.effective_lr("0.005:x", 2, 2, True)
    assert bad.level == WARN and bad.text.startswith("Invalid learning rate schedule: item 1 '0.005:x' has a step")
    assert ch.effective_lr("", 1, 1, True).text.startswith("The learning rate schedule is empty")
    assert ch.effective_lr("0.005", 0, 1, True).level == WARN


def test_dataset_captions_read_like_training(tmp_path):
    from PIL import Image

    for stem in ("a", "blue_car"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{stem}.png")
    (tmp_path / "a.txt").write_text("red, shiny\n", encoding="utf-8")
    assert sorted(ch.dataset_captions(tmp_path)) == ["blue car", "red, shiny"]


# ------------------------------------------------------------------ UI handlers


def test_handlers_notes(tmp_path):
    service = stub_service(tmp_path)
    handlers.create(service, control_specs(CreateParams, "c_"), ["car", "*", 1, "pool", False])
    name = handlers.name_note(service, "CAR")
    assert [h.level for h in name] == [INFO, WARN, WARN] and "already" in name[2].text
    assert handlers.name_note(service, "") == []
    init = handlers.init_note("tiext-robot", "blue bmw", 70.0, "pool")  # gradio's Number gives floats
    assert init[0].text == "2 tokens → suggested vectors 2" and "over the 75-token budget" in init[-1].text
    assert handlers.init_note("x", "blue bmw", None, "pool") == [Hint(INFO, "2 tokens → suggested vectors 2")]
    assert "Template 'nope' was not found" in handlers.init_note("x", "a", 1, "pool", template="nope")[-1].text
    html = handlers.hints_html([Hint(INFO, "a < b"), Hint(WARN, "bad")])
    assert html == "<div class='tiext-note'>a &lt; b</div><div class='tiext-note tiext-warn'>⚠ bad</div>"
    assert handlers.lr_note("0.005", 2.0, 2.0, True)[0].text.endswith("= 0.02.")
    assert handlers.lr_note("0.005", None, None, True)[0].text.startswith("Effective learning rate: 0.005 (batch 1")


def test_handlers_survive_a_broken_listing(tmp_path):
    class Broken:
        def list_embeddings(self):
            raise OSError("gone")

    assert [h.level for h in handlers.name_note(Broken(), "tiext-robot")] == [INFO]


def test_train_start_message_warns_about_the_prompt_budget(tmp_path, demo_data):
    service = stub_service(tmp_path)
    handlers.create(service, control_specs(CreateParams, "c_"), ["toy", "*", 75, "pool", False])
    specs = control_specs(TrainParams, "t_")
    params = TrainParams()
    warning = handlers.budget_warning(service, "toy", str(demo_data), params)
    assert warning and "over the 75-token budget" in warning
    handlers.create(service, control_specs(CreateParams, "c_"), ["one", "*", 1, "pool", False])
    assert handlers.budget_warning(service, "one", str(demo_data), params) is None
    assert handlers.budget_warning(service, "ghost", str(demo_data), params) is None  # never raises
    started = []

    class Recording:  # the stub service cannot train: record the start instead
        def __getattr__(self, item):
            return getattr(service, item)

        def start_training(self, name, data_dir, p):
            started.append(name)
            return type("J", (), {"name": name, "id": "train-1"})()

    out = handlers.start_training(Recording(), "toy", str(demo_data), specs, values_of(params, specs))
    assert out.ok and started == ["toy"]
    lines = out.message.splitlines()
    assert "over the 75-token budget" in lines[-2] and lines[-1].startswith("Started training 'toy'")


# ------------------------------------------------------------------ API


def test_api_create_hints(tmp_path):
    service = stub_service(tmp_path)
    assert ("POST", "/create/hints", api.create_hints) in api.ROUTES
    status, body = api.dispatch(api.create_hints, service, {"name": "car", "init_text": "blue bmw"})
    assert status == 200 and body["vectors"] == 2 and body["template"] == TrainParams().template
    assert [h["level"] for h in body["name"]] == [INFO, WARN]
    assert body["init_text"] == [{"level": INFO, "text": "2 tokens → suggested vectors 2"}]
    assert body["prompt_budget"][0]["level"] == INFO
    status, body = api.dispatch(api.create_hints, service, {"name": "tiext-robot", "num_vectors": 70,
                                                            "template": "subject"})
    assert status == 200 and body["prompt_budget"][0]["level"] == WARN and body["template"] == "subject"
    status, body = api.dispatch(api.create_hints, service, {"name": "x", "template": "nope"})
    assert status == 200 and "not found" in body["prompt_budget"][0]["text"]
    assert api.dispatch(api.create_hints, service, {"num_vectors": 99})[0] == 422
    assert api.dispatch(api.create_hints, service, {"num_vectors": "3"})[0] == 422
    assert api.dispatch(api.create_hints, service, {"init_mode": "bogus"})[0] == 422
    assert api.dispatch(api.create_hints, service, {"template": 3})[0] == 422
    assert api.dispatch(api.create_hints, service, {"colour": "red"})[0] == 422


def test_create_with_vectors_0_makes_what_the_note_suggests(tmp_path):
    service = stub_service(tmp_path)
    specs = control_specs(CreateParams, "c_")
    outcome, _ = handlers.create(service, specs, ["long", "word " * 80, 0, "pool", False])
    assert outcome.ok and "(75 vectors)" in outcome.message and "average of a group" in outcome.message
    assert [e["vectors"] for e in service.list_embeddings()] == [ch.vectors_for("word " * 80, 0)] == [75]
