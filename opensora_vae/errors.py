"""User errors and how the command-line entry points report them: one line, a non-zero exit, no traceback."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

DEBUG_ENV = "OPENSORA_VAE_DEBUG"


class UserError(ValueError):
    """A mistake in what the user gave (config, flag, path, data): reported in one line, no traceback.
    `exit_code` 2 for usage errors (config, flags), 1 for what a run met (a file, a checkpoint, a bad loss)."""

    exit_code = 2


class RunError(UserError):
    exit_code = 1


class MissingFileError(FileNotFoundError):
    """A file named on the command line (config, CSV) is not there: a usage error."""

    exit_code = 2


# What a job meets that the user can fix: our own checks (UserError, and the ValueErrors the data, model and
# metric code raise for bad input), files, folders, permissions. Other exceptions are bugs: traceback.
USER_EXCEPTIONS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug_requested(argv: Optional[Sequence[str]]) -> bool:
    return "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program that Ctrl-C ended


def _report(message: str) -> None:
    """`error: message` on one line, once per job (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        logging.shutdown()
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """main(argv) with user errors printed as `error: ...` once per job (rank 0 under torchrun) and turned into
    an exit code; `--debug` or OPENSORA_VAE_DEBUG=1 re-raises them with the traceback. A Ctrl-C that reaches here
    (SIGINT outside a job's `stop_signals`, or before it installs them) ends in one line too, exit 130."""
    try:
        return int(main(argv) or 0)
    except USER_EXCEPTIONS as err:
        if debug_requested(argv):
            raise
        _report(str(err) or type(err).__name__)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        if debug_requested(argv):
            raise
        _report("interrupted (Ctrl-C, SIGINT)")
        return EXIT_INTERRUPTED
