"""scripts/train_vae.py with the loss made NaN on one rank at given steps: `train_with_nan.py RANK STEPS ARGS...`
(STEPS: comma-separated 1-based steps). Tests launch it under torchrun to inject a non-finite loss."""
import os
import runpy
import sys
from pathlib import Path

from opensora_vae.losses import VAELoss

rank, steps = int(sys.argv.pop(1)), {int(s) for s in sys.argv.pop(1).split(",")}
forward, calls = VAELoss.forward, [0]


def poisoned(self, x, out):
    terms = forward(self, x, out)
    calls[0] += 1
    if calls[0] in steps and int(os.environ.get("RANK", 0)) == rank:
        terms["loss"] = terms["loss"] * float("nan")
    return terms


VAELoss.forward = poisoned
runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "train_vae.py"), run_name="__main__")
