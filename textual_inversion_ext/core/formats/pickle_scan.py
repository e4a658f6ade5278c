"""Naming what a refused pickle tried to import, by reading its opcodes (nothing in the file is run).

torch's restricted unpickler stops at the first thing it does not allow, and its message does not always
say what that was: it reports "Unsupported operand 149" for a protocol-4 FRAME before it ever reaches the
`STACK_GLOBAL` that would import `posix.system`. `pickletools.genops` only decodes opcodes, so walking
them is safe on any input.
"""

from __future__ import annotations

import io
import logging
import pickletools
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

_MAX_SCAN_BYTES = 64 * 1024 * 1024  # an embedding's pickle is a few KB; never read a huge file whole
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}
# What torch.load(weights_only=True) lets through besides its own list (see safe_torch._legacy_classes_allowed).
_ALSO_ALLOWED = {"torch.nn.modules.container.ParameterDict"}


def _text(arg: object) -> str | None:
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bytes):
        return arg.decode("latin-1")
    return None


def _scan_one(stream: io.BytesIO, found: list[str]) -> bool:
    """Add the globals of the pickle at the stream's position to `found`; True when it ended at STOP."""
    recent: list[str | None] = []  # what the last opcodes pushed (only strings matter)
    memo: dict[int, str | None] = {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in {"GLOBAL", "INST"}:  # arg is "module name"
            found.append(str(arg).replace(" ", ".", 1))
        elif name == "STACK_GLOBAL":  # module and name are the two strings pushed just before
            module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            found.append(f"{module}.{attr}" if module and attr else "an unnamed global (built on the stack)")
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in {"PUT", "BINPUT", "LONG_BINPUT"}:
            memo[int(arg)] = recent[-1] if recent else None  # type: ignore[call-overload]
        if name in _STRING_OPS:
            recent.append(_text(arg))
        elif name in {"GET", "BINGET", "LONG_BINGET"}:
            recent.append(memo.get(int(arg)))  # type: ignore[call-overload]
        elif name not in _NO_PUSH_OPS:
            recent.append(None)
        del recent[:-4]
        if name == "STOP":
            return True
    return False


def _pickles(path: Path) -> list[bytes]:
    """The pickle streams of a torch file: `*.pkl` members of a zip, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            out = []
            for info in archive.infolist():
                if info.filename.endswith(".pkl"):
                    with archive.open(info) as member:
                        out.append(member.read(_MAX_SCAN_BYTES))
            return out
    with path.open("rb") as fh:
        return [fh.read(_MAX_SCAN_BYTES)]


def referenced_globals(path: Path) -> list[str]:
    """Every `module.name` the pickles in `path` would import, in order, without duplicates.

    Legacy torch files hold several pickles in a row (then raw tensor bytes): each is scanned until
    one does not decode. Returns what was found before any damage; never raises for bad content.
    """
    found: list[str] = []
    try:
        for raw in _pickles(path):
            stream = io.BytesIO(raw)
            while stream.tell() < len(raw) and _scan_one(stream, found):
                pass
    except Exception as exc:  # a diagnostic: damaged input ends the scan, nothing else
        logger.debug("scanning %s for pickle globals stopped: %r", path.name, exc)
    return list(dict.fromkeys(found))


def _allowed_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler as unpickler  # private, but the list it enforces

        return set(unpickler._get_allowed_globals()) | _ALSO_ALLOWED
    except (ImportError, AttributeError):  # another torch: judge by the module instead
        return set()


def refused_globals(path: Path) -> list[str]:
    """The globals in `path` that torch's safe loading would refuse (what a refusal message should name)."""
    allowed = _allowed_globals()
    names = referenced_globals(path)
    if allowed:
        return [n for n in names if n not in allowed]
    return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]


def opcode_name(code: int) -> str | None:
    """'FRAME (pickle protocol 4)' for 149; None when `code` is no pickle opcode (damaged data)."""
    op = pickletools.code2op.get(chr(code)) if 0 <= code < 256 else None
    return None if op is None else f"{op.name} (pickle protocol {op.proto})"
