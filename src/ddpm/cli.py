"""What every stage script shares: a user's mistake is one clear line, not a traceback; SIGTERM
stops a stage as Ctrl-C does."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from ddpm.errors import ParamsError, PipelineError, Terminated, exit_code
from ddpm.files import NO_SPACE

PR_SET_PDEATHSIG = 1  # prctl(2)
_where: Callable[[], str | None] | None = None  # what an interrupt says (on_interrupt)


def on_interrupt(where: Callable[[], str | None]) -> None:
    """From now on, an interrupt ends the stage with the line `<stage>: interrupted<where()>`,
    which says where it stopped and how to go on; where() returns None in processes that stay
    quiet (all but the main one)."""
    global _where
    _where = where


def run(main: Callable[[], None]) -> None:
    """Call a stage's main(); a PipelineError prints `error: ...` and exits 1 (2 for params).

    Ctrl-C and SIGTERM (raised as Terminated, a KeyboardInterrupt) print one line, not a
    traceback, and exit as a shell reports a process stopped by that signal: 130 and 143. This
    is the one place that turns an interrupt into that line.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if "DVC_STAGE" in os.environ:
            stop_with_parent()
        main()
    except KeyboardInterrupt as e:
        where = _where() if _where else "; run the same command again to redo this stage"
        if where is not None:
            print(f"{Path(sys.argv[0]).stem}: interrupted{where}", file=sys.stderr)
        raise SystemExit(exit_code(e)) from None
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ParamsError) else 1) from None
    except OSError as e:  # ddpm.files names the file it could not write; this is any other write
        if e.errno not in NO_SPACE:
            raise
        print(f"error: the disk is full ({e.filename or e.strerror}); free some space and run "
              "the same command again", file=sys.stderr)
        raise SystemExit(1) from None


def _terminate(signum: int, frame: object) -> None:
    # One stop: a second SIGTERM must not break into the handling of the first (a launcher
    # and `timeout` may both send one). SIGKILL remains for a stop that hangs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def stop_with_parent() -> None:
    """Under `dvc repro` or `dvc exp run`: SIGTERM this stage when DVC's process ends.

    DVC has no SIGTERM handler: `kill <dvc's pid>` ends DVC and leaves its stage running,
    orphaned, writing outputs that no dvc.lock will record. Linux only; elsewhere nothing."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError, TypeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
