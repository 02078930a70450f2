"""The package's own error class for the user's environment.

``domlora`` reports a user's mistake as one ``error:`` line and exit status 2: a ``ValueError``
(bad argument or data), a missing or unusable file (``FileNotFoundError``, ``PermissionError``,
``IsADirectoryError``, ``NotADirectoryError``), or a :class:`MissingExtraError`. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class MissingExtraError(ImportError):
    """An optional dependency that one feature needs is not installed; the message says what to install.

    A subclass of ``ImportError``, so ``except ImportError`` still catches it; a plain
    ``ImportError`` elsewhere (a broken install, a typo in an import) is a bug, not this.
    """
