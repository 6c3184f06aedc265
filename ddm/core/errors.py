"""The one exception type users see.

Anything raised as `DDMError` is bad input or a refused operation: the CLI prints its message on one line and
exits non-zero without a traceback. Everything else is a bug and keeps its traceback.
"""


class DDMError(Exception):
    """A user-facing error with a one-line message naming the problem."""
