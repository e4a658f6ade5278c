"""Live hints for the Create and Train forms: token counts, names that are words or existing embeddings,
training prompts over CLIP's 75-token budget, and the learning rate the trainer really uses.

Pure functions over text (the tokenizer is open_clip's offline BPE vocabulary); only `dataset_captions`
reads files. Each hint is a `Hint`: a level ("info" or "warn") and a sentence for the UI or the API.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from . import tokens
from .data.templates import PromptBuilder, TemplateError, split_tags
from .embedding import trigger_word, validate_name
from .errors import ScheduleError, TIError
from .training.schedule import parse_schedule

logger = logging.getLogger(__name__)

INFO, WARN = "info", "warn"
BUDGET = tokens.PROMPT_TOKEN_BUDGET
# Stands in for [name] when the form has no valid name yet: letters only, so it never merges with the
# template's punctuation, and not a word, so no caption contains it.
PLACEHOLDER_NAME = "tiextplaceholder"
_SHOWN_CHARS = 120  # prompts quoted in a hint are cut to this length


@dataclass(frozen=True)
class Hint:
    level: str  # INFO or WARN
    text: str

    @property
    def is_warning(self) -> bool:
        return self.level == WARN

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _start(n: int) -> str:
    return "the vector starts" if n == 1 else f"the {n} vectors start"


def _quote(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…")


# ------------------------------------------------------------------ name


def vocabulary_word(name: str) -> str | None:
    """The lower-cased name when it is one whole word of CLIP's vocabulary ("car" → "car</w>"), else None.

    A name of letters only is one BPE word, whose last token always ends with `</w>`; so if it encodes
    to a single token, that token is the whole word. The vocabulary (49408 tokens) holds most English
    words and many names ("car", "dog", "style", "bmw", also rarer ones such as "sks"), which is why
    this is the test: any such name is a word the model already reads with a meaning.
    """
    word = name.strip().lower()
    if not word.isalpha():
        return None
    return word if len(tokens.token_ids(word)) == 1 else None


def _collision(name: str, existing_names: Iterable[str], existing_files: Iterable[str] | None,
               suffix: str = ".pt") -> str | None:
    key = name.lower()
    files = None if existing_files is None else [str(f) for f in existing_files]
    clashes = {n.strip() for n in existing_names if n and n.strip().lower() == key}
    clashing_files = sorted(f for f in files or () if trigger_word(f).lower() == key)
    if not clashes and not clashing_files:
        return None
    target = f"{name}{suffix}"
    if files is None or target in files:
        return (f"An embedding named {name!r} already exists: Create refuses the name unless Overwrite is on, "
                f"which replaces {target}.")
    shown = ", ".join(clashing_files) or ", ".join(repr(n) for n in sorted(clashes))
    # Only a difference in case needs the lower-casing explained; a file of another type (an SD1 .pt beside
    # an SDXL .safetensors) has the very same trigger word.
    case = not clashing_files or any(trigger_word(f) != name for f in clashing_files)
    why = ": prompts are lower-cased, so case does not tell trigger words apart" if case else ""
    # A case-insensitive file system sees the same file only when the type matches too.
    same_file = any(f.lower() == target.lower() for f in clashing_files)
    windows = (" (where file names ignore case, as on Windows, Create refuses it unless Overwrite is on)"
               if same_file else "")
    return (f"The existing embedding {shown} already answers to {name!r}{why}. Create would save {target} next "
            f"to it, two embeddings with one trigger word of which the host uses only one{windows}. "
            "Choose another name.")


def name_hints(name: str, existing_names: Iterable[str] = (),
               existing_files: Iterable[str] | None = None, suffix: str | None = None) -> list[Hint]:
    """Validity, token count, "is a vocabulary word" and "already exists" hints for an embedding name.

    `existing_names`: the names (trigger words) of existing embeddings; `existing_files`: their file
    names, when known (then the collision hint says exactly whether Create would refuse the name);
    `suffix`: the file type Create saves for the loaded model (`ModelInfo.embedding_suffix`; None: ".pt").
    An empty name gives no hints.
    """
    if not name or not name.strip():
        return []
    try:
        cleaned = validate_name(name)
    except TIError as exc:
        return [Hint(WARN, str(exc))]
    n = tokens.count_tokens(cleaned)
    out = [Hint(INFO, f"Name: {_plural(n, 'token')} as text (in a prompt the trigger word is replaced by "
                      "its vectors)")]
    word = vocabulary_word(cleaned)
    if word:
        out.append(Hint(WARN, (
            f"{word!r} is a whole word of CLIP's vocabulary (one token). Embeddings are found by their tokens, "
            f"so while this one is loaded A1111 (and this trainer) put the embedding in place of {word!r} in "
            f"every prompt, also in 'a red {word}': the word loses its usual meaning. Pick a name that is not "
            f"a word, e.g. '{word}-ti' or 'my-{word}'.")))
    clash = _collision(cleaned, existing_names, existing_files, suffix or ".pt")
    if clash:
        out.append(Hint(WARN, clash))
    return out


# ------------------------------------------------------------------ init text


def vectors_for(init_text: str, num_vectors: int) -> int:
    """The vectors Create makes: `num_vectors`, or with 0 one per init-text token (1 to 75)."""
    return int(num_vectors) if num_vectors else tokens.suggest_vectors(init_text or "")


def encoder_note(encoders: Mapping[str, int] | None) -> Hint | None:
    """For a model with several text encoders (SDXL: clip_l and clip_g, `ModelInfo.encoders`), what a vector is
    in each; None for one encoder. Both read the same BPE tokens, so every token count holds for each."""
    if not encoders or len(encoders) < 2:
        return None
    widths = " + ".join(f"{key} {dim}" for key, dim in encoders.items())
    return Hint(INFO, f"{widths} wide: each vector is one row in each text encoder; the init text's tokens give "
                      "each encoder its own starting rows (the token counts hold for both).")


def model_line(family: str, name: str, encoders: Mapping[str, int], suffix: str) -> str:
    """The loaded model as the Create and Train tabs show it: its family and what one vector of a new embedding
    is, e.g. "Loaded model: x — SDXL: each vector is clip_l 768 + clip_g 1280 (saved as .safetensors)"."""
    label = str(family or "unknown").upper()
    if len(encoders) > 1:
        widths = " + ".join(f"{key} {dim}" for key, dim in encoders.items())
        what = f"each vector is {widths} (saved as {suffix})"
    else:
        what = f"{' + '.join(str(dim) for dim in encoders.values()) or '?'} per vector ({suffix})"
    return f"Loaded model: {name} — {label}: {what}"


def init_text_hints(init_text: str, num_vectors: int = 0, init_mode: str = "pool",
                    encoders: Mapping[str, int] | None = None) -> list[Hint]:
    """Token count and suggested vectors of an init text, and how its tokens map onto the vectors; with the
    model's `encoders` (key -> width) known and more than one, a note on what a vector is per encoder."""
    hints = _init_text_hints(init_text, num_vectors, init_mode, encoders)
    note = encoder_note(encoders)
    return [*hints, note] if note else hints


