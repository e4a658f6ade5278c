"""REST API under /textual-inversion-ext/v1/: plain handlers over `Service`, and their FastAPI routes.

Each handler is `(service, body) -> dict` and raises `ApiError` (status + message), so the handlers
are tested without FastAPI; `dispatch` turns every failure into JSON `{"error": message}`: a 4xx for
what the caller can fix, a 500 (the trace in the server log, never in the reply) for a bug.
With an `ApiAccess` (the A1111 glue passes one), folder arguments must lie under its roots and write
routes can be refused (403); `register_routes` (FastAPI imported lazily) serves them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .api_access import AccessDenied, ApiAccess
from .core.create import CreateParams
from .core.data.preprocess import PreprocessParams, default_destination
from .core.errors import TIError
from .core.params import ParameterError, fields_of, from_record, json_schema
from .core.training.train_params import TrainParams
from .jobs import BusyError
from .service import Service

logger = logging.getLogger(__name__)

PREFIX = "/textual-inversion-ext/v1"

Handler = Callable[[Service, dict[str, Any]], dict[str, Any]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _typed(cls: type, record: dict[str, Any]) -> dict[str, Any]:
    """Check JSON types before the dataclass sees them (a string max_steps must be a 422, not a crash)."""
    types = {info.name: info.type for info in fields_of(cls)}
    for key, value in record.items():
        want = types.get(key)
        if want is None:
            continue  # from_record names unknown keys
        ok = (isinstance(value, bool) if want is bool
              else isinstance(value, int) and not isinstance(value, bool) if want is int
              else isinstance(value, int | float) and not isinstance(value, bool) if want is float
              else isinstance(value, want))
        if not ok:
            raise ApiError(422, f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}.")
    return record


def _params(cls: type, record: dict[str, Any], build: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    record = _typed(cls, record)
    try:
        return build(record) if build else from_record(cls, record)
    except (ParameterError, ValueError, TypeError) as exc:
        raise ApiError(422, str(exc)) from exc


def _name(body: dict[str, Any], key: str = "name") -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, f"{key!r} is required (a string).")
    return value


# ------------------------------------------------------------------ handlers


def version(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    return {"name": "textual_inversion_ext", "version": __version__, "api": "v1"}


def create(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    params = _params(CreateParams, dict(body))
    service.prepare_model(False)  # Forge loads the selected checkpoint lazily: the file type depends on it
    target = service.embeddings_dir / f"{params.name}{service.backend().info.embedding_suffix}"
    if target.exists() and not params.overwrite:
        raise ApiError(409, f"{target.name} already exists; choose another name or set overwrite.")
    created = service.create(params)
    emb = created.embedding
    return {"name": emb.name, "file": str(created.path), "vectors": emb.num_vectors, "dims": emb.dims,
            "message": created.message}


def create_hints(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """POST the /create body ("name", "init_text"?, "num_vectors"?, "init_mode"?) and "template"?: the live
    hints, each {"level": "info"|"warn", "text"}, under "name", "init_text" and "prompt_budget"; "model": the
    loaded model's {"family", "name", "encoders", "suffix"} the hints were made for (null, with "model_error",
    when none can be used: the hints then count for one encoder and a .pt file)."""
    record = dict(body)
    template = record.pop("template", None)
    if template is not None and not isinstance(template, str):
        raise ApiError(422, f"template: expected str, got {type(template).__name__} {template!r}.")
    params = _params(CreateParams, record)  # types, bounds and choices as for /create
    return service.create_hints(params.name, params.init_text, params.num_vectors, template or None,
                                params.init_mode)


def train(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    record = dict(body)
    name = _name(record)
    record.pop("name")
    data_dir = record.pop("data_dir", None)
    if not isinstance(data_dir, str) or not data_dir.strip():
        raise ApiError(422, "'data_dir' is required (the dataset folder on the server).")
    resume_from = record.pop("resume_from", None)
    if resume_from is not None and not isinstance(resume_from, str):
        raise ApiError(422, "resume_from must be a snapshot path (see /snapshots).")
    params = _params(TrainParams, record, service.train_params)
    try:
        service.embedding_path(name)
    except TIError as exc:
        raise ApiError(404, str(exc)) from exc
    job = service.start_training(name, data_dir, params, resume_from=resume_from or None)
    return {"job_id": job.id, "job": job.to_dict()}


def snapshots(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """GET ?name=…: every snapshot of the embedding (newest run first) with step, validation loss, best mark."""
    return {"snapshots": service.snapshots(_name(body))}


def promote(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """POST {"name", "snapshot"}: the snapshot replaces the embedding file (usable in prompts at once)."""
    name, snapshot = _name(body), _name(body, "snapshot")
    try:
        service.embedding_path(name)
    except TIError as exc:
        raise ApiError(404, str(exc)) from exc
    return service.promote(name, snapshot)


def grid(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """POST {"name", "log_dir"?, "prompts"?}: render a run's comparison grid as a job (default: newest run)."""
    prompts, log_dir = body.get("prompts") or "", body.get("log_dir") or None
    if not isinstance(prompts, str) or (log_dir is not None and not isinstance(log_dir, str)):
        raise ApiError(422, "prompts (one per line) and log_dir must be strings.")
    job = service.start_grid(_name(body), log_dir, prompts)
    return {"job_id": job.id, "job": job.to_dict()}


