"""What every stage script shares: a user's mistake is one clear line, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from ddpm.errors import PipelineError
from ddpm.params import ParamsError


def run(main: Callable[[], None]) -> None:
    """Call a stage's main(); a PipelineError prints `error: ...` and exits 1 (2 for params)."""
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ParamsError) else 1) from None
