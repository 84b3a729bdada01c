"""A small static file server for an exported site: local only by default, no listings, no traversal.

Bound to a loopback address it answers only requests whose ``Host`` is a loopback name (``127.0.0.1``,
``localhost``, ``[::1]``, or the bound address itself), which defeats DNS rebinding: a web page on
another origin cannot make the browser read the atlas through a name that resolves to 127.0.0.1.
"""

from __future__ import annotations

import errno
import ipaddress
import mimetypes
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError, UserError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOCAL_HOST_HEADERS = {"127.0.0.1", "localhost", "[::1]"}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".json": "application/json", ".png": "image/png"}
_QUIET_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


def check_port(port) -> int:
    """`port` as an int in 0..65535 (0 picks a free port), or a UserError naming the valid range."""
    try:
        value = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid port {port!r}: use a number from 0 to 65535 (0 picks a free port)") from None
    if isinstance(port, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"invalid port {port}: use a number from 0 to 65535 (0 picks a free port)")
    return value


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or ``localhost``) is a loopback address: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def host_allowed(value: str | None, port: int, extra: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether a ``Host`` header value names this loopback server: a loopback name (or one of `extra`),
    optionally followed by ``:port`` that must equal `port`."""
    if not value:
        return False
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return False
        name, rest = value[:end + 1], value[end + 1:]
    else:
        name, sep, rest = value.partition(":")
        rest = sep + rest
    if rest:
        if not rest.startswith(":") or not rest[1:].isascii() or not rest[1:].isdigit():
            return False
        if int(rest[1:]) != port:
            return False
    return name in LOCAL_HOST_HEADERS or name in extra


def resolve_request(root: Path, raw_path: str) -> Path | None:
    """The regular file under `root` that a request path names, or None (refused / not found).

    Refused: any ``..`` or ``.`` segment (also percent-encoded), encoded slashes or backslashes,
    backslashes, NUL, empty segments (``//x``), and anything whose real path (symlinks resolved)
    is outside the root. ``/`` means ``/index.html``; other directories are never listed.
    Names the file system rejects (too long, invalid) are "not found", never an exception.
    """
    try:
        return _resolve(root, raw_path)
    except (OSError, ValueError):
        return None


def _resolve(root: Path, raw_path: str) -> Path | None:
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
    timeout = 60  # seconds a silent client may hold a connection (bounds a stalled request)

    def _host_ok(self) -> bool:
        srv = self.server
        if not getattr(srv, "local_only", True):
            return True
        port = srv.server_address[1]
        extra = getattr(srv, "local_names", frozenset())
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not host_allowed(hosts[0], port, extra):
            return False
        netloc = urlsplit(self.path).netloc  # absolute-form request target: its host counts too
        return not netloc or host_allowed(netloc, port, extra)

    def _send(self, head_only: bool) -> None:
        if not self._host_ok():
            self.send_error(403, "Forbidden", "This server only answers requests addressed to localhost.")
            return
        try:
            target = resolve_request(self.root, self.path)
            data = None if target is None else target.read_bytes()
        except (OSError, ValueError):
            target = data = None
        if target is None or data is None:
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


class _QuietErrors:
    """Server mixin: an exception while handling a request is one log line, never a traceback."""

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if exc is None or isinstance(exc, _QUIET_ERRORS):
            return  # the client went away: nothing to report
        try:
            who = client_address[0]
        except (TypeError, IndexError):
            who = "?"
        print(f"actatlas: serve: request from {who} failed: {type(exc).__name__}: {exc}"[:500],
              file=sys.stderr, flush=True)


def _bind_error(exc: OSError, host: str, port: int) -> UserError:
    if isinstance(exc, socket.gaierror):
        return UserError(f"cannot serve on {host!r}: the host name does not resolve ({exc.strerror or exc})")
    code = exc.errno
    if code == errno.EADDRINUSE:
        return UserError(f"port {port} on {host} is already in use; pick another port")
    if code in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot bind port {port} on {host}: permission denied (ports below 1024 usually "
                         "need administrator rights); pick another port")
    if code == errno.EADDRNOTAVAIL:
        return UserError(f"cannot bind {host}: not an address of this machine; pick another host")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"cannot serve on {host} port {port}: {reason}")


def make_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
                threaded: bool = True, quiet: bool = True) -> HTTPServer:
    """A bound (not yet serving) server for `root`; port 0 picks a free port (see ``server_address``).

    Raises UserError for a missing root, a non-loopback host without `allow_remote`, a port outside
    0..65535 and a failed bind (port in use, permission denied, unknown address).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(f"refusing to serve on {host!r}: only 127.0.0.1/localhost/::1 unless a host is "
                        "given explicitly")
    port = check_port(port)
    handler = type("Handler", (_Handler,), {"root": root.resolve(), "quiet": quiet})
    base = ThreadingHTTPServer if threaded else HTTPServer
    attrs = {}
    if ":" in host:
        attrs["address_family"] = socket.AF_INET6
    cls = type("Server", (_QuietErrors, base), attrs)
    try:
        server = cls((host, port), handler)
    except OverflowError:
        raise ConfigError(f"invalid port {port}: use a number from 0 to 65535 (0 picks a free port)") from None
    except OSError as exc:
        raise _bind_error(exc, host, port) from None
    bound = str(server.server_address[0])
    server.local_only = is_loopback(bound) or is_loopback(host)
    server.local_names = frozenset({f"[{bound.lower()}]" if ":" in bound else bound.lower()})
    return server


def url_of(server: HTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def exposure_warning(server: HTTPServer) -> str | None:
    """The one-line warning for a server reachable from other machines (None for a loopback one)."""
    if getattr(server, "local_only", True):
        return None
    host = server.server_address[0]
    return (f"actatlas: warning: serving on {host}, not a loopback address: the atlas, including crops of "
            "your photos, is visible to every machine that can reach this one on the network")


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, max_requests: int | None = None,
          allow_remote: bool = False, quiet: bool = False) -> None:
    """Serve the static site in `root` until interrupted (or after `max_requests` requests)."""
    server = make_server(root, host, port, allow_remote=allow_remote, threaded=max_requests is None, quiet=quiet)
    warning = exposure_warning(server)
    if warning:
        print(warning, file=sys.stderr, flush=True)
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
