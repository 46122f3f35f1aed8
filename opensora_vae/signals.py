"""Stop signals: a scheduler's "checkpoint now and exit" (SLURM and Kubernetes send SIGTERM or SIGUSR1).

The handler only records the signal. The trainer checks it after every step (all ranks agree through one
all-reduce), writes a checkpoint at that step and exits with `EXIT_PREEMPTED`; inference and latent encoding finish
the current clip, write what they hold and exit the same way (a rerun continues). A second signal ends the process at
once. Duplicates within `DUPLICATE_S` seconds are one signal: when the whole process group is signalled, the
torchrun agent forwards the same signal to its workers right after they got it themselves.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from typing import Iterable, Optional, Tuple

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run stopped early with a checkpoint; rerun the same command to continue
DUPLICATE_S = 2.0


class StopSignals:
    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        self.signals = [signal.Signals[name] for name in self.names]
        self.received: Optional[Tuple[signal.Signals, float]] = None  # (signal, monotonic time)
        self._previous = {}

    def install(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received = (signal.Signals(signum), now)
        elif now - self.received[1] > DUPLICATE_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def name(self) -> Optional[str]:
        return self.received[0].name if self.received else None

    def seconds_since(self) -> float:
        return time.monotonic() - self.received[1] if self.received else 0.0

    def ignore(self) -> None:
        """Once the checkpoint is written: a late signal (the agent's forward) must not turn the exit into a crash."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


@contextlib.contextmanager
def blocked(names: Iterable[str]):
    """Hold the stop signals back while DataLoader processes start: they inherit the mask, so a signal cannot kill
    one before `ignore_in_worker` runs (torch's worker set-up makes SIGTERM fatal). Held signals arrive after."""
    sigs = {signal.Signals[name] for name in names}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def start_loader(loader, names: Iterable[str]):
    """`iter(loader)` with the stop signals held back while its processes start (see `blocked`)."""
    with blocked(names):
        return iter(loader)


def worker_init(names: Iterable[str]):
    """The DataLoader `worker_init_fn` that makes its processes ignore the stop signals."""
    return functools.partial(ignore_in_worker, tuple(names))


def ignore_in_worker(names: Tuple[str, ...], _worker_id: int) -> None:
    """DataLoader `worker_init_fn` (with functools.partial): data-loading processes ignore the stop signals
    (torchrun signals a worker's whole process group), so that the trainer, not a dead loader, decides when to
    stop. Started with them blocked (`blocked`); ignoring discards any held back."""
    sigs = {signal.Signals[name] for name in names}
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
