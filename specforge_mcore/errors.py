"""Errors meant for the user: the CLI prints their message (one line, no traceback) and exits 2.

Raise them where the cause is the user's input (a file, a value, a layout) and name the file, the value
and what was expected. Bugs stay ordinary exceptions, so their tracebacks are kept.
"""


class UserError(Exception):
    """Bad input from the user: a config, a file, a layout, a checkpoint that does not fit."""


class BadSampleError(UserError):
    """A training sample that cannot be used, raised under ``on_bad_sample=error``."""