def token_count(n: int, encoders: Mapping[str, int] | None = None) -> str:
    """'N tokens', or with several encoders the count per encoder ('clip_l: N tokens · clip_g: N tokens'): they
    share one BPE, so the counts are equal, but SDXL users look for both."""
    if not encoders or len(encoders) < 2:
        return _plural(n, "token")
    return " · ".join(f"{key}: {_plural(n, 'token')}" for key in encoders)


def _init_text_hints(init_text: str, num_vectors: int, init_mode: str,
                     encoders: Mapping[str, int] | None = None) -> list[Hint]:
    vectors = vectors_for(init_text, num_vectors)
    if not init_text or not init_text.strip():
        if num_vectors:
            return [Hint(INFO, f"Empty: {_start(vectors)} at zero.")]
        return [Hint(INFO, "Empty: the vectors start at zero (1 vector unless you set more).")]
    ids = tokens.token_ids(init_text)
    n = len(ids)
    out = [Hint(INFO, f"{token_count(n, encoders)} → suggested vectors {tokens.suggest_vectors(init_text)}")]
    if init_mode == "zeros":
        out.append(Hint(INFO, f"Init mode 'zeros': the text is ignored, {_start(vectors)} at zero."))
    elif n > vectors:
        over = f"more than the {BUDGET} one prompt chunk holds, " if not num_vectors else ""
        head = f"{_plural(n, 'token')} for {_plural(vectors, 'vector')} ({over}"
        if init_mode == "truncate":
            dropped = ", ".join(repr(w) for w in tokens.decode_tokens(ids[vectors:vectors + 8]))
            more = f" and {n - vectors - 8} more" if n - vectors > 8 else ""
            out.append(Hint(WARN, f"{head}init mode 'truncate'): the first {vectors} are kept, {dropped}{more} "
                                  "dropped."))
        elif init_mode == "spread":
            out.append(Hint(WARN, f"{head}init mode 'spread'): tokens are taken by A1111's index rule, "
                                  "the others are skipped."))
        else:
            out.append(Hint(INFO, f"{head}init mode 'pool'): tokens are pooled, each vector starts as the "
                                  "average of a group of neighbouring tokens."))
    elif n < vectors:
        out.append(Hint(INFO, f"{_plural(n, 'token')} for {_plural(vectors, 'vector')}: tokens are repeated, "
                              "each fills a run of neighbouring vectors."))
    return out


