"""The disk under gigasid's outputs: free space before a job, a full disk during one, and the
hidden temporaries a killed run leaves behind.

* :func:`check_free_space` refuses, before anything is computed, a job or export whose estimate
  does not fit the free space of the disk it writes to (``--force`` starts it anyway).
* :func:`is_disk_full` / :func:`disk_full` recognise "no space left" however it arrives (an
  ``OSError`` from Python, or the text of a FAISS or libvips error) and turn it into one line naming
  the disk; callers remove their temporaries before raising it.
* :func:`owner_tag` goes into the name of every hidden temporary gigasid writes (``.gigasid-…``
  scratch folders, ``.NAME.<id>.<tag>`` export temporaries), and :func:`remove_stale` deletes the
  ones whose process is dead (same host): a kill -9 runs no clean-up, the next run does it.

Not here: what is written (``gigasid.io.exporters``, ``gigasid.io.store``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import zlib
from pathlib import Path

from gigasid.errors import InputError

__all__ = [
    "check_free_space", "disk_full", "free_bytes", "is_disk_full", "owner_tag", "pid_alive", "remove_stale",
]

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\[Errno 28\]|errno 28", re.IGNORECASE)
# "<host hash>-<pid>" inside a temporary's name (see owner_tag)
_OWNER = re.compile(r"(?:^|[.-])g([0-9a-f]{6})-(\d+)(?:[.-]|$)")


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFF:06x}"


def owner_tag() -> str:
    """``g<host hash>-<pid>``: which process (on which host) a temporary belongs to."""
    return f"g{_host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` of this host alive (or not ours to signal, which means alive)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# what gigasid 0.1 named its temporaries, before the owner went into the name: exports'
# ``.NAME.<12 hex>.tmp…``/``.old`` and image outputs' scratch ``.gigasid-<8 random>``; taken as
# stale only when untouched for a day
_UNOWNED_EXPORT = re.compile(r"\.[0-9a-f]{12}\.(tmp|old)")
_UNOWNED_SCRATCH = re.compile(r"\.gigasid-[a-z0-9_]{8}")
UNOWNED_AGE = 24 * 3600


def is_stale(name: str) -> bool:
    """A temporary of a dead gigasid process on this host (never one of a live or remote one)."""
    match = _OWNER.search(name)
    return bool(match) and match.group(1) == _host() and not pid_alive(int(match.group(2)))


def _unowned_and_old(entry: Path, prefix: str) -> bool:
    legacy = _UNOWNED_SCRATCH.fullmatch(entry.name) or _UNOWNED_EXPORT.match(entry.name[len(prefix) - 1 :])
    if _OWNER.search(entry.name) or not legacy:
        return False
    try:
        return time.time() - entry.lstat().st_mtime > UNOWNED_AGE
    except OSError:
        return False


def remove_stale(folder: Path, prefix: str) -> int:
    """Delete the hidden entries of ``folder`` starting with ``prefix`` whose owner is dead (or,
    for the owner-less names of earlier versions, untouched for a day); returns how many. Only
    names gigasid makes match (:func:`owner_tag`)."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.startswith(".")):
            continue
        if is_stale(entry.name) or _unowned_and_old(entry, prefix):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def free_bytes(folder: str | os.PathLike[str]) -> int:
    """Free bytes for an unprivileged writer on the disk holding ``folder`` (or its nearest
    existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _size(nbytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.0f} KiB"


def check_free_space(folder: str | os.PathLike[str], needed: int, *, force: bool, what: str) -> None:
    """Refuse (unless ``force``) to start writing ``needed`` bytes where fewer are free."""
    folder = Path(folder) if str(folder) else Path(".")
    free = free_bytes(folder)
    if needed > free and not force:
        raise InputError(
            f"{what} needs up to {_size(needed)} but the disk holding {folder} has {_size(free)} free; "
            "free some space, write elsewhere, or pass --force to start anyway"
        )


def is_disk_full(error: BaseException) -> bool:
    """Does ``error`` (or what caused it) say the disk is full?"""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full(folder: str | os.PathLike[str], advice: str | None = None) -> InputError:
    """The one-line error for a full disk under ``folder``; ``advice`` replaces the default (what
    was being written is gone: free space and run the command again)."""
    folder = Path(folder) if str(folder) else Path(".")
    try:
        free = f" ({_size(free_bytes(folder))} free)"
    except OSError:
        free = ""
    advice = advice or (
        "what was being written has been removed: free some space or write elsewhere, then run the command again"
    )
    return InputError(f"the disk holding {folder} is full{free}: no space left to write; {advice}")
