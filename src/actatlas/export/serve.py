"""A small static file server for an exported site: local only by default, no listings, no traversal."""

from __future__ import annotations

import mimetypes
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import UserError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".json": "application/json", ".png": "image/png"}


def resolve_request(root: Path, raw_path: str) -> Path | None:
    """The regular file under `root` that a request path names, or None (refused / not found).

    Refused: any ``..`` or ``.`` segment (also percent-encoded), encoded slashes or backslashes,
    backslashes, NUL, empty segments (``//x``), and anything whose real path (symlinks resolved)
    is outside the root. ``/`` means ``/index.html``; other directories are never listed.
    """
    path = urlsplit(raw_path).path
    low = path.lower()
    if not path.startswith("/") or "%2f" in low or "%5c" in low or "\\" in path or "%00" in low or "\x00" in path:
        return None
    text = unquote(path)
    if "\x00" in text or "\\" in text or "%" in text:
        return None  # double encoding such as %252e
    if text == "/":
        text = "/index.html"
    parts = text[1:].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    root = root.resolve()
    target = (root.joinpath(*parts)).resolve()
    try:
        target.relative_to(root)
    except ValueError:
        return None
    if not target.is_file():
        return None
    return target


class _Handler(BaseHTTPRequestHandler):
    server_version = "actatlas"
    root: Path = Path(".")
    quiet = True

    def _send(self, head_only: bool) -> None:
        target = resolve_request(self.root, self.path)
        if target is None:
            self.send_error(404, "Not found")
            return
        try:
            data = target.read_bytes()
        except OSError:
            self.send_error(404, "Not found")
            return
        ctype = _TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send(False)

    def do_HEAD(self):  # noqa: N802
        self._send(True)

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)


def make_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
                threaded: bool = True, quiet: bool = True) -> HTTPServer:
    """A bound (not yet serving) server for `root`; port 0 picks a free port (see ``server_address``)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    if host not in LOCAL_HOSTS and not allow_remote:
        raise UserError(f"refusing to serve on {host!r}: only 127.0.0.1/localhost/::1 unless a host is "
                        "given explicitly (--host)")
    handler = type("Handler", (_Handler,), {"root": root.resolve(), "quiet": quiet})
    cls = ThreadingHTTPServer if threaded else HTTPServer
    if ":" in host:
        import socket

        cls = type("Server6", (cls,), {"address_family": socket.AF_INET6})
    return cls((host, port), handler)


def url_of(server: HTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, max_requests: int | None = None,
          allow_remote: bool = False, quiet: bool = False) -> None:
    """Serve the static site in `root` until interrupted (or after `max_requests` requests)."""
    server = make_server(root, host, port, allow_remote=allow_remote, threaded=max_requests is None, quiet=quiet)
    print(f"serving {Path(root).resolve()} at {url_of(server)}  (Ctrl-C to stop)", flush=True)
    try:
        if max_requests is None:
            server.serve_forever()
        else:
            for _ in range(int(max_requests)):
                server.handle_request()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
