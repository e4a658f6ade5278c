"""Who may use the REST routes, and on which folders: pure checks; the host supplies the roots and flags.

Folder arguments are resolved (`~`, `..`, symlinks) and must then lie under an allowed root; write
routes are refused outright when the server is reachable beyond this computer with no API password.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.fileio import resolve_under

LOOPBACK_NAMES = ("localhost",)


class AccessDenied(Exception):
    """A request the server refuses to serve (HTTP 403); the message says what to change."""


@dataclass(frozen=True)
class ApiAccess:
    # The folders the routes may read and write; called per request, since the settings may change.
    roots: Callable[[], Sequence[str | os.PathLike[str]]]
    # Where a user adds a folder (named in the refusal), e.g. "Settings → … → Extra folders …".
    setting: str = "the extension's settings"
    # Set: every write route is refused with this message (see `exposure_refusal`).
    write_refusal: str | None = None

    def check_write(self) -> None:
        if self.write_refusal:
            raise AccessDenied(self.write_refusal)

    def check_path(self, key: str, value: str) -> str:
        """`value` resolved, if it lies under a root; else AccessDenied naming the roots and the setting."""
        roots = list(self.roots())
        try:
            resolved = resolve_under(value, roots)
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop (RuntimeError on 3.11)
            raise AccessDenied(f"{key} {value!r} cannot be resolved to a folder on the server ({exc}).") from exc
        if resolved is None:
            shown = ", ".join(str(Path(r).expanduser().resolve()) for r in roots) or "none"
            raise AccessDenied(f"{key} {value!r} is outside the folders this API may use ({shown}). Add the "
                               f"folder (or one above it) to {self.setting}, or move the files under one of "
                               "those folders.")
        return str(resolved)


def _loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure(listen: bool = False, share: bool = False, server_name: str | None = None,
             ngrok: str | None = None) -> list[str]:
    """The launch flags that make the server reachable beyond this computer (empty: loopback only).

    As the host binds: `--server-name` wins over `--listen` (0.0.0.0); neither means 127.0.0.1."""
    flags = []
    if server_name:
        if not _loopback(server_name):
            flags.append(f"--server-name {server_name}")
    elif listen:
        flags.append("--listen")
    if share:
        flags.append("--share")
    if ngrok:
        flags.append("--ngrok")
    return flags


def exposure_refusal(cmd_opts: Any) -> str | None:
    """The write routes' refusal for this launch, or None (loopback only, or an API password is set)."""
    if getattr(cmd_opts, "api_auth", None):
        return None
    flags = exposure(bool(getattr(cmd_opts, "listen", False)), bool(getattr(cmd_opts, "share", False)),
                     getattr(cmd_opts, "server_name", None), getattr(cmd_opts, "ngrok", None))
    if not flags:
        return None
    return (f"This server is reachable beyond this computer ({', '.join(flags)}) and its API has no password, "
            "so the Textual Inversion API refuses requests that write files or start jobs. Restart the web UI "
            "with --api-auth user:password (or without those flags) to use them; reading still works.")
