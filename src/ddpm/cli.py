"""What every stage script shares: a user's mistake is one clear line, not a traceback; SIGTERM
stops a stage as Ctrl-C does."""
from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from ddpm.errors import ParamsError, PipelineError, Terminated, exit_code
from ddpm.files import NO_SPACE, TEMPORARY

PR_SET_PDEATHSIG = 1  # prctl(2)
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}  # that DVC may run a stage with
_where: Callable[[], str | None] | None = None  # what an interrupt says (on_interrupt)
RERAISE = 1.0  # seconds between raisings of a SIGTERM until run() has caught one
_raised = False  # a SIGTERM was raised as Terminated
_stopping = False  # run() caught the interrupt and is handling it
_done: str | None = None  # what the stage made, once its work is done (done())


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
    signal.signal(signal.SIGALRM, _terminate)
    sys.unraisablehook = _unraisable
    try:
        if "DVC_STAGE" in os.environ:
            stop_with_parent()
        main()
    except KeyboardInterrupt as e:
        caught()
        where = _where() if _where else "; run the same command again to redo this stage"
        if where is not None:
            print(f"{Path(sys.argv[0]).stem}: interrupted{where}", file=sys.stderr)
        raise SystemExit(exit_code(e)) from None
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ParamsError) else 1) from None
    except OSError as e:  # ddpm.files names a file a full disk kept; this is any other read/write
        if e.errno in NO_SPACE:
            print(f"error: the disk is full ({e.filename or e.strerror}); free some space and run "
                  "the same command again", file=sys.stderr)
        elif e.filename is not None:  # a file or folder the stage could not read or write
            print(f"error: {cannot(e)}", file=sys.stderr)
        else:  # no file named: not the user's to fix, the traceback is what helps
            raise
        raise SystemExit(1) from None


def done(what: str) -> None:
    """The stage's work is done: `what` says what it made and where (e.g. "12 images in
    data/samples"), and a file that cannot be written from now on (a metrics file in a read-only
    folder) is reported with it, so that the user knows what is there and what is missing."""
    global _done
    _done = what


def cannot(error: OSError) -> str:
    """The one line for an OSError that names a file: the file (a temporary one of ddpm.files by
    the name it was to get), why, and what to do; after done(), what the stage had done."""
    path = Path(os.fsdecode(error.filename))
    if match := TEMPORARY.fullmatch(path.name):  # .<name>.<pid>.<random>.tmp
        path = path.parent / path.name[1:match.start(1) - 1]
    why = error.strerror or type(error).__name__
    if _done is None:
        return (f"{path}: {why}; check that path (that it exists as the file or folder meant, "
                "its permissions) and run the same command again")
    return (f"{Path(sys.argv[0]).stem}: {_done}, but {path} could not be written ({why}); make it "
            "writable (or choose another path) and run the same command again")


def _unraisable(unraisable) -> None:
    """Python's report of an exception it could not raise (in a weakref callback or a __del__),
    but for a Terminated: _terminate raises that again, so its report would only be a traceback
    before the stage's one line."""
    if not isinstance(unraisable.exc_value, Terminated):
        sys.__unraisablehook__(unraisable)


def caught() -> None:
    """The interrupt reached the code that handles it (run(), or a launcher that passes it on to
    its workers): raise it no more, and ignore further SIGTERMs, also while Python exits (it
    restores the default action of signals with a Python handler then, which a late SIGTERM
    would meet)."""
    global _stopping
    _stopping = True
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM, raised as Terminated where the stage is; and SIGALRM, which raises it again every
    RERAISE seconds until run() has caught it: an exception raised in a signal handler that lands
    in a weakref callback or a __del__ is printed by Python and swallowed ("Exception ignored
    in ..."), and the stage would run on. One stop: a second SIGTERM must not break into the
    handling of the first (a launcher and `timeout` may both send one); SIGKILL remains for a
    stop that hangs."""
    global _raised
    if _stopping or (_raised and signum == signal.SIGTERM):
        return
    _raised = True
    signal.setitimer(signal.ITIMER_REAL, RERAISE)
    raise Terminated


def stop_with_parent() -> None:
    """Under `dvc repro` or `dvc exp run`: SIGTERM this stage when DVC's process ends.

    DVC has no SIGTERM handler: `kill <dvc's pid>` ends DVC and leaves its stage running,
    orphaned, writing outputs that no dvc.lock will record. DVC starts a stage through
    `$SHELL -c`; bash execs the command, but /bin/sh (dash: DVC's shell where SHELL is unset, as
    in many CI containers and services) waits for it and outlives DVC, so then DVC, the shell's
    parent, is watched too. Linux only; elsewhere nothing."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError, TypeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    elif (shells_parent := parent_of_shell(parent)) is not None:
        stop_when_ended(shells_parent)


def parent_of_shell(pid: int) -> int | None:
    """The parent of process pid if pid is a shell running a `-c` command; otherwise None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if Path(os.fsdecode(argv[0])).name.lstrip("-") not in SHELLS or b"-c" not in argv[1:]:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, then ppid


def stop_when_ended(pid: int) -> None:
    """SIGTERM this process's main thread when process pid ends: a daemon thread waits on a
    pidfd (Linux 5.3+; on older kernels nothing is watched)."""
    main = threading.main_thread().ident
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # it has already ended
        signal.pthread_kill(main, signal.SIGTERM)
        return
    except (AttributeError, OSError):
        return

    def wait() -> None:
        select.select([pidfd], [], [])  # readable once the process has ended
        signal.pthread_kill(main, signal.SIGTERM)

    threading.Thread(target=wait, name=f"stop when {pid} ends", daemon=True).start()
