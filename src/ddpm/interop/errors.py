"""The one error of ddpm.interop: every problem with a file, a folder or a model is one line."""
from __future__ import annotations

from ddpm.errors import PipelineError


class InteropError(PipelineError, ValueError):
    """A file or folder of another format that cannot be read, or a model it cannot hold; the
    message names the file, the key and the value."""
