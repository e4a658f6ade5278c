"""Preprocess jobs, the dataset check and the caption editor through the Service, the REST handlers and
the UI's plain handlers (no gradio, no FastAPI)."""

from __future__ import annotations

import threading

from _ui_fakes import hold_a_job, stub_service
from PIL import Image
from test_api import call, wait

from textual_inversion_ext import api
from textual_inversion_ext.core.data.captioners import CaptionerUnavailable, register_captioner
from textual_inversion_ext.core.data.preprocess import PreprocessParams
from textual_inversion_ext.ui import prep, status
from textual_inversion_ext.ui.controls import control_specs, values_of

PREP_SPECS = control_specs(PreprocessParams, "tiext_preprocess_")


def make_images(folder, n=3, size=(96, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 160)).save(folder / f"img {i}.png")
        (folder / f"img {i}.txt").write_text(f"a photo of a blue bmw on a road, tag{i}, sunny\n")
    return folder


def test_preprocess_job_defaults_to_native_size_and_reports(tmp_path):
    service = stub_service(tmp_path)  # StubBackend: resolution 64
    src = make_images(tmp_path / "src")
    status_code, body = call(service, api.preprocess, {"source": str(src), "flip": True, "captioners": "blip"})
    assert status_code == 200, body
    done = wait(service, body["job_id"])
    assert done["kind"] == "preprocess" and done["status"] == "finished", done
    assert (done["done"], done["total"]) == (3, 3)
    out = tmp_path / "src-Processed"
    assert done["result"]["destination"] == str(out) and done["result"]["outputs"] == 6
    assert Image.open(out / "img 0.png").size == (64, 64)  # the model's native size
    assert (out / "img 0-flip.txt").read_text().startswith("a photo of a blue bmw")
    assert "not available" in done["message"] and "Caption step skipped" in done["message"]
    assert done["step"] is None  # train fields stay empty for other kinds
    text = status.status_text(done)
    assert text.startswith("preprocess src: finished · 3/3 file(s)")
    assert prep.preprocess_status(done).startswith("Preprocess 'src': finished · 3/3 file(s)")


def test_preprocess_errors_and_busy(tmp_path):
    service = stub_service(tmp_path)
    src = make_images(tmp_path / "src", 1)
    assert call(service, api.preprocess, {})[0] == 422
    assert call(service, api.preprocess, {"source": str(src), "width": "512"})[0] == 422
    assert call(service, api.preprocess, {"source": str(src), "bogus": 1})[0] == 422
    code, body = call(service, api.preprocess, {"source": str(src), "destination": str(src / "out")})
    assert code == 400 and "inside the source" in body["error"]
    assert call(service, api.preprocess, {"source": str(tmp_path / "nope")})[0] == 400
    release = hold_a_job(service, "other")
    try:
        code, body = call(service, api.preprocess, {"source": str(src)})
        assert code == 409 and "'other' is training" in body["error"]
    finally:
        release.set()


def test_preprocess_interrupt_and_host_captioner(tmp_path):
    service = stub_service(tmp_path)
    src = make_images(tmp_path / "src", 6)
    gate, entered = threading.Event(), threading.Event()

    class Slow:
        name = "slow"

        def caption(self, img):
            entered.set()
            gate.wait(10)
            return "generated words"

    register_captioner("slow", Slow)
    code, body = call(service, api.preprocess, {"source": str(src), "captioners": "slow",
                                                "caption_action": "ignore"})
    assert code == 200
    code, busy = call(service, api.preprocess, {"source": str(src)})
    assert code == 409 and "'src' is running (preprocess)" in busy["error"]
    assert entered.wait(10)  # the first file is in flight
    stopped = call(service, api.interrupt, {})[1]
    assert stopped["id"] == body["job_id"] and "files in progress" in stopped["message"]
    gate.set()
    done = wait(service, body["job_id"])
    assert done["status"] == "interrupted" and done["result"]["processed"] < 6
    assert (tmp_path / "src-Processed" / "img 0.txt").read_text() == "generated words\n"


def test_unavailable_captioner_message(tmp_path):
    def missing():
        raise CaptionerUnavailable("BLIP weights are not available offline: put X in models/BLIP")

    register_captioner("blip", missing)
    service = stub_service(tmp_path)
    src = make_images(tmp_path / "src", 2)
    done = wait(service, service.start_preprocess(PreprocessParams(source=str(src), captioners="blip")).id)
    assert done["status"] == "finished" and "put X in models/BLIP" in done["message"]
    assert done["result"]["outputs"] == 2


def test_check_route_and_ui_report(tmp_path):
    service = stub_service(tmp_path)
    src = make_images(tmp_path / "src", 2)
    code, body = call(service, api.check, {"folder": str(src), "subject": "blue bmw"})
    assert code == 200 and body["usable"] == 2
    assert body["summary"].startswith("2 usable images")
    assert any(f["kind"] == "caption_subject" for f in body["findings"])
    assert call(service, api.check, {})[0] == 422
    assert call(service, api.check, {"folder": str(tmp_path / "nope")})[0] == 400
    report = prep.check_dataset(service, str(src), "blue bmw", 0)
    assert report.splitlines()[0] == body["summary"] and "bmw" in report
    assert prep.check_dataset(service, "", "", 0).startswith("Enter the dataset folder")
    assert "does not exist" in prep.check_dataset(service, str(tmp_path / "nope"), "", 0)


