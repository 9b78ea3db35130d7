"""The root of the errors a user can fix: stages print their message, not a traceback."""
from __future__ import annotations

import signal


class PipelineError(Exception):
    """Bad input, a missing prerequisite or a failed run; the message names it and what to do."""


class ParamsError(PipelineError, ValueError):
    """A params.yaml value that cannot work here; names the key and what is accepted (exit 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, Slurm, systemd), raised where the stage is as Ctrl-C raises
    KeyboardInterrupt, so that everything that handles Ctrl-C handles it alike (ddpm.cli)."""


def exit_code(interrupt: BaseException) -> int:
    """A shell's code for a process stopped by the signal: 128 + 15 for SIGTERM, 128 + 2 else."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
