"""Atomic file writes (a crash or interrupt never leaves a half-written file under the final name), and
the check that a path named by a caller lies under a folder it may use."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import TIError, WriteError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it over `path` on success.

    The temp file lives next to the target so the final `os.replace` stays on one filesystem
    (and is therefore atomic). On error the temp file is removed and the target is untouched.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from exc
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (or the replaced file's).
        os.fchmod(fd, _mode_for(target))
    finally:
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(target, exc) from exc
        raise


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; restored at once
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import, before any worker threads write files


def write_error(target: Path, exc: Exception) -> WriteError:
    """`exc` (raised while writing `target`: an OSError, or a writer's own error) as a WriteError whose message
    says what to check."""
    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or f"{exc}".strip() or type(exc).__name__
    hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota)",
            errno.EISDIR: f"a folder named {target.name} is in the way", errno.EROFS: "the disk is read-only",
            errno.EACCES: "the folder is not writable", errno.EPERM: "the folder is not writable",
            errno.ENAMETOOLONG: "use a shorter name", errno.EEXIST: "a file is in the way of its folder",
            errno.ENOTDIR: "a file is in the way of its folder"}.get(code or 0, "check the folder and the disk space")
    error = WriteError(f"Could not write {target}: {reason} ({hint}).")
    error.errno, error.filename = code, str(target)
    return error


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def resolve_under(path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]) -> Path | None:
    """`path` with `~`, `..` and symlinks resolved, if it lies in one of `roots` (resolved too); else None.

    Resolving first is the point: `root/../etc` and a symlink inside a root that points outside it
    both end up outside. A path that does not exist yet resolves through its existing parents."""
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    return None


def check_inside(path: str | os.PathLike[str], root: str | os.PathLike[str], what: str = "file") -> Path:
    """`path` resolved, refused unless it is an existing file under `root` (callers name our files by path)."""
    resolved = resolve_under(path, [root])
    if resolved is None:
        raise TIError(f"{path} is not a {what} of this tool (it must lie under {root}).")
    if not resolved.is_file():
        raise TIError(f"The {what} {path} does not exist.")
    return resolved
