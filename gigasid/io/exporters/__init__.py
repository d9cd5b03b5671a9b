"""Exports of a finished job store into files other tools open, chosen by the output's name.

=================  ========================================================================
``.tif``, ``.ome.tif``  pyramidal tiled OME BigTIFF (``tiff``): JPEG, zstd, deflate or none
``.dzi``           DeepZoom descriptor + ``NAME_files/`` tiles (``deepzoom``): JPEG or PNG
``.ome.zarr``      OME-Zarr NGFF 0.5 multiscales (``ome_zarr``): zstd, deflate or none
``.png``, ``.jpg`` the whole image or a ``--preview`` (``flat``)
=================  ========================================================================

:func:`export` is the one entry point: it checks the options and the destination, opens the store
(refusing an unfinished job), checks the image fits the format, builds the store's output pyramid
if it is not there yet (``gigasid.io.output_pyramid``; shared by every exporter and the viewer) and
streams the chosen exporter's output into place atomically (a damaged chunk of the store is
reported with all the others, a full disk as one line: :func:`store_errors`; temporaries that
killed exports of the same name left are removed first). :func:`check_export` does the first two
checks alone, so that ``gigasid generate --export`` can fail before the job runs. Every user
mistake raises a :class:`~gigasid.errors.GigasidError` with a one-line message.

Not here: the command line (``gigasid.cli``) or serving tiles to a browser (``gigasid.io.viewer``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gigasid.errors import InputError, StoreDamagedError
from gigasid.io.disk import disk_full, is_disk_full
from gigasid.io.exporters.base import COMPRESSIONS, Exporter, ExportOptions, Log
from gigasid.io.exporters.deepzoom import DeepZoomExporter
from gigasid.io.exporters.files import remove_stale_siblings
from gigasid.io.exporters.flat import JpegExporter, PngExporter
from gigasid.io.exporters.ome_zarr import OmeZarrExporter
from gigasid.io.exporters.tiff import TiffExporter

__all__ = [
    "COMPRESSIONS",
    "EXPORTERS",
    "ExportOptions",
    "ExportReport",
    "Exporter",
    "check_export",
    "export",
    "exporter_for",
    "store_errors",
]

EXPORTERS: tuple[Exporter, ...] = (TiffExporter(), DeepZoomExporter(), OmeZarrExporter(), PngExporter(), JpegExporter())


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    resolutions: list[tuple[int, int]]  # (rows, cols) of each resolution written, largest first
    pyramid_seconds: float  # building the store's output pyramid (0 when it was there)
    seconds: float  # writing the export


def exporter_for(path: str | os.PathLike[str]) -> Exporter:
    """The exporter of a file name's ending (longest match: ``.ome.tif`` before ``.tif``)."""
    name = Path(path).name.lower()
    endings = sorted(((suffix, exporter) for exporter in EXPORTERS for suffix in exporter.suffixes), key=lambda p: -len(p[0]))
    for suffix, exporter in endings:
        if name.endswith(suffix) and len(name) > len(suffix):
            return exporter
    shown = "".join(Path(path).suffixes[-2:]) or "no extension"
    valid = ", ".join(sorted({suffix for suffix, _ in endings}))
    raise InputError(f"cannot export to {path}: {shown} is not an export format; end the name in one of {valid}")


def check_export(
    output: str | os.PathLike[str], options: ExportOptions | None = None
) -> tuple[Exporter, ExportOptions]:
    """Raise unless ``output`` names a known format, the options suit it and it can be written."""
    output = Path(output)
    exporter = exporter_for(output)
    settings = exporter.settings(options or ExportOptions())
    exporter.check_destination(output)
    return exporter, settings


def export(
    store_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    log: Log = lambda message: None,
) -> ExportReport:
    """Write the finished image of the job store at ``store_path`` to ``output`` (format by name)."""
    from gigasid.io.output_pyramid import ensure_output_pyramid, open_finished_store

    output = Path(output)
    exporter, settings = check_export(output, options)
    resolved_store = Path(store_path).resolve()
    for target in exporter.outputs(output):
        if target.resolve() == resolved_store or resolved_store in target.resolve().parents:
            raise InputError(f"cannot export to {target}: it is the job store itself or inside it; choose another path")
    store = open_finished_store(store_path)
    exporter.check_image(tuple(store.array("output").shape), settings)
    for target in exporter.outputs(output):  # what killed exports of this name left behind
        remove_stale_siblings(target)
    started = time.perf_counter()
    built = []

    def level_built(level: int, count: int) -> None:
        built.append(level)
        log(f"output pyramid: level {level}/{count} built")

    with store_errors(store, output):
        levels = ensure_output_pyramid(store, progress=level_built)
        # 0 when the pyramid was already there (not a timing: a loaded machine must not make it look built)
        pyramid_seconds = time.perf_counter() - started if built else 0.0
        started = time.perf_counter()
        resolutions = exporter.write(levels, output, settings, log)
    return ExportReport(output, exporter.name, resolutions, pyramid_seconds, time.perf_counter() - started)


@contextmanager
def store_errors(store, output: Path | None = None) -> Iterator[None]:
    """Reading a finished store's image: a damaged chunk is reported with every other damaged one
    of the output and its pyramid (read back in full only then), and a full disk as one line."""
    from gigasid.io.store_check import check_store

    try:
        yield
    except StoreDamagedError as error:
        report = check_store(store, output_only=True)
        raise (report.error() if not report.ok else error) from None
    except Exception as error:
        if not is_disk_full(error):
            raise
        where = store.path if output is None else (output.parent if str(output.parent) else Path("."))
        raise disk_full(where) from None
