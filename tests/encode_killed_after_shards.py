"""scripts/encode_latents.py with every rank SIGKILLed right after it has renamed its N-th shard (N: first argument);
tests launch it under torchrun to interrupt an encode job at a known point."""
import os
import runpy
import signal
import sys
from pathlib import Path

from opensora_vae.encode import ShardWriter

limit = int(sys.argv.pop(1))
flush = ShardWriter.flush


def flush_then_die(self) -> None:
    flush(self)
    if self.shards >= limit:
        os.kill(os.getpid(), signal.SIGKILL)


ShardWriter.flush = flush_then_die
runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "encode_latents.py"), run_name="__main__")
