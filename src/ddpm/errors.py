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


class Interrupted(PipelineError):
    """Ctrl-C or SIGTERM: the message says where the stage stopped and how to go on; the exit
    code is the signal's (130 or 143)."""

    def __init__(self, message: str, interrupt: BaseException | None = None):
        super().__init__(message)
        self.code = exit_code(interrupt) if interrupt is not None else 128 + signal.SIGINT


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (a non-finite loss, out of memory); says what to change."""


class DiskFullError(PipelineError):
    """A file could not be written for lack of space; it names the file, which kept its old
    content (every output is replaced by a rename, ddpm.files)."""
