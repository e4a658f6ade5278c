"""Dataset preparation: images, preprocessing, crops, captions and captioners, templates, the dataset check
and the encoded training set."""

from __future__ import annotations
