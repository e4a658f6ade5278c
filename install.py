"""Run by the A1111 launcher (as a subprocess) before start-up: install only what the host lacks.

Never installs torch, torchvision, gradio or transformers: the host pins those. Fast when nothing is
missing (one metadata lookup per package); `--skip-install` makes `launch.run_pip` a no-op.
"""

from __future__ import annotations

import launch  # provided by the host

# (pip requirement, import/distribution name) — all present in A1111 1.8–1.10; checked anyway
# because Forge and custom installs differ.
REQUIREMENTS = [
    ("safetensors>=0.4", "safetensors"),
    ("open_clip_torch>=2.20", "open_clip_torch"),
    ("Pillow>=9.5", "PIL"),
]

for requirement, name in REQUIREMENTS:
    if not launch.is_installed(name):
        launch.run_pip(f'install "{requirement}"', f"{requirement} for the Textual Inversion extension")
