"""The one error type for user mistakes.

A `FedPeftError` carries one sentence that says what to change; the CLI prints it and exits 2
without a traceback. Programming errors stay ordinary exceptions.
"""


class FedPeftError(Exception):
    """A user mistake or an unusable environment, explained in one sentence."""
