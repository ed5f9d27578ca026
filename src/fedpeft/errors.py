"""The error types a user sees.

A `FedPeftError` carries one sentence that says what to change; the CLI prints it and exits 2
without a traceback. A `RunFailed` is a run that started and could not go on (every client of a
round failed, or every update of a round was rejected): the CLI prints it the same way and exits 1,
and the run folder keeps every round finished before it. Programming errors stay ordinary exceptions.
"""


class FedPeftError(Exception):
    """A user mistake or an unusable environment, explained in one sentence."""


class RunFailed(FedPeftError):
    """A run that cannot go on; its folder holds the last finished round (resume after fixing the cause)."""
