from __future__ import annotations

import threading
import time

import pytest
from _waiting import wait_for_job

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.create import CreateParams
from textual_inversion_ext.core.errors import TIError
from textual_inversion_ext.core.training.train_params import TrainParams
from textual_inversion_ext.jobs import BusyError, HostHooks, JobManager
from textual_inversion_ext.service import Service


def test_create_list_train_and_status(service, demo_data):
    service.create(CreateParams(name="toy", init_text="red robot"))
    assert [e["name"] for e in service.list_embeddings()] == ["toy"]
    job = service.start_training("toy", demo_data, TrainParams(max_steps=6, save_every=0, preview_every=0))
    status = wait_for_job(service, job.id)
    assert status["status"] == "finished" and status["step"] == 6
    assert [s for s, _ in status["losses"]] == [1, 2, 3, 4, 5, 6]
    assert service.job_status(job.id, since_step=4)["losses"][0][0] == 5
    assert formats.load_embedding(service.embedding_path("toy")).embedding.step == 6
    assert service.list_embeddings()[0]["step"] == 6


def test_previews_are_published_while_training(service, demo_data):
    service.create(CreateParams(name="toy", init_text="red robot"))
    job = service.start_training("toy", demo_data, TrainParams(max_steps=100000, save_every=0, preview_every=2,
                                                               preview_steps=2))
    deadline = time.time() + 300
    while not service.job_status(job.id)["previews"] and time.time() < deadline:
        time.sleep(0.02)
    running = service.job_status(job.id)
    assert running["active"] and running["previews"][0].endswith("toy-2.png")
    assert running["message"] == "Training…"  # not the stale "Encoding N images" set-up line
    service.interrupt(job.id)
    assert wait_for_job(service, job.id)["status"] == "interrupted"


def test_second_job_is_refused_and_interrupt_saves(service, demo_data):
    service.create(CreateParams(name="toy", init_text="red robot"))
    job = service.start_training("toy", demo_data, TrainParams(max_steps=100000, save_every=0, preview_every=0))
    while service.job_status(job.id)["step"] in (None, 0):
        time.sleep(0.02)
    with pytest.raises(BusyError, match="toy"):
        service.start_training("toy", demo_data, TrainParams(max_steps=10))
    with pytest.raises(TIError, match="being trained"):
        service.create(CreateParams(name="toy", init_text="car", overwrite=True))
    service.interrupt()
    status = wait_for_job(service, job.id)
    assert status["status"] == "interrupted"
    saved = formats.load_embedding(service.embedding_path("toy")).embedding
    assert saved.step == status["step"] > 0


def test_host_hooks_lock_progress_and_host_interrupt(tiny_backend, tmp_path, demo_data):
    events: list[str] = []
    lock = threading.Lock()
    host_stop = threading.Event()

    class Locked:
        def __enter__(self):
            lock.acquire()
            events.append("lock")

        def __exit__(self, *exc):
            lock.release()
            events.append("unlock")

    def update(step, total, text):
        if step >= 3:
            host_stop.set()  # as if the user pressed the host's Interrupt button

    hooks = HostHooks(lock=Locked, begin=lambda job_id, total: events.append("begin"), update=update,
                      host_interrupted=host_stop.is_set, end=lambda: events.append("end"))
    service = Service(lambda: tiny_backend, tmp_path / "e", tmp_path / "l", jobs=JobManager(hooks))
    service.create(CreateParams(name="toy", init_text="red robot"))
    job = service.start_training("toy", demo_data, TrainParams(max_steps=100000, save_every=0, preview_every=0))
    status = wait_for_job(service, job.id)
    assert status["status"] == "interrupted"
    assert events == ["lock", "begin", "end", "unlock"]


def test_errors_become_job_status(service, demo_data, tmp_path):
    service.create(CreateParams(name="toy", init_text="red robot"))
    with pytest.raises(TIError, match="does not exist"):
        service.start_training("toy", tmp_path / "nowhere", TrainParams(max_steps=3))
    job = service.start_training("toy", demo_data, TrainParams(max_steps=3, learn_rate="0.1:fifty"))
    status = wait_for_job(service, job.id)
    assert status["status"] == "error" and "fifty" in status["message"]
    with pytest.raises(TIError, match="No embedding"):
        service.embedding_path("missing")
