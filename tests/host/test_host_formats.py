"""What we write loads in the real A1111: same structure, same keys, usable in txt2img."""

from __future__ import annotations

import json
import uuid

import torch

from textual_inversion_ext.core import formats
from textual_inversion_ext.core.embedding import SINGLE, Embedding

FILES = {"tiext-test-pt": ".pt", "tiext-test-st": ".safetensors", "tiext-test-png": ".png",
         "tiext-test-bin": ".bin"}


def test_host_loads_every_format_we_write(host_dir, host_api):
    emb_dir = host_dir / "embeddings"
    written = []
    try:
        for name, suffix in FILES.items():
            emb = Embedding(name, {SINGLE: torch.randn(3, 768) * 0.01}, step=7, sd_checkpoint="0123456789",
                            sd_checkpoint_name="tiny")
            written += formats.save_embedding(emb, emb_dir / f"{name}{suffix}")
        host_api.call("POST", "/sdapi/v1/refresh-embeddings")
        loaded = host_api.call("GET", "/sdapi/v1/embeddings")["loaded"]
        for name, suffix in FILES.items():
            assert name in loaded, f"{suffix} not loaded by the host: {sorted(loaded)}"
            assert loaded[name]["vectors"] == 3 and loaded[name]["shape"] == 768
        assert loaded["tiext-test-pt"]["step"] == 7
        assert loaded["tiext-test-pt"]["sd_checkpoint"] == "0123456789"
        # the trigger word works in a generation
        # a fresh prompt each run: the host caches conditioning (and drops TI hashes) for a repeated one
        result = host_api.call("POST", "/sdapi/v1/txt2img", {
            "prompt": f"a photo of tiext-test-pt, {uuid.uuid4().hex[:8]}", "steps": 1, "width": 64, "height": 64,
            "seed": 1})
        assert result["images"]
        infotext = json.loads(result["info"])["infotexts"][0]
        assert 'TI hashes: "tiext-test-pt: ' in infotext, result["info"]  # the host used our embedding
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        host_api.call("POST", "/sdapi/v1/refresh-embeddings")
