"""Embedding files: A1111 .pt/.png, .safetensors, diffusers learned_embeds (incl. the SDXL pair).

Loading recognises a file by its content (not its suffix) and never runs pickled code. Writing goes
through a temp file (atomic) and produces files A1111/Forge load as they are.

Trigger words follow A1111: the file stem for .pt/.bin/.safetensors, the stored name for images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..embedding import SINGLE, Embedding, trigger_word, validate_name
from ..errors import EmbeddingFormatError, TIError, UnsafeFileError
from . import a1111_pt, diffusers_fmt, png, safetensors_fmt
from ._data import Decoded, checked_for_writing
from .detect import sniff
from .optim import TrainingState, load_optimizer_state, load_training_state, optim_path, save_optimizer_state

__all__ = [
    "FORMATS",
    "Converted",
    "LoadedEmbedding",
    "TrainingState",
    "convert",
    "describe",
    "format_for_suffix",
    "load_embedding",
    "load_optimizer_state",
    "load_training_state",
    "optim_path",
    "save_embedding",
    "save_optimizer_state",
]

logger = logging.getLogger(__name__)

FORMATS = (
    "a1111-pt",
    "safetensors",
    "diffusers-bin",
    "diffusers-safetensors",
    "diffusers-sdxl-pair",
    "a1111-png",
)
_DEFAULT_FOR_SUFFIX = {
    ".pt": "a1111-pt",
    ".safetensors": "safetensors",
    ".bin": "diffusers-bin",
    ".png": "a1111-png",
}
# A1111 picks its loader by suffix, so a format may only be written under suffixes that loader reads.
_SUFFIXES = {
    "a1111-pt": (".pt", ".bin"),
    "safetensors": (".safetensors",),
    "diffusers-bin": (".bin", ".pt"),
    "diffusers-safetensors": (".safetensors",),
    "diffusers-sdxl-pair": (".safetensors", ".bin"),
    "a1111-png": (".png",),
}
_DIFFUSERS = {"diffusers-bin", "diffusers-safetensors", "diffusers-sdxl-pair"}


@dataclass(frozen=True)
class LoadedEmbedding:
    """An embedding read from disk, with how it was stored."""

    embedding: Embedding  # its name is the trigger word A1111 would use
    format: str  # one of FORMATS
    paths: tuple[Path, ...]  # two for the diffusers SDXL pair
    carrier: str | None = None  # images: "text-chunk" or "pixels"
    stored_name: str | None = None  # the `name` saved inside the file, if any

    @property
    def path(self) -> Path:
        return self.paths[0]


def format_for_suffix(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    try:
        return _DEFAULT_FOR_SUFFIX[suffix]
    except KeyError:
        raise EmbeddingFormatError(
            f"cannot tell the format from {Path(path).name!r}: use a .pt, .safetensors, .bin or .png "
            f"file name, or pass one of {', '.join(FORMATS)}."
        ) from None


def _read_tensor_file(path: Path, kind: str) -> tuple[Decoded, dict[str, str]]:
    if kind == "torch":
        return a1111_pt.read(path), {}
    if kind == "safetensors":
        return safetensors_fmt.read(path)
    raise EmbeddingFormatError(f"{path.name} is an image, not a tensor file.")


def _read_partner(path: Path, partner: Path) -> Decoded | None:
    """The other half of a diffusers SDXL pair, or None (logged) when it is absent or unreadable."""
    if not partner.is_file():
        return None
    try:
        decoded, _ = _read_tensor_file(partner, sniff(partner))
    except UnsafeFileError:
        raise  # the user opened half of this pair; they must hear about the other half
    except EmbeddingFormatError as exc:
        logger.warning("not pairing %s with %s: %s", path.name, partner.name, exc)
        return None
    return decoded


def _find_pair(path: Path, first: Decoded) -> Decoded | None:
    second = _read_partner(path, diffusers_fmt.sibling_path(path))
    if second is None:
        return None
    if not diffusers_fmt.is_pair(first, second):
        logger.debug("%s is not the text_encoder_2 half of %s", diffusers_fmt.sibling_path(path).name, path.name)
        return None
    return diffusers_fmt.join_pair(first, second)


def _pair_from_second_half(path: Path, second: Decoded) -> tuple[Decoded, Path]:
    """Join a clip_g (`_2`) half with its clip_l half, or refuse: read alone it would pass for a
    single-encoder embedding and a conversion would drop half of it."""
    first_path = diffusers_fmt.first_half_path(path)
    first = _read_partner(path, first_path) if first_path is not None else None
    if first_path is not None and first is not None and diffusers_fmt.is_pair(first, second):
        return diffusers_fmt.join_pair(first, second), first_path
    what = (
        f"{path.name} holds {second.vectors[SINGLE].shape[1]}-wide vectors under the single key {second.key!r}: "
        "the text_encoder_2 (clip_g) half of a diffusers SDXL embedding, which is unusable without its clip_l half"
    )
    if first_path is None:
        raise EmbeddingFormatError(
            f"{what}. diffusers saves the halves as learned_embeds(-steps-N) and learned_embeds_2(-steps-N): "
            "put both files, named so, in one folder and open either."
        )
    problem = "is missing" if not first_path.is_file() else "is not a matching 768-wide file with as many vectors"
    raise EmbeddingFormatError(f"{what}, {first_path.name}, which {problem} next to it.")


def load_embedding(path: str | Path) -> LoadedEmbedding:
    """Read any supported embedding file; raise EmbeddingFormatError (UnsafeFileError for pickles that
    would run code) with a message saying what is wrong, whatever is wrong with the file.

    diffusers' SDXL pair (`learned_embeds[-steps-N]` = clip_l + `learned_embeds_2[-steps-N]` = clip_g) is
    read as one SDXL embedding (format "diffusers-sdxl-pair") whichever half is given; a clip_g half
    without its partner is refused, naming the missing file.
    """
    path = Path(path)
    try:
        return _load(path)
    except TIError:
        raise
    except Exception as exc:  # any reader's surprise on hostile bytes is still a bad file, not a crash
        logger.debug("unexpected failure reading %s", path, exc_info=True)
        detail = str(exc).strip()[:200] or type(exc).__name__
        raise EmbeddingFormatError(f"{path.name} could not be read as an embedding ({detail}).") from exc


def _load(path: Path) -> LoadedEmbedding:
    kind = sniff(path)
    if kind == "image":
        decoded, carrier = png.read(path)
        name = decoded.stored_name or trigger_word(path)  # A1111: the stored name wins for images
        embedding = decoded.to_embedding(name)
        return LoadedEmbedding(embedding, "a1111-png", (path,), carrier, decoded.stored_name)

    decoded, extra = _read_tensor_file(path, kind)
    paths: tuple[Path, ...] = (path,)
    if decoded.layout == "single-key":
        if diffusers_fmt.is_clip_g_half(decoded):
            decoded, first_path = _pair_from_second_half(path, decoded)
            paths, fmt = (first_path, path), "diffusers-sdxl-pair"
        elif (pair := _find_pair(path, decoded)) is not None:
            decoded, paths, fmt = pair, (path, diffusers_fmt.sibling_path(path)), "diffusers-sdxl-pair"
        elif kind == "torch":
            fmt = "diffusers-bin"
        else:
            fmt = "safetensors" if decoded.key == safetensors_fmt.KOHYA_KEY else "diffusers-safetensors"
        if fmt in _DIFFUSERS and decoded.key is not None:
            extra.setdefault("token", decoded.key)  # so writing it back as diffusers keeps the token
    else:
        fmt = "a1111-pt" if kind == "torch" else "safetensors"
    embedding = decoded.to_embedding(trigger_word(paths[0]), extra)
    logger.debug("loaded %s as %s (%s)", path, fmt, embedding.dims)
    return LoadedEmbedding(embedding, fmt, paths, None, decoded.stored_name)


def save_embedding(
    embedding: Embedding,
    path: str | Path,
    fmt: str | None = None,
    *,
    image: Image.Image | None = None,
) -> list[Path]:
    """Write `embedding` to `path` in `fmt` (default: from the suffix); returns the written paths.

    `image` is the picture of an "a1111-png" file (default: a generated card). Every file is
    written atomically; the pair is only put in place once both halves were written.
    """
    path = Path(path)
    fmt = fmt or format_for_suffix(path)
    if fmt not in FORMATS:
        raise EmbeddingFormatError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if path.suffix.lower() not in _SUFFIXES[fmt]:
        raise EmbeddingFormatError(
            f"{fmt} files must end in {' or '.join(_SUFFIXES[fmt])} (A1111 chooses its loader by the "
            f"suffix), not {path.name!r}."
        )
    name = validate_name(embedding.name)
    if fmt != "a1111-png":
        # A snapshot's stem `<name>-<step>` may use the room the name rule keeps for such suffixes.
        trigger = validate_name(trigger_word(path), derived=trigger_word(path).startswith(f"{name}-"))
        if trigger != name:
            logger.debug("%s: A1111 will call this embedding %r (the file name), not %r", path.name, trigger, name)
    if image is not None and fmt != "a1111-png":
        logger.warning("the picture is only used for a1111-png files; ignoring it for %s", fmt)

    data = checked_for_writing(embedding)  # also refuses NaN/inf and wrong widths
    data.name = name
    if fmt == "a1111-pt":
        written = a1111_pt.write(data, path)
    elif fmt == "safetensors":
        written = safetensors_fmt.write(data, path)
    elif fmt in {"diffusers-bin", "diffusers-safetensors"}:
        written = diffusers_fmt.write_single(data, path)
    elif fmt == "diffusers-sdxl-pair":
        written = diffusers_fmt.write_pair(data, path)
    else:
        written = png.write(data, path, image)
    logger.debug("saved embedding %r (%s) to %s", name, fmt, ", ".join(map(str, written)))
    return written


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: str | Path) -> dict[str, Any]:
    """What the CLI `info` command shows about an embedding file."""
    loaded = load_embedding(path)
    emb = loaded.embedding
    sha = _file_sha256(loaded.path)
    return {
        "path": str(loaded.path),
        "files": [str(p) for p in loaded.paths],
        "trigger_word": emb.name,
        "stored_name": loaded.stored_name,
        "format": loaded.format,
        "carrier": loaded.carrier,
        "sdxl": emb.is_sdxl,
        "vectors": emb.num_vectors,
        "encoders": {k: {"vectors": int(v.shape[0]), "dim": int(v.shape[1])} for k, v in emb.vectors.items()},
        "shape": ", ".join(f"{k}: {v.shape[0]} × {v.shape[1]}" for k, v in emb.vectors.items()),
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
        "content_hash": emb.content_hash(),
        "a1111_checksum": emb.a1111_checksum(),
        # A1111 writes the first 12 hex digits of the file's sha256 into the infotext ("TI hashes")
        "sha256": sha,
        "shorthash": sha[:12],
    }


@dataclass(frozen=True)
class Converted:
    """What `convert` wrote, under which name, and what the target format could not keep."""

    paths: list[Path]
    name: str
    notes: list[str]


def _conversion_notes(loaded: LoadedEmbedding, embedding: Embedding, dst: Path, fmt: str) -> list[str]:
    notes = []
    token = embedding.extra.get("token")
    if token and token != embedding.name:
        if fmt in {"a1111-pt", "a1111-png"}:
            notes.append(f"the diffusers token {token!r} is not kept: {fmt} files have no place for it; "
                         f"the trigger word is {embedding.name!r}.")
        elif fmt == "safetensors":
            notes.append(f"the diffusers token {token!r} is kept in the metadata; diffusers loads this file under "
                         f"the token {safetensors_fmt.KOHYA_KEY!r} unless you pass token={token!r}.")
    lost = [f"step {embedding.step}"] if embedding.step else []
    lost += [f"checkpoint {c}" for c in (embedding.sd_checkpoint_name, embedding.sd_checkpoint) if c]
    what = None
    if fmt in _DIFFUSERS and dst.suffix.lower() != ".safetensors":
        what = f"diffusers {dst.suffix.lower()} files hold only the token and its vectors"
    elif fmt == "a1111-pt" and embedding.is_sdxl:
        what = "SDXL .pt files hold only the two tensors (A1111/Forge fail on anything else in them)"
    if lost and what:
        notes.append(f"{what}: {', '.join(lost)} not kept; write .safetensors to keep them.")
    if (loaded.format in {"diffusers-bin", "diffusers-safetensors"} and not embedding.is_sdxl
            and loaded.path.stem.startswith("learned_embeds")):
        # diffusers' SD1 and SDXL scripts both write this name; alone, the SDXL clip_l half looks like SD1
        notes.append(f"{loaded.path.name} was read as a single-encoder (SD1/SD2) embedding: there is no "
                     f"{diffusers_fmt.sibling_path(loaded.path).name} next to it. If it came from diffusers' "
                     "SDXL script, put that clip_g half beside it and convert again.")
    return notes


def convert(src: str | Path, dst: str | Path, fmt: str | None = None, *, name: str | None = None) -> Converted:
    """Load `src` and write it to `dst` in `fmt` (default: from `dst`'s suffix).

    The written embedding is named after `dst` (the trigger word A1111 will use) unless `name` is given,
    never after the source file. A diffusers token is carried over where the format holds it (the
    diffusers key, .safetensors metadata); `notes` lists what the target could not keep.
    """
    loaded = load_embedding(src)
    dst = Path(dst)
    fmt = fmt or format_for_suffix(dst)
    embedding = dataclasses.replace(loaded.embedding, name=validate_name(name or trigger_word(dst)))
    notes = _conversion_notes(loaded, embedding, dst, fmt)
    paths = save_embedding(embedding, dst, fmt)
    for note in notes:
        logger.info("convert %s -> %s: %s", loaded.path.name, dst.name, note)
    return Converted(paths, embedding.name, notes)
