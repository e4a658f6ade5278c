"""Host captioners and upscaler against stand-in host modules: weights are looked for on disk before
the host is asked (no download attempt offline), and missing ones say what to put where."""

from __future__ import annotations

import sys
import types

import pytest

from textual_inversion_ext.backends.a1111 import captioning
from textual_inversion_ext.core.data.captioners import CaptionerUnavailable, get_captioner


@pytest.fixture
def host(monkeypatch, tmp_path):
    calls: list[str] = []

    class Interrogator:
        blip_model = None
        running_on_cpu = True
        dtype = None

        def load_blip_model(self):
            calls.append("load_blip")
            return types.SimpleNamespace(to=lambda device: "blip-on-device")

        def generate_caption(self, img):
            return "a generated caption"

        def send_blip_to_ram(self):
            calls.append("blip_to_ram")

    deepbooru_model = types.SimpleNamespace(start=lambda: calls.append("db_start"),
                                            stop=lambda: calls.append("db_stop"), tag_multi=lambda img: "1girl, solo")
    mods = {
        "modules": types.ModuleType("modules"),
        "modules.paths": types.SimpleNamespace(models_path=str(tmp_path)),
        "modules.shared": types.SimpleNamespace(interrogator=Interrogator(),
                                                cmd_opts=types.SimpleNamespace(no_half=True),
                                                opts=types.SimpleNamespace(upscaler_for_img2img=None),
                                                sd_upscalers=[]),
        "modules.devices": types.SimpleNamespace(device_interrogate="cpu", torch_gc=lambda: None),
        "modules.torch_utils": types.SimpleNamespace(get_param=lambda m: types.SimpleNamespace(dtype="float32")),
        "modules.deepbooru": types.SimpleNamespace(model=deepbooru_model),
        "modules.images": types.SimpleNamespace(resize_image=lambda mode, img, w, h, upscaler_name=None: (name, w, h)),
    }
    name = "x"
    for key, mod in mods.items():
        monkeypatch.setitem(sys.modules, key, mod)
        if "." in key:
            setattr(mods["modules"], key.split(".")[1], mod)
    captioning.register_host_captioners()
    return types.SimpleNamespace(calls=calls, root=tmp_path, shared=mods["modules.shared"])


def test_missing_weights_are_reported_without_asking_the_host(host):
    with pytest.raises(CaptionerUnavailable, match=r"BLIP weights are not available offline: put "
                                                   r"model_base_caption_capfilt_large\.pth in .*BLIP"):
        get_captioner("blip")
    with pytest.raises(CaptionerUnavailable, match=r"deepbooru weights .* model-resnet_custom_v3\.pt"):
        get_captioner("deepbooru")
    assert host.calls == []  # the host's loaders (which would download) were never called


def test_present_weights_load_caption_and_unload(host):
    (host.root / "BLIP").mkdir()
    (host.root / "BLIP" / "model_base_caption_capfilt_large.pth").write_bytes(b"w")
    (host.root / "torch_deepdanbooru" / "sub").mkdir(parents=True)
    (host.root / "torch_deepdanbooru" / "sub" / "model.pt").write_bytes(b"w")
    blip, db = get_captioner("blip"), get_captioner("deepbooru")
    assert (blip.caption(None), db.caption(None)) == ("a generated caption", "1girl, solo")
    blip.close()
    db.close()
    assert host.calls == ["load_blip", "db_start", "blip_to_ram", "db_stop"]


def test_upscaler_only_when_available_offline(host):
    assert captioning.host_upscaler() is None  # no setting: Lanczos
    host.shared.opts.upscaler_for_img2img = "R-ESRGAN 4x+"
    host.shared.sd_upscalers = [types.SimpleNamespace(name="R-ESRGAN 4x+", data_path="https://example/x.pth")]
    assert captioning.host_upscaler() is None  # would download mid-run
    host.shared.sd_upscalers[0].data_path = "/models/x.pth"
    assert captioning.host_upscaler()(None, 64, 32)[1:] == (64, 32)
