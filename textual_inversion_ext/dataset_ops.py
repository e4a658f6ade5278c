"""Dataset preparation for the UI and the API: preprocess jobs' result records, the dataset check and
the caption editor, as plain dicts (JSON-ready) over the core functions.

`Service` exposes these; keeping them here keeps `service.py` about embeddings and jobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .core.data import captions
from .core.data.dataset_check import CheckParams, CheckReport, check_dataset
from .core.data.preprocess import PreprocessResult
from .core.errors import TIError

logger = logging.getLogger(__name__)

MAX_LISTED = 200  # findings / problem lines sent to a client; the counts always cover everything
CAPTION_OPS = ("set", "replace", "strip_subject", "prepend", "append", "undo")


def preprocess_record(result: PreprocessResult) -> dict[str, Any]:
    """A finished (or interrupted) preprocess run as the job's result."""
    message = "\n".join([result.summary(), *result.messages])
    return {"status": result.status, "message": message, "summary": result.summary(),
            "messages": list(result.messages), "source": str(result.source),
            "destination": str(result.destination), "total": result.total, "processed": result.processed,
            "outputs": result.outputs, "problems": [f.line() for f in result.problems][:MAX_LISTED]}


def check_record(report: CheckReport) -> dict[str, Any]:
    findings = [{"path": str(f.path), "kind": f.kind, "severity": f.severity, "message": f.message}
                for f in report.findings[:MAX_LISTED]]
    return {"folder": str(report.folder), "summary": report.summary(), "usable": report.usable,
            "files": report.files, "warnings": report.warnings, "errors": report.errors,
            "findings": findings, "more_findings": max(0, len(report.findings) - MAX_LISTED),
            "elapsed_s": report.elapsed_s}


def check(folder: str | Path, subject: str = "", width: int = 512, height: int = 512,
          recursive: bool = False) -> dict[str, Any]:
    if not str(folder).strip():
        raise TIError("Enter the dataset folder to check.")
    params = CheckParams(width=int(width), height=int(height), subject=subject or "", recursive=recursive)
    return check_record(check_dataset(Path(str(folder).strip()), params))


def report_text(record: dict[str, Any]) -> str:
    """The check as text: the summary line, then one line per finding."""
    lines = [record["summary"]]
    for f in record["findings"]:
        lines.append(f"{f['severity']}: {Path(f['path']).name}: {f['message']}")
    if record.get("more_findings"):
        lines.append(f"… and {record['more_findings']} more.")
    return "\n".join(lines)


def caption_page(folder: str | Path, page: int = 1, per_page: int = 24,
                 thumbnail_dir: Path | None = None) -> dict[str, Any]:
    """One page of images with captions and thumbnail paths (thumbnails only: never full-size images)."""
    listing = captions.list_captions(folder, page, per_page, thumbnails=True, cache_dir=thumbnail_dir)
    items = [{"image": str(e.image), "name": e.image.name, "caption": e.caption, "has_caption": e.exists,
              "thumbnail": str(e.thumbnail) if e.thumbnail else None, "error": e.error} for e in listing.items]
    return {"folder": str(listing.folder), "page": listing.page, "pages": listing.pages, "total": listing.total,
            "per_page": listing.per_page, "items": items}


def caption_edit(folder: str | Path, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """One caption editor operation; every change is backed up first, so `undo` reverts it."""
    folder = str(folder).strip()
    if op == "set":
        image = Path(str(args.get("image") or ""))
        if not image.is_absolute():
            image = Path(folder) / image
        result = captions.set_caption(image, str(args.get("text") or ""), root=folder)
    elif op == "replace":
        result = captions.find_replace(folder, str(args.get("find") or ""), str(args.get("replace") or ""),
                                       regex=bool(args.get("regex")), ignore_case=bool(args.get("ignore_case")))
    elif op == "strip_subject":
        extra = [p.strip() for p in str(args.get("extra") or "").split(",") if p.strip()]
        result = captions.strip_subject(folder, str(args.get("subject") or ""), extra_phrases=extra)
    elif op in ("prepend", "append"):
        result = captions.add_text(folder, str(args.get("text") or ""), where=op,
                                   include_missing=bool(args.get("include_missing")))
    elif op == "undo":
        undone = captions.undo(folder)
        return {"message": undone.message, "changed": len(undone.restored) + len(undone.removed)}
    else:
        raise captions.CaptionError(f"Unknown caption operation {op!r}; one of {', '.join(CAPTION_OPS)}.")
    return {"message": result.message, "changed": len(result.changed)}


def tag_frequency(folder: str | Path, limit: int = 200) -> list[tuple[str, int]]:
    return captions.tag_frequency(folder)[:limit]
