"""Errors a user can act on. The CLI prints them as one line (exit 2) instead of a traceback."""

from __future__ import annotations

from piaa_dist.config import ConfigError


class UserError(Exception):
    """Base for errors caused by input the user controls (files, URLs, flags)."""


class DataError(UserError):
    """Bad or missing data: names the file, row or shard and what is wrong."""


class StorageError(UserError):
    """A storage location cannot be read or written (after retries): names the URL."""


# ConfigError is a ValueError raised by the side-effect-free config parser; the CLI treats it
# as a user error too.
USER_ERRORS = (UserError, ConfigError)
