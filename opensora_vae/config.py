"""Python configs (mmengine `Config`, with `_base_`), dotted `--cfg-options`, and saving the resolved config."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

from mmengine.config import Config


def parse_cfg_options(items: Optional[Iterable[str]]) -> Dict[str, object]:
    """["a.b=1", "c=[1,2]", "d=none"] -> {"a.b": 1, "c": [1, 2], "d": None}; values are Python literals
    when they parse as such (true/false/none in any case too), otherwise strings."""
    out: Dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--cfg-options entry {item!r} is not key=value")
        key, raw = item.split("=", 1)
        low = raw.strip().lower()
        if low in ("none", "null"):
            value: object = None
        elif low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def load_config(path: Union[str, Path], options: Optional[Union[Dict[str, object], Iterable[str]]] = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    cfg = Config.fromfile(str(path))
    if options:
        if not isinstance(options, dict):
            options = parse_cfg_options(options)
        cfg.merge_from_dict(options)
    return cfg


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the fully resolved config (bases merged, options applied) as a Python file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(cfg.pretty_text)
