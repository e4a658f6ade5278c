"""The Create/Train tabs follow the loaded model (issue 14): the model line, the init-text count per encoder, the
collision warning's file type and the REST hints' "model" change when the host switches SD1 <-> SDXL between two
calls of `service.backend()`, with no restart; no usable model gives its error text, never a traceback."""

from __future__ import annotations

import pytest

from textual_inversion_ext import api
from textual_inversion_ext.backends.standalone import embedded_default
from textual_inversion_ext.core import create_hints as ch
from textual_inversion_ext.core.create import CreateParams
from textual_inversion_ext.core.create_hints import WARN
from textual_inversion_ext.core.errors import ModelError
from textual_inversion_ext.service import Service
from textual_inversion_ext.ui import handlers


def sd1_line(backend) -> str:
    return f"Loaded model: {backend.info.name} — SD1: {backend.info.encoders['default']} per vector (.pt)"


def sdxl_line(backend) -> str:
    widths = backend.info.encoders
    return (f"Loaded model: {backend.info.name} — SDXL: each vector is clip_l {widths['clip_l']} + clip_g "
            f"{widths['clip_g']} (saved as .safetensors)")


BOTH = "clip_l: 2 tokens · clip_g: 2 tokens → suggested vectors 2"


@pytest.fixture(scope="module")
def sdxl():
    return embedded_default("tiny-sdxl", device="cpu")


class Host:
    """Stands in for the host's `current_backend`: whatever checkpoint is loaded when it is asked (or the error
    that asking raises)."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    def __call__(self):
        if isinstance(self.loaded, Exception):
            raise self.loaded
        return self.loaded


@pytest.fixture
def host(tiny_backend, tmp_path):
    host = Host(tiny_backend)
    return host, Service(backend=host, embeddings_dir=tmp_path / "embeddings", log_root=tmp_path / "logs")


def test_model_line_and_counts_follow_a_switch(host, tiny_backend, sdxl):
    host, service = host
    seen = []
    for loaded in (tiny_backend, sdxl, tiny_backend):  # one service throughout: nothing is rebuilt
        host.loaded = loaded
        model = handlers.loaded_model(service)
        assert model.ok
        seen.append((model.line, handlers.init_text_info("red robot", model.encoders),
                     handlers.init_note("tiext-robot", "red robot", 0, "pool", encoders=model.encoders)[0].text))
    one = "2 tokens → suggested vectors 2"  # one encoder: the text as before
    sd1 = (sd1_line(tiny_backend), one, one)
    assert seen[0] == seen[2] == sd1
    assert seen[1][0] == sdxl_line(sdxl) and "(saved as .safetensors)" in seen[1][0]
    assert seen[1][1].startswith(BOTH + "; clip_l ") and seen[1][2] == BOTH
    assert handlers.init_text_info("", sdxl.info.encoders).startswith("Empty")


def test_no_usable_model_shows_the_error_not_a_traceback(host):
    host, service = host
    host.loaded = ModelError("No checkpoint is loaded <yet>.")
    model = handlers.loaded_model(service)
    assert (model.line, model.ok, model.encoders, model.suffix) == ("No checkpoint is loaded <yet>.", False, None,
                                                                    None)
    assert model.html() == "<div class='tiext-note tiext-model tiext-warn'>No checkpoint is loaded &lt;yet&gt;.</div>"
    host.loaded = None  # a host mid-switch: no `.info` at all
    model = handlers.loaded_model(service)
    assert not model.ok and model.line.startswith("Cannot read the loaded model: ") and "Traceback" not in model.line
    assert handlers.init_note("x", "red robot", encoders=model.encoders)[0].text == "2 tokens → suggested vectors 2"


def warning(hints) -> str:
    (text,) = [h.text for h in hints if h.level == WARN]
    return text


def test_collision_names_the_file_the_loaded_model_would_write(host, tiny_backend, sdxl):
    host, service = host
    params = CreateParams(name="tiext-robo", init_text="red robot")
    host.loaded = sdxl
    assert service.create(params).path.name == "tiext-robo.safetensors"
    clash = warning(handlers.name_note(service, "tiext-robo"))
    assert "refuses the name unless Overwrite is on, which replaces tiext-robo.safetensors" in clash
    host.loaded = tiny_backend  # SD1 saves tiext-robo.pt: a second file with the same trigger word
    assert warning(handlers.name_note(service, "tiext-robo")) == (
        "The existing embedding tiext-robo.safetensors already answers to 'tiext-robo'. Create would save "
        "tiext-robo.pt next to it, two embeddings with one trigger word of which the host uses only one. Choose "
        "another name.")
    assert service.create(params).path.name == "tiext-robo.pt"  # as the warning says: not refused


def test_collision_explains_case_and_the_case_blind_file_system_only_when_they_apply():
    files = ["tiext-robo.safetensors"]
    case = warning(ch.name_hints("Tiext-Robo", ["tiext-robo"], files, ".safetensors"))
    assert "prompts are lower-cased" in case and "Create would save Tiext-Robo.safetensors" in case
    assert "as on Windows, Create refuses it" in case  # the same file where names ignore case
    other = warning(ch.name_hints("Tiext-Robo", ["tiext-robo"], files))  # no suffix known: .pt
    assert "prompts are lower-cased" in other and "Windows" not in other  # Tiext-Robo.pt is another file anywhere


def test_model_line_text():
    assert ch.model_line("sd2", "v2", {"default": 1024}, ".pt") == "Loaded model: v2 — SD2: 1024 per vector (.pt)"
    assert ch.token_count(3, {"clip_l": 768, "clip_g": 1280}) == "clip_l: 3 tokens · clip_g: 3 tokens"
    assert ch.token_count(1, {"default": 768}) == ch.token_count(1) == "1 token"


def test_rest_hints_answer_names_the_model_they_were_made_for(host, tiny_backend, sdxl):
    host, service = host
    body = {"name": "robo", "init_text": "red robot"}
    host.loaded = sdxl
    status, reply = api.dispatch(api.create_hints, service, body)
    assert status == 200 and reply["model_error"] is None
    assert reply["model"] == {"family": "sdxl", "name": sdxl.info.name, "encoders": sdxl.info.encoders,
                              "suffix": ".safetensors"}
    assert list(reply["model"]["encoders"]) == ["clip_l", "clip_g"]
    assert reply["init_text"][0]["text"] == BOTH
    host.loaded = tiny_backend
    status, reply = api.dispatch(api.create_hints, service, body)
    assert reply["model"] == {"family": "sd1", "name": tiny_backend.info.name, "encoders": tiny_backend.info.encoders,
                              "suffix": ".pt"}
    assert reply["init_text"][0]["text"] == "2 tokens → suggested vectors 2"
    host.loaded = ModelError("No checkpoint is loaded.")  # the hints still come, without the model's part
    status, reply = api.dispatch(api.create_hints, service, body)
    assert status == 200 and reply["model"] is None and reply["model_error"] == "No checkpoint is loaded."
    assert reply["init_text"][0]["text"] == "2 tokens → suggested vectors 2" and reply["vectors"] == 2