# ------------------------------------------------------------------ prompt budget


def prompt_tokens(prompt: str, name: str, num_vectors: int) -> tuple[int, int]:
    """(prompt tokens, occurrences of the name) once each occurrence of the name's token sequence is
    expanded to `num_vectors` vectors: the rule the host and the standalone trainer both use to find
    an embedding in a prompt (see backends/standalone/splice.py)."""
    content = tokens.token_ids(prompt)
    trigger = tokens.token_ids(name)
    m = len(trigger)
    count = found = i = 0
    while i < len(content):
        if m and content[i:i + m] == trigger:
            count, found, i = count + num_vectors, found + 1, i + m
        else:
            count, i = count + 1, i + 1
    return count, found


def longest_caption(captions: Iterable[str]) -> str:
    """The caption, as [filewords] renders it (tags stripped, joined with ", "), with the most tokens."""
    best, best_n = "", -1
    for caption in captions:
        text = ", ".join(split_tags(caption))
        n = tokens.count_tokens(text)
        if n > best_n:
            best, best_n = text, n
    return best


def prompt_budget(template_lines: Sequence[str], num_vectors: int, captions: Iterable[str] = (),
                  name: str = "") -> list[Hint]:
    """How long the longest training prompt gets: each template line rendered as the trainer does, with
    [filewords] = the longest caption (none: removed with its comma) and the name as `num_vectors`
    vectors. One info hint when it fits in 75 tokens, a warning naming the line when it does not; a
    warning too when the name's tokens are not found in a rendered prompt (punctuation touching [name]).

    `name` empty or invalid: a placeholder name stands in (the count does not depend on it).
    """
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
    try:
        trigger, real = validate_name(name), True
    except TIError:
        trigger, real = PLACEHOLDER_NAME, False
    lines = [line.strip() for line in template_lines if line and line.strip()]
    try:
        PromptBuilder(lines, trigger)  # a template the trainer would refuse: say why instead
    except TemplateError as exc:
        return [Hint(WARN, str(exc))]
    caption = longest_caption(captions)
    rows = []
    for index, line in enumerate(lines):
        # The trainer's own rendering of this one line (no shuffle or dropout: those never lengthen it).
        prompt = PromptBuilder([line], trigger).render(caption, random.Random(0))
        count, found = prompt_tokens(prompt, trigger, num_vectors)
        rows.append((count, index, prompt, found))
    count, index, prompt, _ = max(rows, key=lambda r: (r[0], -r[1]))
    shown = prompt.replace(trigger, "[name]") if not real else prompt
    filled = "the longest caption" if caption else "no caption"
    how = (f"template line {index + 1}, the name as {_plural(num_vectors, 'vector')}, "
           f"[filewords] = {filled}")
    out = []
    if count > BUDGET:
        over_lines = sum(1 for r in rows if r[0] > BUDGET)
        out.append(Hint(WARN, (
            f"The longest training prompt has {count} tokens, {count - BUDGET} over the {BUDGET}-token budget: "
            f"{_quote(shown)} ({how}; {over_lines} of {_plural(len(rows), 'line')} over). A1111 and the "
            "standalone trainer split longer prompts into 75-token chunks encoded separately (an embedding that "
            "would cross a chunk boundary is moved whole into the next chunk), so the text in one chunk does not "
            "see the other's, and each chunk costs one more text-encoder pass per step. Use fewer vectors, "
            "shorter captions or a shorter template.")))
    else:
        out.append(Hint(INFO, f"Longest training prompt: {count} of {BUDGET} tokens ({how})."))
    missing = [r[2] for r in rows if r[3] == 0]
    if real and missing:
        out.append(Hint(WARN, (
            f"The name's tokens are not found in {_plural(len(missing), 'training prompt')}, e.g. "
            f"{_quote(missing[0])}: punctuation touching the name merges with the template's into other "
            "tokens, so the embedding would not be in those prompts. Drop the punctuation from the name.")))
    return out


