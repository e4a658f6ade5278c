"""Wires the extension into the A1111 host: one `Service` on the loaded model, settings, tabs, routes.

`register()` is all the thin entry script calls; it only registers callbacks (no work at import or
registration time: the model, the folders and the UI are looked at when the host calls back).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from ... import __version__
from ...api_access import ApiAccess, exposure_refusal
from ...core.training.train_params import TrainParams
from ...service import Service
from . import settings
from .hooks import host_hooks

logger = logging.getLogger(__name__)

TAB_TITLE, TAB_ID = "Textual Inversion", "textual_inversion_ext"

_service: Service | None = None
_backend: Any = None  # (sd_model, A1111Backend): rebuilt when the host switches models


def current_backend() -> Any:
    """The backend on the host's current model (the same object while the model stays)."""
    global _backend
    from modules import shared

    model = shared.sd_model
    if _backend is None or _backend[0] is not model:
        if is_forge():  # Forge: the same host API around its own `backend` package
            from ..forge.backend import ForgeBackend as backend_class
        else:
            from .backend import A1111Backend as backend_class
        _backend = (model, backend_class(model))
    return _backend[1]


def is_forge() -> bool:
    """Running inside Forge (lllyasviel/stable-diffusion-webui-forge), which keeps A1111's extension API."""
    import importlib.util

    return importlib.util.find_spec("modules_forge") is not None


def load_selected_model(locked: bool) -> None:
    """Forge loads the selected checkpoint only when something generates; creating and training need it too.
    `locked`: the caller holds the host's queue lock (a job); otherwise the load happens only if the lock is
    free (a generation that holds it loads the model itself)."""
    if not is_forge():
        return
    from modules import call_queue, sd_models

    if locked:
        sd_models.forge_model_reload()  # a no-op when the selected checkpoint is the loaded one
    elif call_queue.queue_lock.acquire(blocking=False):
        try:
            sd_models.forge_model_reload()
        finally:
            call_queue.queue_lock.release()


def reload_embeddings() -> None:
    """After files changed: the host's embedding database(s) reload, and its cond caches forget old vectors."""
    from modules import processing, sd_hijack

    db = getattr(sd_hijack.model_hijack, "embedding_db", None)
    if db is not None:
        db.load_textual_inversion_embeddings(force_reload=True)
    else:  # Forge: one database per text encoder, in the loaded model's engines
        from ..forge.embeddings import reload_engine_embeddings

        reload_engine_embeddings()
    cls = processing.StableDiffusionProcessing
    cls.cached_c = [None] * len(cls.cached_c)
    cls.cached_uc = [None] * len(cls.cached_uc)


def build_service() -> Service:
    from modules import shared

    from ...jobs import JobManager
    from .captioning import host_upscaler, register_host_captioners

    register_host_captioners()  # factories only: weights load when a preprocess run asks for them
    embeddings_dir = Path(shared.cmd_opts.embeddings_dir)
    service = Service(backend=current_backend, embeddings_dir=embeddings_dir,
                      log_root=settings.log_root(embeddings_dir), jobs=JobManager(host_hooks()),
                      on_embeddings_changed=reload_embeddings, train_defaults=settings.train_defaults,
                      upscaler=host_upscaler)

    def before_training(params: TrainParams) -> TrainParams:
        service.log_root = settings.log_root(embeddings_dir)  # the setting may have changed since start-up
        return params  # precision: core's resolve_precision, from A1111Backend.weight_dtype

    service.before_training = before_training
    service.prepare_model = load_selected_model
    return service


def get_service() -> Service:
    global _service
    if _service is None:
        _service = build_service()
    return _service


def api_dependencies() -> list[Any]:
    """HTTP basic auth for our routes when the host runs with --api-auth (its routes get it; ours don't)."""
    from modules import shared

    auth = getattr(shared.cmd_opts, "api_auth", None)
    if not auth:
        return []
    from fastapi import Depends

    return [Depends(basic_auth(auth))]


def parse_credentials(spec: str) -> dict[str, str]:
    """`user:pass,user2:pass2` as the host reads --api-auth (a password may contain ':')."""
    out = {}
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if sep:
            out[user] = password
    return out


def basic_auth(spec: str) -> Any:
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    credentials = parse_credentials(spec)

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 (FastAPI idiom)
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    # FastAPI resolves string annotations (PEP 563) against module globals, where fastapi is not imported.
    check.__annotations__ = {"given": HTTPBasicCredentials, "return": bool}
    return check


# ------------------------------------------------------------------ callbacks


def on_ui_settings() -> None:
    settings.register_options()


def api_enabled(cmd_opts: Any) -> bool:
    """As the host serves /sdapi: with --api, or --nowebui (the API alone)."""
    return bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))


def api_access() -> ApiAccess:
    """The folders our routes may use: the host's data folder, its embeddings folder, our log folder and the
    user's allow-list setting (read per request); write routes refused when exposed with no API password."""
    from modules import paths, shared

    embeddings_dir = Path(shared.cmd_opts.embeddings_dir)

    def roots() -> list[Path]:
        data = Path(paths.data_path)
        return [data, embeddings_dir, settings.log_root(embeddings_dir), *settings.api_roots(data)]

    return ApiAccess(roots=roots, setting=settings.API_ROOTS_WHERE,
                     write_refusal=exposure_refusal(shared.cmd_opts))


def on_app_started(_demo: Any, app: Any) -> None:
    from modules import shared

    from ... import api

    if not api_enabled(shared.cmd_opts):
        logger.info("Textual Inversion API off: the web UI runs without --api (add it to serve %s)", api.PREFIX)
        return
    access = api_access()
    if access.write_refusal:
        logger.warning("Textual Inversion API: write routes refused. %s", access.write_refusal)
    api.register_routes(app, get_service(), dependencies=api_dependencies(), access=access)


def on_ui_tabs() -> list[Any]:
    try:  # helper module written alongside; import_module honours sys.modules (tests stub it)
        ui = importlib.import_module("textual_inversion_ext.ui")
    except ImportError as exc:
        logger.info("Textual Inversion extension: no UI tabs (%s); the API is available", exc)
        return []
    build = getattr(ui, "build_tabs", None)
    if build is None:
        logger.info("Textual Inversion extension: ui.build_tabs is missing; no tabs")
        return []
    tabs = build(get_service())
    if tabs is None:
        return []
    if isinstance(tabs, list | tuple):  # already [(blocks, title, elem_id), ...]
        return list(tabs)
    return [(tabs, TAB_TITLE, TAB_ID)]  # one gr.Blocks


def _show_our_logs() -> None:
    """The host configures logging only with --loglevel; without it, our INFO lines would vanish."""
    package = logging.getLogger("textual_inversion_ext")
    if logging.root.handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[textual_inversion_ext] %(levelname)s %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def register() -> None:
    """Called by scripts/textual_inversion_ext_entry.py when the host loads the extension."""
    from modules import script_callbacks

    _show_our_logs()
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    logger.info("Textual Inversion extension %s loaded (API under /textual-inversion-ext/v1/ with --api)",
                __version__)
