"""The errors a user can act on. Each prints as one line (`corral: error: ...`) with exit status 2.

Every stage raises these for bad input, and only these: the CLI (and `train.py`) catch
`CorralError` and print its message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class CorralError(Exception):
    """Base of the user-facing errors: the message alone tells what is wrong and where."""


class UsageError(CorralError):
    """A problem with what the user asked for (arguments, paths, a combination of options)."""


class ConfigError(CorralError, ValueError):
    """A config file or override is invalid; the message names the source and the key."""


class ModelNotFoundError(CorralError, RuntimeError):
    """A model name could not be resolved to weights."""


class RunDirError(CorralError):
    """A run directory (or a merged export) is missing a file or holds an invalid one."""


class RecordError(CorralError, ValueError):
    """A data file is malformed; the message says where (file, record, field) and what."""

    def __init__(
        self,
        path: str | os.PathLike,
        message: str,
        *,
        line: int | None = None,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.index = index
        self.field = field
        self.reason = message
        where = [self.path]
        if line is not None:
            where.append(f"line {line}")
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}")
