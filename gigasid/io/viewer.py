"""``gigasid view``: a local web page that pans and zooms a DeepZoom export or a job store.

A small threaded HTTP server (stdlib ``http.server``) bound to 127.0.0.1 only serves

    /                                   the page: OpenSeadragon with ``drawer: "canvas"``
    /openseadragon/...                  the vendored OpenSeadragon (``viewer_static/``, BSD-3-Clause)
    /image.dzi                          the DeepZoom descriptor
    /image_files/<level>/<col>_<row>.<format>   one tile

from one of two sources: a ``.dzi`` export (its descriptor and ``NAME_files/`` read as they are), or
a finished job store, whose tiles are cut on demand from its output pyramid (built first if it is
missing) with the DeepZoom exporter's own functions, so what the page shows is what ``gigasid
export STORE OUT.dzi`` would write. Nothing else on disk is reachable: URLs are parsed into
(level, col, row) numbers, never joined onto paths.

The page marks when the image is fully drawn (OpenSeadragon's ``fully-loaded-change`` on the
image): ``document.title`` becomes "gigasid: loaded" and ``body[data-loaded]`` "true" ("gigasid:
failed" if the image cannot be opened). Tests and scripts wait for that in a headless browser.

Not here: writing exports (``gigasid.io.exporters``) or argument parsing (``gigasid.cli``).
"""

from __future__ import annotations

import html
import re
import sys
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.etree import ElementTree

from gigasid.errors import GigasidError, InputError
from gigasid.io.exporters.deepzoom import descriptor, encode_tile, files_folder, max_level, tile_pixels

__all__ = ["DeepZoomFolder", "StoreTiles", "make_server", "open_source", "serve"]