def presets(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    return {"presets": service.presets()}


def preset_load(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """GET ?preset=…: the preset's Train fields ("params") and extra fields ("extra")."""
    return service.load_preset(_name(body, "preset"))


def preset_save(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """POST {"preset", "extra"?, …Train fields}: fields left out take the defaults."""
    record = dict(body)
    preset = _name(record, "preset")
    record.pop("preset")
    extra = record.pop("extra", None) or {}
    if not isinstance(extra, dict):
        raise ApiError(422, "extra must be an object.")
    return service.save_preset(preset, _params(TrainParams, record, service.train_params), extra)


def preprocess(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """Start preprocessing (PreprocessParams fields; width/height default to the model's native size)."""
    record = dict(body)
    if not isinstance(record.get("source"), str) or not record["source"].strip():
        raise ApiError(422, "'source' is required (the folder of images on the server).")
    params = _params(PreprocessParams, record, service.preprocess_params)
    job = service.start_preprocess(params)
    return {"job_id": job.id, "job": job.to_dict()}


def _int(body: dict[str, Any], key: str, default: int) -> int:
    raw = body.get(key, default)
    if isinstance(raw, bool):
        raise ApiError(422, f"{key} must be an integer, got {raw!r}.")
    try:
        return int(raw if raw not in (None, "") else default)
    except (TypeError, ValueError) as exc:
        raise ApiError(422, f"{key} must be an integer, got {raw!r}.") from exc


def check(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """The dataset check: {"folder", "subject"?, "width"?, "height"?} (0/absent = the model's native size)."""
    folder = _name(body, "folder")
    subject = body.get("subject") or ""
    if not isinstance(subject, str):
        raise ApiError(422, "subject must be a string.")
    return service.check_dataset(folder, subject, _int(body, "width", 0), _int(body, "height", 0),
                                 bool(body.get("recursive")))


def captions(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """GET ?folder=…&page=1&per_page=24: one page of images, captions and thumbnail paths."""
    return service.caption_page(_name(body, "folder"), _int(body, "page", 1), _int(body, "per_page", 24))


def caption_edit(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """POST {"folder", "op": set|replace|strip_subject|prepend|append|undo, …op's fields} (undoable)."""
    args = dict(body)
    folder, op = _name(args, "folder"), _name(args, "op")
    args.pop("folder"), args.pop("op")
    return service.caption_edit(folder, op, **args)


def caption_tags(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    tags = service.caption_tags(_name(body, "folder"))
    return {"tags": [[tag, n] for tag, n in tags]}


def _since(body: dict[str, Any]) -> int:
    raw = body.get("since_step", 0)
    try:
        return int(raw or 0)
    except (TypeError, ValueError) as exc:
        raise ApiError(422, f"since_step must be an integer, got {raw!r}.") from exc


def job(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    try:
        return service.job_status(_name(body, "id"), since_step=_since(body))
    except TIError as exc:
        raise ApiError(404, str(exc)) from exc


def current_job(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    return service.job_status(None, since_step=_since(body))


def interrupt(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    job_id = body.get("id")
    try:
        return service.interrupt(job_id if isinstance(job_id, str) and job_id else None)
    except TIError as exc:
        raise ApiError(404, str(exc)) from exc


def embeddings(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    found, skipped = service.scan_embeddings()  # skipped: [{"file", "error"}] for files that could not be read
    return {"embeddings_dir": str(service.embeddings_dir), "embeddings": found, "skipped": skipped}


def schema(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    train_schema = json_schema(TrainParams)
    train_schema["properties"] = {
        "name": {"type": "string", "title": "Embedding", "description": "Name of an existing embedding."},
        "data_dir": {"type": "string", "title": "Dataset folder", "description": "Folder of images on the server."},
        **train_schema["properties"],
    }
    train_schema["required"] = ["name", "data_dir"]
    for key, value in service.train_defaults().items():  # the host's settings are the effective defaults
        train_schema["properties"][key]["default"] = value
    create_schema = json_schema(CreateParams)
    create_schema["required"] = ["name"]
    preprocess_schema = json_schema(PreprocessParams)
    preprocess_schema["required"] = ["source"]
    size = service.native_size()
    if size:
        for key in ("width", "height"):
            preprocess_schema["properties"][key]["default"] = size
    return {"create": create_schema, "train": train_schema, "preprocess": preprocess_schema}


# ------------------------------------------------------------------ dispatch

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/version", version),
    ("GET", "/schema", schema),
    ("GET", "/embeddings", embeddings),
    ("POST", "/create", create),
    ("POST", "/create/hints", create_hints),
    ("POST", "/train", train),
    ("POST", "/preprocess", preprocess),
    ("POST", "/check", check),
    ("GET", "/captions", captions),
    ("POST", "/captions/edit", caption_edit),
    ("GET", "/captions/tags", caption_tags),
    ("GET", "/snapshots", snapshots),
    ("POST", "/promote", promote),
    ("POST", "/grid", grid),
    ("GET", "/presets", presets),
    ("GET", "/presets/load", preset_load),
    ("POST", "/presets/save", preset_save),
    ("GET", "/jobs/current", current_job),  # before /jobs/{id}
    ("GET", "/jobs/{id}", job),
    ("POST", "/interrupt", interrupt),
)

# Routes that write files or start/stop jobs: refused when the server is exposed without a password.
WRITES = frozenset({create, train, preprocess, caption_edit, promote, grid, preset_save, interrupt})
# Body fields that name a file or folder on the server: resolved under the allowed roots first.
PATHS: dict[Handler, tuple[str, ...]] = {
    train: ("data_dir", "resume_from", "template"), preprocess: ("source", "destination"),
    check: ("folder",), captions: ("folder",), caption_edit: ("folder",), caption_tags: ("folder",),
    promote: ("snapshot",), grid: ("log_dir",), create_hints: ("template",),
}


def _names_a_file(key: str, value: str) -> bool:
    """A template is a name among the built-ins unless it has a folder part; other fields are always paths."""
    return key != "template" or Path(value).is_absolute() or len(Path(value).parts) > 1


def guard(access: ApiAccess, handler: Handler, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with every path field resolved under the allowed roots, or AccessDenied (a 403)."""
    if handler in WRITES:
        access.check_write()
    body = dict(body)
    for key in PATHS.get(handler, ()):
        value = body.get(key)
        if isinstance(value, str) and value.strip() and _names_a_file(key, value):
            body[key] = access.check_path(key, value)
    if handler is preprocess and isinstance(body.get("source"), str) and not body.get("destination"):
        # The default destination (`<source>-Processed`) is a sibling of the source: check it too.
        body["destination"] = access.check_path("destination", str(default_destination(body["source"])))
    return body


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null (strict JSON encoders refuse NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def dispatch(handler: Handler, service: Service, body: Any,
             access: ApiAccess | None = None) -> tuple[int, dict[str, Any]]:
    """Run a handler (after `guard` when `access` is given); every failure becomes (status, {"error": message})
    — 4xx for the caller's mistakes, 500 for unexpected ones, whose trace goes to the log only."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        return 422, {"error": "The request body must be a JSON object."}
    try:
        if access is not None:
            body = guard(access, handler, body)
        return 200, _json_safe(handler(service, body))
    except AccessDenied as exc:
        return 403, {"error": str(exc)}
    except ApiError as exc:
        return exc.status, {"error": exc.message}
    except BusyError as exc:
        return 409, {"error": str(exc)}
    except ParameterError as exc:
        return 422, {"error": str(exc)}
    except TIError as exc:
        return 400, {"error": str(exc)}
    except Exception as exc:
        logger.exception("API %s failed", getattr(handler, "__name__", handler))
        return 500, {"error": f"{type(exc).__name__}: {exc}"}


def register_routes(app: Any, service: Service, dependencies: Sequence[Any] = (), *,
                    access: ApiAccess | None = None) -> None:
    """Add the routes to a FastAPI app (the host's); `dependencies`, e.g. HTTP basic auth, apply to all;
    `access`: the folder roots and write refusal every request is checked against (see `guard`)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def endpoint(method: str, handler: Handler) -> Callable[..., Any]:
        async def serve(request):  # annotated below: FastAPI resolves names against module globals
            body: dict[str, Any] = {**request.query_params, **request.path_params}
            if method == "POST":
                raw = await request.body()
                if raw.strip():
                    try:
                        data = json.loads(raw)
                    except ValueError as exc:
                        return JSONResponse({"error": f"The body is not valid JSON: {exc}"}, status_code=422)
                    if not isinstance(data, dict):
                        return JSONResponse({"error": "The request body must be a JSON object."}, status_code=422)
                    body.update(data)
            # The handlers block on disk and (create) the model: run them off the event loop.
            from starlette.concurrency import run_in_threadpool

            status, content = await run_in_threadpool(dispatch, handler, service, body, access)
            return JSONResponse(content, status_code=status)

        serve.__annotations__ = {"request": Request, "return": JSONResponse}
        serve.__name__ = f"tiext_{handler.__name__}"
        return serve

    for method, path, handler in ROUTES:
        app.add_api_route(PREFIX + path, endpoint(method, handler), methods=[method],
                          dependencies=list(dependencies), include_in_schema=True)
    logger.info("Textual Inversion API: %d routes under %s", len(ROUTES), PREFIX)

