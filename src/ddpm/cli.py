"""What every stage script shares: a user's mistake is one clear line, not a traceback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from ddpm.errors import Interrupted, ParamsError, PipelineError


def run(main: Callable[[], None]) -> None:
    """Call a stage's main(); a PipelineError prints `error: ...` and exits 1 (2 for params);
    Ctrl-C prints one line, not a traceback, and exits 130 (128 + SIGINT) as a shell does."""
    try:
        main()
    except Interrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        stage = Path(sys.argv[0]).stem
        print(f"{stage}: interrupted; run the same command again to redo this stage",
              file=sys.stderr)
        raise SystemExit(130) from None
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ParamsError) else 1) from None
