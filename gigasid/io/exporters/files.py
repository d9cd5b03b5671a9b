"""Writing an export so that nothing half-written ever looks complete.

Every exporter builds its output under a hidden temporary name in the destination's folder and
renames it into place only when it is whole (a rename within one filesystem is atomic). A failure,
Ctrl-C included, removes the temporary; a kill leaves only a hidden ``.NAME.<id>.<owner>.tmp``
behind, which the next export of that name removes (:func:`remove_stale_siblings`).
An existing output is replaced: a file by one ``os.replace``; a folder (DeepZoom tiles, OME-Zarr)
is moved aside, the new one renamed in, then the old one deleted.

Not here: what goes into the files (the exporter modules) or which existing folders may be replaced
(each exporter says; see ``gigasid.io.exporters``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gigasid.io.disk import owner_tag, remove_stale

__all__ = ["atomic_directory", "atomic_file", "hidden_sibling", "remove_stale_siblings"]


def hidden_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.<random>.<owner>.<tag>``, the owner naming this
    process (``gigasid.io.disk.owner_tag``) so that a later run can tell a dead one's leftovers."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{owner_tag()}.{tag}")


def remove_stale_siblings(path: Path) -> int:
    """Remove the temporaries of ``path`` that killed runs left (their process is dead)."""
    return remove_stale(path.parent if str(path.parent) else Path("."), f".{path.name}.")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file name to write; on success it replaces ``path``, else it is removed.

    The temporary keeps ``path``'s suffix so that writers choosing a format by name still work."""
    temporary = hidden_sibling(path, f"tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a new empty temporary folder to fill; on success it takes ``path``'s place (an existing
    ``path`` is moved aside, then deleted), else it is removed."""
    temporary = hidden_sibling(path, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        if os.path.lexists(path):
            old = hidden_sibling(path, "old")
            os.rename(path, old)
            try:
                os.rename(temporary, path)
            except BaseException:
                os.rename(old, path)  # put the previous export back rather than lose both
                raise
            _remove(old)
        else:
            os.rename(temporary, path)
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)
