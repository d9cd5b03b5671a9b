"""The errors that the CLI turns into one-line messages with exit code 2.

Each is a user mistake, not a bug: the message says what is wrong and what to change. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "GigasidError", "InputError", "StoreDamagedError", "WeightsNotFoundError"]


class GigasidError(Exception):
    """Base of the user-facing errors; its message is one line."""


class InputError(GigasidError, ValueError):
    """A bad input or output path or file: missing, unreadable, wrong format, not writable."""


class ConfigError(GigasidError, ValueError):
    """A bad setting: an unknown key, an out-of-range value, an unknown variant name."""


class WeightsNotFoundError(InputError):
    """Model weights (a VAE's) absent from the folder or local cache named: nothing is downloaded."""


class StoreDamagedError(InputError):
    """Chunks of a job store that its done-grids claim are missing or fail their checksum.

    ``store`` is the store's path and ``damaged`` the chunk keys (relative to it), so that a caller
    can list them; the message names the first few and says that ``gigasid resume`` repairs them
    (``repairable`` False: data that only the source image can give back, such as the reference).
    """

    def __init__(self, store: str, damaged: list[str], *, repairable: bool = True, reason: str = "missing or corrupt"):
        self.store, self.damaged, self.repairable, self.reason = str(store), list(damaged), repairable, reason
        shown = ", ".join(self.damaged[:3]) + (f" and {len(self.damaged) - 3} more" if len(self.damaged) > 3 else "")
        count = f"{len(self.damaged)} file{'s' if len(self.damaged) != 1 else ''}"
        if repairable:
            advice = f"`gigasid resume {self.store}` recomputes them"
        else:
            advice = "they cannot be recomputed from the store: run the job again from its source image"
        super().__init__(f"{self.store} is damaged: {count} {reason}: {shown}; {advice}")

    def __reduce__(self):  # raised in worker processes and sent back to the driver
        return (_rebuild_damaged, (self.store, self.damaged, self.repairable, self.reason))


def _rebuild_damaged(store, damaged, repairable, reason):
    return StoreDamagedError(store, damaged, repairable=repairable, reason=reason)
