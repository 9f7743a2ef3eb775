"""The one error of the experiment loader."""

from __future__ import annotations

from socklab.errors import UsageError


class ConfigError(UsageError):
    """A bad experiment file or override; the message is the sentence to show.

    ``filename``, ``line`` (None when the value came from ``--set``) and ``key``
    (the dotted key as shown) are kept for callers and tests.
    """

    def __init__(self, message: str, *, filename: str | None = None,
                 line: int | None = None, key: str | None = None):
        super().__init__(message)
        self.filename = filename
        self.line = line
        self.key = key
