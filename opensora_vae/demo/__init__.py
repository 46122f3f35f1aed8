"""`make demo` (python -m opensora_vae.demo): the three-stage recipe, tiny, on a CPU, with a report.

data.py caches the clips and photos; stages.py runs and records the stages; report.py writes the report.
"""
from .cli import main, run

__all__ = ["main", "run"]