def dataset_captions(folder: str | os.PathLike[str], recursive: bool = False) -> list[str]:
    """Every image's caption as training reads it (its .txt sidecar, else words of the file name),
    without decoding images. Reads files: the one function here that is not pure."""
    from .data.captions import images_with_captions
    from .data.images import caption_from_filename, decode_caption

    out = []
    for image, caption_file, exists in images_with_captions(folder, recursive=recursive):
        try:
            out.append(decode_caption(caption_file.read_bytes()).strip() if exists
                       else caption_from_filename(image.stem))
        except (OSError, UnicodeDecodeError) as exc:  # the dataset check and the scan report these
            logger.debug("Skipping caption %s: %s", caption_file, exc)
    return out


# ------------------------------------------------------------------ learning rate


def effective_lr(learn_rate: str, batch_size: int, grad_accum: int, scale_lr: bool) -> Hint:
    """The learning rate the optimizer gets: the schedule's (first) rate, times batch × accumulation when
    scaling is on (as the trainer does for every stage). A bad schedule: the parser's message."""
    try:
        items = parse_schedule(learn_rate)
    except ScheduleError as exc:
        return Hint(WARN, str(exc))
    try:
        batch, accum = int(batch_size), int(grad_accum)
    except (TypeError, ValueError):
        return Hint(WARN, f"Batch size and gradient accumulation must be whole numbers, got {batch_size!r} "
                          f"and {grad_accum!r}.")
    if batch < 1 or accum < 1:
        return Hint(WARN, f"Batch size and gradient accumulation must be at least 1, got {batch} and {accum}.")
    rate, factor = items[0].rate, batch * accum
    staged = len(items) > 1
    first = " for the first stage of the schedule" if staged else ""
    if not scale_lr:
        return Hint(INFO, f"Learning rate {rate:g}{first}, not scaled (batch {batch} × accumulation {accum}; "
                          "scaling by batch is off).")
    if factor == 1:
        return Hint(INFO, f"Effective learning rate: {rate:g}{first} (batch 1 × accumulation 1: nothing to scale).")
    every = f"; every stage is multiplied by {factor}" if staged else ""
    return Hint(INFO, f"Effective learning rate: {rate:g} × {factor} (batch {batch} × accumulation {accum}) = "
                      f"{rate * factor:g}{first}{every}.")


def as_records(hints: Iterable[Hint]) -> list[dict[str, str]]:
    return [h.to_dict() for h in hints]
