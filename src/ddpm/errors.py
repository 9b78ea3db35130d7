"""The root of the errors a user can fix: stages print their message, not a traceback."""


class PipelineError(Exception):
    """Bad input, a missing prerequisite or a failed run; the message names it and what to do."""


class Interrupted(PipelineError):
    """Ctrl-C: the message says where the stage stopped and how to go on (exit code 130)."""


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on (a non-finite loss, out of memory); says what to change."""
