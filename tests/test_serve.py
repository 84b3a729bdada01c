"""Hardening of `actatlas serve`: one-line port errors, Host-header checks (DNS rebinding), 404 on OSError.

Every server here binds to 127.0.0.1 (or 0.0.0.0, reached through 127.0.0.1), answers a fixed number
of requests, and each wait is bounded in time (server timeout, client timeout, thread join).
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import socketserver
import sys
import threading
from contextlib import contextmanager

import pytest

from actatlas.cli import main
from actatlas.errors import UserError
from actatlas.export import make_server, resolve_request
from actatlas.export.serve import check_port, host_allowed, is_loopback

serve_mod = sys.modules["actatlas.export.serve"]  # the module (actatlas.export.serve is the function)

PAGE = b"<p>atlas page</p>"
WAIT = 5  # seconds: per handle_request, per client socket operation


@pytest.fixture
def root(tmp_path):
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_bytes(PAGE)
    (site / "sub" / "a.json").write_text("{}")
    return site


@contextmanager
def running(site, n, host="127.0.0.1", **kw):
    """A single-threaded server that handles at most `n` requests (each wait bounded), then stops;
    if the test body fails, the loop stops after the request (or wait) in progress."""
    srv = make_server(site, host, 0, threaded=False, **kw)
    srv.timeout = WAIT
    stop = threading.Event()

    def loop():
        for _ in range(n):
            if stop.is_set():
                return
            srv.handle_request()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    except BaseException:
        stop.set()
        raise
    finally:
        t.join(n * WAIT + 5)
        srv.server_close()
    assert not t.is_alive(), "the request loop did not finish"


def request(port, method, path, hosts=("auto",)):
    """(status, body, headers) for one request; `hosts` are the Host header values to send
    ("auto" lets http.client write 127.0.0.1:PORT; an empty tuple sends none)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        auto = tuple(hosts) == ("auto",)
        c.putrequest(method, path, skip_host=not auto, skip_accept_encoding=True)
        if not auto:
            for h in hosts:
                c.putheader("Host", h)
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        c.close()


def cli(capsys, *argv):
    rc = main(["serve", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("actatlas: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# ------------------------------------------------------------------ 1. ports and bind failures
@pytest.mark.parametrize("port", [99999, 65536, -1])
def test_cli_invalid_port_is_one_line_error(root, capsys, port):
    rc, out, err = cli(capsys, root, "--port", port, "--max-requests", "0")
    assert_one_line_error(rc, err, str(port), "0 to 65535")
    assert "serving" not in out
    with pytest.raises(UserError, match="0 to 65535"):
        make_server(root, "127.0.0.1", port)


def test_check_port_unit():
    assert check_port(0) == 0 and check_port(65535) == 65535 and check_port("8000") == 8000
    for bad in (65536, -1, 99999, "http", None, True):
        with pytest.raises(UserError):
            check_port(bad)


def test_cli_bad_port_fails_before_exporting_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "atlas").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({}))
    rc, out, err = cli(capsys, run, "--port", 99999, "--max-requests", "0")
    assert_one_line_error(rc, err, "99999", "0 to 65535")
    assert "exporting" not in out and not (run / "site").exists()


def test_cli_port_in_use_is_one_line_error(root, capsys):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, out, err = cli(capsys, root, "--port", port, "--max-requests", "0")
        assert_one_line_error(rc, err, f"port {port} on 127.0.0.1 is already in use", "pick another port")
        assert "serving" not in out
    finally:
        busy.close()


def test_cli_bind_permission_denied_is_one_line_error(root, capsys, monkeypatch):
    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socketserver.TCPServer, "server_bind", denied)
    rc, out, err = cli(capsys, root, "--port", 80, "--max-requests", "0")
    assert_one_line_error(rc, err, "port 80", "permission denied")


def test_cli_address_not_on_this_machine_is_one_line_error(root, capsys):
    # 192.0.2.1 is TEST-NET-1 (documentation only): never an address of this machine
    rc, out, err = cli(capsys, root, "--host", "192.0.2.1", "--port", 0, "--max-requests", "0")
    assert_one_line_error(rc, err, "192.0.2.1")


