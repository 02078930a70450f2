"""The package's own error class for the user's environment, and which errors are the user's.

``domlora`` reports a user's mistake as one ``error:`` line and exit status 2
(:data:`USER_ERRORS`): a ``ValueError`` (bad argument or data; a ``TypeError`` of the API is a
programming error and is not here), a missing or unusable file (``FileNotFoundError``,
``FileExistsError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``), a
:class:`MissingExtraError`, or a ``FloatingPointError`` (the probe met NaN or inf: the model's
weights or activations overflow, which the message says how to avoid). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class MissingExtraError(ImportError):
    """An optional dependency that one feature needs is not installed; the message says what to install.

    A subclass of ``ImportError``, so ``except ImportError`` still catches it; a plain
    ``ImportError`` elsewhere (a broken install, a typo in an import) is a bug, not this.
    """


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
               MissingExtraError, FloatingPointError)
