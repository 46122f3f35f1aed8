"""Run by tests/test_tiling_exact.py under torchrun (gloo): the tiny pipeline's tiled encode and decode with each
frame's tiles split across the ranks (`parallel=True`), then the decode planned from max_memory="auto" (the
ranks' smallest free memory, planned on their bands); rank 0 saves the results to argv[1]."""
import sys

import torch
import torch.distributed as dist

from helpers import tiny_pipeline

dist.init_process_group("gloo")
x = torch.load(sys.argv[2])
model = tiny_pipeline(seed=3)
model.enable_tiling(tile_size=16, parallel=True)
with torch.no_grad():
    z = model.encode(x, sample_posterior=False)
    y = model.decode(z, num_frames=x.shape[2])
    model.enable_tiling(tile_size=16, parallel=True, max_memory="auto")
    y_auto = model.decode(z, num_frames=x.shape[2])
plans = [p for m in model.modules() for p in getattr(m, "_tiling_plans", {}).values()]
assert plans and all(p.path == "exact" for p in plans), plans
if dist.get_rank() == 0:
    torch.save({"z": z, "y": y, "y_auto": y_auto}, sys.argv[1])
dist.destroy_process_group()
