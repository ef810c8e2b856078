"""User-facing errors: the CLI prints them on one line and exits with status 2."""
from __future__ import annotations


class CompressKitError(Exception):
    """Base class of every error a user can fix by changing their input."""


class ConfigError(CompressKitError):
    """A recipe or argument is invalid; the message names the field path, the value and what is allowed."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)
