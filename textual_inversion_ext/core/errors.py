"""Typed errors with messages a user can act on. The UI and CLI show `str(error)` as is."""

from __future__ import annotations


class TIError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidNameError(TIError, ValueError):
    """An embedding name that cannot be a file stem / trigger word."""


class EmbeddingFormatError(TIError, ValueError):
    """A file that is not an embedding we can read, or data that cannot be written in a format."""


class UnsafeFileError(EmbeddingFormatError):
    """A file whose loading would execute code (pickle globals beyond plain tensors)."""


class ScheduleError(TIError, ValueError):
    """A malformed learning-rate (or clip-value) schedule."""


class DatasetError(TIError):
    """A dataset folder that cannot be trained on (missing, empty, nothing usable)."""


class ModelError(TIError):
    """A model that cannot be loaded or is not supported."""


class TrainingError(TIError):
    """Training could not start or had to stop (the embedding is saved before this is raised)."""


class Interrupted(TIError):
    """Work stopped on request (a stop event or the host's Interrupt), not by a failure."""


class WriteError(TIError, OSError):
    """A file could not be written (read-only folder, full disk, a folder in the way). Still an OSError, so code
    that handles OS failures keeps working; the message names the file, the reason and what to check."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
