"""The errors that the CLI turns into one-line messages with exit code 2.

Each is a user mistake, not a bug: the message says what is wrong and what to change. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "GigasidError", "InputError", "WeightsNotFoundError"]


class GigasidError(Exception):
    """Base of the user-facing errors; its message is one line."""


class InputError(GigasidError, ValueError):
    """A bad input or output path or file: missing, unreadable, wrong format, not writable."""


class ConfigError(GigasidError, ValueError):
    """A bad setting: an unknown key, an out-of-range value, an unknown variant name."""


class WeightsNotFoundError(InputError):
    """Model weights (a VAE's) absent from the folder or local cache named: nothing is downloaded."""
