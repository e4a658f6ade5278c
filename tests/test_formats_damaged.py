"""Damaged and hostile embedding files: every failure is a format error that says what is wrong, and one
bad file never hides the others in the embedding list (issue 12, point 3)."""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textual_inversion_ext import api
from textual_inversion_ext.core.embedding import SINGLE, Embedding
from textual_inversion_ext.core.errors import EmbeddingFormatError, UnsafeFileError
from textual_inversion_ext.core.formats import load_embedding, save_embedding
from textual_inversion_ext.service import Service


def _embedding(name: str = "rick") -> Embedding:
    return Embedding(name=name, vectors={SINGLE: torch.randn(2, 768, generator=torch.Generator().manual_seed(0))})


def _zip_members(path: Path) -> tuple[dict[str, bytes], str]:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    return members, next(name for name in members if name.endswith("data.pkl"))


def _rezip(members: dict[str, bytes], pkl_name: str, pkl: bytes, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, pkl if name == pkl_name else data)
    return out


def _pickle_spans(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of each pickle at the start of a legacy torch file (which holds five in a row)."""
    stream, spans = io.BytesIO(raw), []
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        spans.append((start, stream.tell()))
    return spans


# ---------------------------------------------------------------- damaged torch files


def _truncated_zip(tmp: Path) -> Path:
    (path,) = save_embedding(_embedding(), tmp / "src.pt")
    raw = path.read_bytes()
    out = tmp / "bad.pt"
    out.write_bytes(raw[: len(raw) - 30])  # cuts into the zip's central directory
    return out


def _corrupted_pickle(tmp: Path) -> Path:
    (path,) = save_embedding(_embedding(), tmp / "src.pt")
    members, pkl = _zip_members(path)
    data = members[pkl]
    return _rezip(members, pkl, data[:10] + b"\xff\xfe\xfd" + data[13:], tmp / "bad.pt")


def _short_int(tmp: Path) -> Path:
    out = tmp / "bad.pt"  # a BININT with 2 of its 4 bytes: the unpickler's struct.unpack fails
    out.write_bytes(b"\x80\x02J\x01\x00")
    return out


def _unknown_storage_key(tmp: Path) -> Path:
    src = tmp / "src.pt"  # a legacy file whose storage-key list names a storage it does not hold
    torch.save({"emb_params": torch.ones(2, 768)}, src, _use_new_zipfile_serialization=False)
    raw = src.read_bytes()
    start, end = _pickle_spans(raw)[4]
    out = tmp / "bad.pt"
    out.write_bytes(raw[:start] + pickle.dumps(["bogus"], protocol=2) + raw[end:])
    return out


def _huge_storage(tmp: Path) -> Path:
    (path,) = save_embedding(_embedding(), tmp / "src.pt")
    members, pkl = _zip_members(path)
    data = members[pkl]
    numel = b"M\x00\x06t"  # BININT2 1536 (= 2 x 768) closing the storage's persistent id
    assert data.count(numel) == 1
    return _rezip(members, pkl, data.replace(numel, b"J" + struct.pack("<i", 2**31 - 1) + b"t"), tmp / "bad.pt")


def _huge_shape(tmp: Path) -> Path:
    (path,) = save_embedding(_embedding(), tmp / "src.pt")
    members, pkl = _zip_members(path)
    data = members[pkl]
    shape = b"K\x02M\x00\x03\x86"  # the (2, 768) size tuple
    assert data.count(shape) == 1
    return _rezip(members, pkl, data.replace(shape, b"J" + struct.pack("<i", 2**31 - 1) + b"M\x00\x03\x86"),
                  tmp / "bad.pt")


def _huge_legacy_storage(tmp: Path) -> Path:
    src = tmp / "src.pt"
    torch.save({"emb_params": torch.ones(2, 768)}, src, _use_new_zipfile_serialization=False)
    raw = src.read_bytes()
    end = _pickle_spans(raw)[4][1]  # the storage's 8-byte element count follows the last pickle
    out = tmp / "bad.pt"
    out.write_bytes(raw[:end] + struct.pack("<q", 2**62) + raw[end + 8 :])
    return out


DAMAGED = {
    "truncated zip": _truncated_zip,
    "corrupted pickle bytes": _corrupted_pickle,
    "struct.error (short int)": _short_int,
    "AssertionError (unknown storage key)": _unknown_storage_key,
    "huge storage size": _huge_storage,
    "huge tensor shape": _huge_shape,
    "huge legacy storage size": _huge_legacy_storage,
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_torch_files_raise_format_errors(tmp_path: Path, case: str) -> None:
    path = DAMAGED[case](tmp_path)
    with pytest.raises(EmbeddingFormatError, match=r"bad\.pt is damaged") as info:
        load_embedding(path)
    assert not isinstance(info.value, UnsafeFileError)  # damage is not danger


def test_loader_out_of_memory_is_a_format_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the probes saw on a small machine for a size field far beyond RAM; here torch.load fails so.
    (path,) = save_embedding(_embedding(), tmp_path / "rick.pt")

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(EmbeddingFormatError, match="more data than fits in memory"):
        load_embedding(path)


def test_unexpected_reader_failure_is_a_format_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from textual_inversion_ext.core.formats import safetensors_fmt

    (path,) = save_embedding(_embedding(), tmp_path / "rick.safetensors")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("surprise")

    monkeypatch.setattr(safetensors_fmt, "decode_data", broken)  # a failure no reader expects
    with pytest.raises(EmbeddingFormatError, match=r"rick\.safetensors could not be read.*surprise"):
        load_embedding(path)


# ---------------------------------------------------------------- hostile pickles: name the global


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("true",))


class _RunsTwo:
    def __reduce__(self):  # a second posix global: protocol 4 fetches "posix" from the memo (BINGET)
        return (os.getcwd, ())


SYSTEM = r"(posix|nt)\.system"


def _plain(protocol: int):
    return lambda: pickle.dumps({"<x>": _RunsCommand()}, protocol=protocol)


HOSTILE = {
    # GLOBAL of a builtin: torch's message says "GLOBAL eval", which was reported as "would import GLOBAL"
    "GLOBAL builtins.eval + REDUCE": (lambda: b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.",
                                      r"would import builtins\.eval,"),
    "GLOBAL posix.system (protocol 2)": (_plain(2), SYSTEM),
    # protocol 4 starts with FRAME, which torch refuses as "Unsupported operand 149" before the global
    "STACK_GLOBAL in a FRAME (protocol 4)": (_plain(4), SYSTEM),
    "STACK_GLOBAL (protocol 5)": (_plain(5), SYSTEM),
    "STACK_GLOBAL without FRAME": (lambda: b"\x80\x02\x8c\x05posix\x8c\x06system\x93\x8c\x04true\x85R.", SYSTEM),
    "STACK_GLOBAL names from the memo": (lambda: pickle.dumps([_RunsCommand(), _RunsTwo()], protocol=4),
                                         r"(posix|nt)\.system, (posix|nt)\.getcwd"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickle_refusal_names_the_global(tmp_path: Path, case: str) -> None:
    build, message = HOSTILE[case]
    path = tmp_path / "evil.bin"
    path.write_bytes(build())
    with pytest.raises(UnsafeFileError, match=message) as info:
        load_embedding(path)
    assert "GLOBAL," not in str(info.value) and "operand" not in str(info.value)


def test_hostile_torch_zip_with_protocol_4_names_the_global(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"emb_params": _RunsCommand()}, path, pickle_protocol=4)
    with pytest.raises(UnsafeFileError, match=SYSTEM):
        load_embedding(path)


def test_refused_opcode_without_a_global_is_named(tmp_path: Path) -> None:
    path = tmp_path / "frame.bin"
    path.write_bytes(pickle.dumps({"<x>": [1.0, 2.0]}, protocol=4))  # harmless, but torch refuses FRAME
    with pytest.raises(UnsafeFileError, match=r"opcode FRAME \(pickle protocol 4\)") as info:
        load_embedding(path)
    assert "149" not in str(info.value)


def test_byte_that_is_no_opcode_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x80\x02}\xff.")
    with pytest.raises(EmbeddingFormatError, match=r"damaged.*byte 255") as info:
        load_embedding(path)
    assert not isinstance(info.value, UnsafeFileError)


# ---------------------------------------------------------------- PNG with empty data blocks


@pytest.mark.parametrize(("separators", "message"), [
    ((0, -1), "both pixel data blocks are empty"),
    ((0, 10), "the pixel data block left of the first separator column is empty"),
])
def test_png_with_empty_data_blocks_says_what_is_wrong(tmp_path: Path, separators: tuple[int, int],
                                                       message: str) -> None:
    # Separator columns (low nibbles zero, not black, so the border crop keeps them) at the image's edge
    # leave a data block empty. The message used to be "differ in size (16, 0, 3) vs (16, 0, 3)".
    rgb = np.full((16, 20, 3), 0x11, np.uint8)
    rgb[:, list(separators)] = 0x10
    path = tmp_path / "card.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(EmbeddingFormatError, match=message) as info:
        load_embedding(path)
    assert "differ in size" not in str(info.value)


# ---------------------------------------------------------------- the embedding list


def _folder_with_bad_files(folder: Path) -> None:
    folder.mkdir()
    save_embedding(_embedding("good"), folder / "good.pt")
    (folder / "short.pt").write_bytes(b"\x80\x02J\x01\x00")  # raised struct.error out of the listing
    (folder / "evil.bin").write_bytes(pickle.dumps({"<x>": _RunsCommand()}, protocol=2))
    (folder / "empty.safetensors").write_bytes(b"")


def test_listing_skips_bad_files_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = Service(backend=lambda: None, embeddings_dir=tmp_path / "emb", log_root=tmp_path / "logs")
    _folder_with_bad_files(service.embeddings_dir)
    with caplog.at_level(logging.WARNING, logger="textual_inversion_ext.service"):
        found, skipped = service.scan_embeddings()
        assert service.list_embeddings() == found  # listed again: no second warning
    assert [e["name"] for e in found] == ["good"]
    reasons = {s["file"]: s["error"] for s in skipped}
    assert set(reasons) == {"short.pt", "evil.bin", "empty.safetensors"}
    assert "damaged" in reasons["short.pt"] and "system" in reasons["evil.bin"]
    assert "empty" in reasons["empty.safetensors"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("Skipping" in w for w in warnings)

    status, body = api.dispatch(api.embeddings, service, None)
    assert status == 200
    assert [e["name"] for e in body["embeddings"]] == ["good"]
    assert {s["file"] for s in body["skipped"]} == set(reasons)