# ------------------------------------------------------------------ 2. Host header (DNS rebinding)
def test_loopback_server_refuses_foreign_host_headers(root):
    refused = [("evil.example.com",), ("evil.example.com:{p}",), ("127.0.0.1.evil.example.com:{p}",),
               ("localhost:{q}",), ("127.0.0.1:{q}",), ("localhost:",), ("localhost:abc",), ("[::1]x",),
               ("[::1",), ("::1",), ("192.168.1.10:{p}",), (), ("localhost:{p}", "evil.example.com")]
    accepted = [("127.0.0.1",), ("127.0.0.1:{p}",), ("localhost",), ("LOCALHOST:{p}",), ("[::1]",), ("[::1]:{p}",)]
    with running(root, 2 * len(refused) + 2 * len(accepted) + 1) as p:
        fill = lambda hosts: [h.format(p=p, q=p + 1 if p < 65535 else p - 1) for h in hosts]  # noqa: E731
        for hosts in refused:
            for method in ("GET", "HEAD"):
                status, body, _ = request(p, method, "/index.html", fill(hosts))
                assert status == 403, (method, hosts)
                assert PAGE not in body, (method, hosts)
        for hosts in accepted:
            status, body, _ = request(p, "GET", "/", fill(hosts))
            assert (status, body) == (200, PAGE), hosts
            status, body, headers = request(p, "HEAD", "/index.html", fill(hosts))
            assert (status, body, headers["Content-Length"]) == (200, b"", str(len(PAGE))), hosts
        # absolute-form target naming another host, with an acceptable Host header
        status, body, _ = request(p, "GET", "http://evil.example.com/index.html", [f"127.0.0.1:{p}"])
        assert status == 403 and PAGE not in body


def test_host_allowed_and_is_loopback_unit():
    assert host_allowed("localhost:8000", 8000) and host_allowed("[::1]", 8000) and host_allowed("127.0.0.1", 1)
    assert not host_allowed("localhost:8001", 8000) and not host_allowed(None, 8000)
    assert not host_allowed("evil.example.com", 8000) and not host_allowed("localhost.evil.example.com", 8000)
    assert host_allowed("127.0.0.2:8000", 8000, {"127.0.0.2"}) and not host_allowed("127.0.0.2:8000", 8000)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "localhost", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.1", "example.com"))


def test_explicit_non_loopback_host_accepts_any_host_and_warns(root, capsys):
    with running(root, 2, host="0.0.0.0", allow_remote=True) as p:
        assert request(p, "GET", "/", ["evil.example.com"])[:2] == (200, PAGE)
        assert request(p, "HEAD", "/", ["atlas.lan:8000"])[0] == 200
    rc, out, err = cli(capsys, root, "--host", "0.0.0.0", "--port", 0, "--max-requests", "0")
    assert rc == 0 and "http://0.0.0.0:" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actatlas: warning:"), err
    assert "0.0.0.0" in lines[0] and "photos" in lines[0] and "every machine" in lines[0] and "network" in lines[0]
    # on loopback: no warning
    rc, out, err = cli(capsys, root, "--port", 0, "--max-requests", "0")
    assert rc == 0 and "warning" not in err


# ------------------------------------------------------------------ 3./4. OSError -> 404, no tracebacks
def test_long_path_segment_is_404_and_server_keeps_serving(root, capfd):
    probes = ["/" + "a" * 300, "/sub/" + "b" * 1000 + "/x.json", "/a" * 3000, "/" + "%61" * 300 + ".html"]
    for raw in probes:
        assert resolve_request(root, raw) is None
    with running(root, 2 * len(probes) + 1) as p:
        for raw in probes:
            status, body, _ = request(p, "GET", raw)
            assert status == 404 and b"404" in body, raw[:40]
            assert request(p, "HEAD", raw)[0] == 404
        assert request(p, "GET", "/")[:2] == (200, PAGE)  # still serving
    assert "Traceback" not in "".join(capfd.readouterr())


@pytest.mark.parametrize("exc", [ValueError("embedded null byte"), OSError(36, "File name too long"),
                                 PermissionError(13, "Permission denied")])
def test_error_while_resolving_is_404(root, monkeypatch, capfd, exc):
    def broken(site, raw):
        raise exc

    monkeypatch.setattr(serve_mod, "resolve_request", broken)
    with running(root, 2) as p:
        status, body, _ = request(p, "GET", "/index.html")
        assert status == 404 and b"404" in body and PAGE not in body
        assert request(p, "HEAD", "/index.html")[0] == 404
    assert "Traceback" not in "".join(capfd.readouterr())


def test_unexpected_handler_error_is_one_log_line_not_a_traceback(root, monkeypatch, capfd):
    def broken(site, raw):
        raise RuntimeError("boom")

    monkeypatch.setattr(serve_mod, "resolve_request", broken)
    with running(root, 1) as p:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(p, "GET", "/index.html")  # the connection closes without a reply
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert [ln for ln in err.splitlines() if "RuntimeError: boom" in ln], err
    assert len(err.strip().splitlines()) == 1, err


def test_garbage_request_lines_get_an_error_reply_without_traceback(root, capfd):
    raws = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GET\r\n\r\n",
            b"GET /index.html HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n"]
    with running(root, len(raws) + 1, quiet=False) as p:
        for raw in raws:
            with socket.create_connection(("127.0.0.1", p), timeout=WAIT) as s:
                s.sendall(raw)
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            assert b"Error code: 400" in reply or b"Error code: 505" in reply, reply[:80]  # 0.9-style: no status line
        assert request(p, "GET", "/")[:2] == (200, PAGE)
    assert "Traceback" not in "".join(capfd.readouterr())


def test_handler_has_a_socket_timeout():
    assert 0 < serve_mod._Handler.timeout <= 120  # a silent client cannot hold the server forever
