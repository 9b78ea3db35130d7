"""The root of the errors a user can fix: stages print their message, not a traceback."""


class PipelineError(Exception):
    """Bad input, a missing prerequisite or a failed run; the message names it and what to do."""


class ParamsError(PipelineError, ValueError):
    """A params.yaml value that cannot work here; names the key and what is accepted (exit 2)."""


class Interrupted(PipelineError):
    """Ctrl-C: the message says where the stage stopped and how to go on (exit code 130)."""


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (a non-finite loss, out of memory); says what to change."""
