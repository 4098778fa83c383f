"""User-facing errors.

A :class:`UserError` is bad input or bad configuration: the command line prints its message on
one line (``error: <file>: <problem>``) and exits with status 2. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or configuration. The message must name the file or key and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