STATIC = Path(__file__).resolve().parent / "viewer_static" / "openseadragon"
TILE_SIZE, OVERLAP, QUALITY = 256, 1, 90  # tiles served from a store: those of a default export
# at most 9 digits each: a longer number is no tile of any image (and int() of thousands of digits
# raises), so such a URL is simply not found
_TILE_URL = re.compile(r"^/image_files/(\d{1,9})/(\d{1,9})_(\d{1,9})\.(jpeg|png)$")
_TYPES = {".js": "text/javascript", ".png": "image/png", ".jpeg": "image/jpeg", ".txt": "text/plain"}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gigasid: loading {name}</title>
<style>
  html, body {{ margin: 0; height: 100%; overflow: hidden; background: #202020; }}
  #viewer {{ width: 100vw; height: 100vh; }}
</style>
</head>
<body data-loaded="false">
<div id="viewer"></div>
<script src="/openseadragon/openseadragon.min.js"></script>
<script>
  const viewer = OpenSeadragon({{
    id: "viewer",
    prefixUrl: "/openseadragon/images/",
    tileSources: "/image.dzi",
    drawer: "canvas",
    showNavigator: true,
  }});
  function loaded() {{
    document.title = "gigasid: loaded";
    document.body.dataset.loaded = "true";
  }}
  viewer.addHandler("open", function () {{
    const image = viewer.world.getItemAt(0);
    if (image.getFullyLoaded()) {{
      loaded();
    }} else {{
      image.addHandler("fully-loaded-change", function (event) {{
        if (event.fullyLoaded) loaded();
      }});
    }}
  }});
  viewer.addHandler("open-failed", function () {{
    document.title = "gigasid: failed";
    document.body.dataset.loaded = "failed";
  }});
</script>
</body>
</html>
"""


class DeepZoomFolder:
    """A ``.dzi`` export on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.files = files_folder(path)
        try:
            root = ElementTree.parse(path).getroot()
        except (ElementTree.ParseError, OSError) as error:
            raise InputError(f"cannot read {path} as a DeepZoom descriptor: {error}") from None
        if not root.tag.endswith("Image") or root.find("{*}Size") is None:
            raise InputError(f"{path} is not a DeepZoom descriptor (no <Image> with a <Size>)")
        self.format = root.get("Format", "jpeg")
        if not self.files.is_dir():
            raise InputError(f"{path} has no tile folder {self.files.name}; export it again")
        self.name = path.name

    def descriptor(self) -> bytes:
        return self.path.read_bytes()

    def tile(self, level: int, col: int, row: int, extension: str) -> bytes | None:
        tile = self.files / str(level) / f"{col}_{row}.{extension}"
        return tile.read_bytes() if extension == self.format and tile.is_file() else None


class StoreTiles:
    """The DeepZoom tiles of a finished job store, cut from its output pyramid on request."""

    def __init__(self, path: Path, log=print):
        from gigasid.io.exporters import store_errors
        from gigasid.io.output_pyramid import ensure_output_pyramid, open_finished_store
        from gigasid.io.store_check import check_store

        store = open_finished_store(path)
        with store_errors(store):
            self.levels = ensure_output_pyramid(store, progress=lambda k, n: log(f"output pyramid: level {k}/{n} built"))
        report = check_store(store, output_only=True)  # every served tile is cut from these chunks
        if not report.ok:
            raise report.error()
        _, self.height, self.width = self.levels[0].shape
        self.top = max_level(self.height, self.width)
        self.format = "jpeg"
        self.name = path.name

    def descriptor(self) -> bytes:
        return descriptor(self.height, self.width, TILE_SIZE, OVERLAP, self.format).encode()

    def tile(self, level: int, col: int, row: int, extension: str) -> bytes | None:
        if extension != self.format or level > self.top:
            return None
        pyramid_level = self.levels[self.top - level]
        _, height, width = pyramid_level.shape
        if col * TILE_SIZE >= width or row * TILE_SIZE >= height:
            return None
        return encode_tile(tile_pixels(pyramid_level, col, row, TILE_SIZE, OVERLAP), self.format, QUALITY)


def open_source(path: str | Path, log=print) -> DeepZoomFolder | StoreTiles:
    """What ``gigasid view PATH`` shows: a ``.dzi`` file or a job store folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a .dzi export or a gigasid job store")
    if path.is_file() and path.suffix.lower() == ".dzi":
        return DeepZoomFolder(path)
    if path.is_dir() and (path / "zarr.json").is_file():
        return StoreTiles(path, log)
    raise InputError(
        f"gigasid view shows a DeepZoom .dzi export or a gigasid job store (.zarr folder); {path} is neither"
    )


class _Handler(BaseHTTPRequestHandler):
    source: DeepZoomFolder | StoreTiles  # set on the subclass made by make_server
    server_version = "gigasid-view"

    def do_GET(self) -> None:
        route = self.path.split("?", 1)[0]
        if route in ("/", "/index.html"):
            page = PAGE.format(name=html.escape(self.source.name))
            return self._send(page.encode(), "text/html; charset=utf-8")
        if route == "/image.dzi":
            return self._send(self.source.descriptor(), "application/xml")
        match = _TILE_URL.match(route)
        if match:
            level, col, row = (int(match.group(i)) for i in (1, 2, 3))
            try:
                body = self.source.tile(level, col, row, match.group(4))
            except GigasidError as error:  # a chunk damaged since the server started: say so, once a tile
                sys.stderr.write(f"gigasid view: error: {error}\n")
                return self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "damaged tile: see the terminal")
            if body is not None:
                return self._send(body, f"image/{match.group(4)}")
        elif route.startswith("/openseadragon/"):
            name = route[len("/openseadragon/") :]
            # only the files vendored beside this module, named plainly
            if re.fullmatch(r"(images/)?[A-Za-z0-9_.-]+", name) and ".." not in name:
                static = STATIC / name
                if static.is_file():
                    return self._send(static.read_bytes(), _TYPES.get(static.suffix, "application/octet-stream"))
        self.send_error(HTTPStatus.NOT_FOUND)

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # another image may be served at the same URL after a restart on the same port
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per tile would drown the URL; errors still reach stderr via log_error

    def log_error(self, format: str, *args) -> None:
        if args and str(args[0]).startswith("404"):
            return  # a browser asking for a favicon or a source map is not worth a line
        sys.stderr.write(f"gigasid view: {format % args}\n")


def make_server(source: DeepZoomFolder | StoreTiles, port: int = 0) -> ThreadingHTTPServer:
    """A server for ``source`` on 127.0.0.1:``port`` (0: any free port), not yet serving."""
    handler = type("Handler", (_Handler,), {"source": source})
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise InputError(f"cannot listen on 127.0.0.1:{port} ({error.strerror}); choose another --port, or 0 for any free one") from None
    server.daemon_threads = True
    return server


def serve(path: str | Path, port: int = 0, *, open_browser: bool = False, log=print) -> None:
    """Serve ``path`` until Ctrl-C, printing the URL; returns normally when stopped."""
    source = open_source(path, log)
    server = make_server(source, port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:  # a Ctrl-C as soon as the URL is out also stops cleanly
        log(f"serving {path} at {url}  (Ctrl-C to stop)")
        if open_browser:
            webbrowser.open(url)
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