def test_caption_routes_and_undo(tmp_path):
    service = stub_service(tmp_path)
    service.thumbnail_dir = tmp_path / "thumbs"
    src = make_images(tmp_path / "src", 3, size=(900, 600))
    before = {p.name: p.read_bytes() for p in src.glob("*.txt")}
    code, page = call(service, api.captions, {"folder": str(src), "page": "1", "per_page": "2"})
    assert code == 200 and (page["total"], page["pages"], len(page["items"])) == (3, 2, 2)
    thumb = Image.open(page["items"][0]["thumbnail"])
    assert max(thumb.size) <= 256  # never the full-size image
    code, out = call(service, api.caption_edit, {"folder": str(src), "op": "strip_subject", "subject": "blue bmw"})
    assert code == 200 and out["changed"] == 3
    assert "bmw" not in (src / "img 0.txt").read_text() and "road, tag0, sunny" in (src / "img 0.txt").read_text()
    code, out = call(service, api.caption_edit, {"folder": str(src), "op": "replace", "find": r"tag(\d)",
                                                 "replace": r"t\1", "regex": True})
    assert code == 200 and "t1" in (src / "img 1.txt").read_text()
    code, tags = call(service, api.caption_tags, {"folder": str(src)})
    assert ["sunny", 3] in tags["tags"]
    assert call(service, api.caption_edit, {"folder": str(src), "op": "explode"})[0] == 400
    assert call(service, api.caption_edit, {"folder": str(src), "op": "replace", "find": "(",
                                            "regex": True})[0] == 400
    for _ in range(2):
        assert call(service, api.caption_edit, {"folder": str(src), "op": "undo"})[0] == 200
    assert {p.name: p.read_bytes() for p in src.glob("*.txt")} == before
    assert call(service, api.caption_edit, {"folder": str(src), "op": "undo"})[0] == 400  # nothing left


def test_caption_editor_handlers(tmp_path):
    service = stub_service(tmp_path)
    service.thumbnail_dir = tmp_path / "thumbs"
    src = make_images(tmp_path / "src", 3)
    view = prep.caption_page(service, str(src), 1, per_page=2)
    assert len(view.gallery) == 2 and view.info.startswith("Page 1 of 2 · 3 image(s)")
    assert all(str(tmp_path / "thumbs") in path for path, _ in view.gallery)
    assert view.gallery[0][1].startswith("img 0.png: a photo of a blue bmw")
    image, text = prep.caption_of(view.images, 1)
    assert image.endswith("img 1.png") and text.startswith("a photo")
    assert prep.caption_of(view.images, 9) == ("", "")
    assert prep.save_caption(service, str(src), image, "new words").startswith("edit img 1.png: 1 caption(s)")
    assert (src / "img 1.txt").read_text() == "new words\n"
    assert prep.save_caption(service, str(src), "", "x") == "Click an image first."
    assert "3 caption(s) changed" in prep.bulk(service, str(src), "prepend", text="style photo")
    # the caption box reloads from disk after a bulk edit, so a later Save cannot undo it
    assert prep.current_caption(image) == "style photo, new words" and prep.current_caption("") is None
    assert "Nothing to undo" not in prep.bulk(service, str(src), "undo")
    assert "Invalid regular expression" in prep.bulk(service, str(src), "replace", find="(", regex=True)
    assert prep.bulk(service, "", "undo") == "Enter the folder first."
    assert "sunny" in prep.tag_table(service, str(src))
    assert "does not exist" in prep.caption_page(service, str(tmp_path / "nope")).info
    assert prep.caption_page(service, "").gallery == []


def test_preprocess_form_handlers(tmp_path):
    service = stub_service(tmp_path)
    defaults = prep.preprocess_defaults(service, PREP_SPECS)
    by_name = dict(zip([s.name for s in PREP_SPECS], defaults))
    assert (by_name["width"], by_name["height"], by_name["flip"]) == (64, 64, False)
    src = make_images(tmp_path / "src", 2)
    values = values_of(PreprocessParams(source=str(src), width=64, height=64), PREP_SPECS)
    started = prep.start_preprocess(service, PREP_SPECS, values)
    assert started.ok and "Started preprocessing 'src'" in started.message
    wait(service, service.jobs.latest().id)
    bad = values_of(PreprocessParams(source=str(tmp_path / "nope")), PREP_SPECS)
    refused = prep.start_preprocess(service, PREP_SPECS, bad)
    assert not refused.ok and "does not exist" in refused.message

    class NoModel:
        def native_size(self):
            raise RuntimeError("no model")

    assert prep.preprocess_defaults(NoModel(), PREP_SPECS)[[s.name for s in PREP_SPECS].index("width")] == 512


def test_training_message_starts_with_the_check_summary(tmp_path):
    from textual_inversion_ext.core.create import CreateParams
    from textual_inversion_ext.core.training.train_params import TrainParams
    from textual_inversion_ext.ui import handlers

    service = stub_service(tmp_path)
    service.create(CreateParams(name="toy", init_text="blue bmw"))
    src = make_images(tmp_path / "src", 2)
    specs = control_specs(TrainParams, "tiext_train_")
    release = hold_a_job(service, "other")  # the check runs, then the start is refused: nothing trains here
    try:
        out = handlers.start_training(service, "toy", str(src), specs, values_of(TrainParams(), specs),
                                      subject="blue bmw")
        assert "'other' is training" in out.message
    finally:
        release.set()
    summary = prep.check_summary(service, str(src), "blue bmw")
    assert summary.startswith("2 usable images, ") and int(summary.split(", ")[1].split()[0]) >= 2
    assert prep.check_summary(service, str(tmp_path / "nope")) is None
