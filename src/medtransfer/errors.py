"""User-facing errors.

Every error a user can fix (bad input, bad configuration, a missing file) is a `UserError`. The CLI prints its
message as one line on stderr and exits with code 2, without a traceback. Messages say what is wrong, where
(which file or key) and how to fix it.
"""

from __future__ import annotations


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


def warn(message: str) -> None:
    """A one-line warning on stderr: something was skipped or looks odd, but the step goes on."""
    import sys

    print(f"medtransfer: warning: {message}".replace("\n", " "), file=sys.stderr)
