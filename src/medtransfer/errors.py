"""User-facing errors.

Every error a user can fix (bad input, bad configuration, a missing file) is a `UserError`. The CLI prints its
message as one line on stderr and exits with code 2, without a traceback. Messages say what is wrong, where
(which file or key) and how to fix it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input or configuration; the CLI maps it to exit code 2."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(self.fix)
        return " -- ".join(part.replace("\n", " ") for part in parts)


class ConfigError(UserError):
    """params.yaml (or a profile) is missing, malformed, or has an unknown, missing or mistyped key."""


class DataError(UserError):
    """A dataset file is missing, unreadable, or its content is inconsistent."""


class ModelError(UserError):
    """A weights file, model artifact or registry entry is missing, malformed, or does not match its spec."""


class InputError(UserError):
    """A command-line input (a file given on the command line, an option value) is unusable."""


class EnvironmentFault(UserError):
    """The file system refused a read or write: permissions, a read-only mount, a full disk, a file in a folder's
    place. The user fixes the machine, not the input."""


# Environment faults can strike any step at any write, deep inside NumPy, MLflow or the atomic writers, so they are
# translated once, where the CLI catches errors, rather than at every write. Only OSErrors that name a path and
# whose errno blames the environment are translated; any other stays a traceback, since it may be a bug.
_ENVIRONMENT_FIXES = {
    errno.EACCES: "check the ownership and permissions of {folder} (or run as a user who may use it)",
    errno.EPERM: "check the ownership and permissions of {folder} (or run as a user who may use it)",
    errno.EROFS: "{folder} is on a read-only file system: point the path at a writable folder",
    errno.ENOSPC: "free some space on the disk holding {folder}",
    errno.EDQUOT: "free some space (disk quota) under {folder}",
    errno.EISDIR: "{path} is a folder where a file belongs: move it away",
    errno.ENOTDIR: "a part of {path} is a file where a folder belongs: move that file away",
    errno.EEXIST: "{path} is a file where a folder belongs: move it away",
    errno.ENAMETOOLONG: "use a shorter path",
}


def as_user_error(error: BaseException) -> UserError:
    """`error` itself when it is a UserError, its one-line translation when it is an environment fault; any other
    error is raised again unchanged."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_FIXES and error.filename:
        path = Path(os.fsdecode(error.filename))
        reason = (error.strerror or os.strerror(error.errno)).lower()
        return EnvironmentFault(f"cannot use {path}: {reason}",
                                fix=_ENVIRONMENT_FIXES[error.errno].format(path=path, folder=path.parent))
    raise error


def warn(message: str) -> None:
    """A one-line warning on stderr: something was skipped or looks odd, but the step goes on."""
    import sys

    print(f"medtransfer: warning: {message}".replace("\n", " "), file=sys.stderr)
