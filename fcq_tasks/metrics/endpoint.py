"""The HTTP endpoint that serves a registry in Prometheus' text format.

One small server per process (the worker's, ``fcq metrics``'), on a daemon
thread of its own, answering ``GET /metrics`` only. The rule for who may
read it: on a loopback address (the default, 127.0.0.1) anyone on the
host may; on any other address an auth file is required (``user:password``
lines, mode 0600), and then every request needs HTTP basic auth, loopback
or not. The settings refuse a non-loopback address without a file; this
module refuses a file that others can read or that holds no credentials.
Credentials are compared as SHA-256 digests in constant time, so neither
a password's characters nor its length show in the answer's timing.

It is a side channel of a process that matters more (a hypervisor's
worker), so it is kept small: at most ``MAX_REQUESTS`` requests at once,
more connections are closed at once; every request has ``REQUEST_DEADLINE``
seconds in all (a client trickling one byte at a time is cut off too), and
the listen backlog is short.

No I/O in the constructor: :meth:`MetricsEndpoint.open` binds (and raises
a ConfigError naming the setting when it cannot: :class:`ListenError` when
the address or port is the trouble, not the auth), :meth:`serve` starts
the thread, :meth:`close` stops it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from fcq_tasks.config.validate import is_loopback
from fcq_tasks.errors import ConfigError

#: Requests served at once; a scrape takes milliseconds, Prometheus sends one at a time.
MAX_REQUESTS = 4
#: Seconds one request may take in all, reading it and answering it.
REQUEST_DEADLINE = 10.0


class ListenError(ConfigError):
    """The endpoint's address or port cannot be bound (taken, not this machine's)."""


def read_credentials(source: str, field: str, path: Path) -> dict[str, str]:
    """user → password from *path*; refused unless it is 0600-like and holds user:password."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(source, field,
                          f"{path} cannot be read: {err.strerror or err}") from err
    except ValueError as err:  # UnicodeDecodeError: not a text file
        raise ConfigError(source, field, f"{path} is not UTF-8 text: {err}") from err
    if mode & 0o077:
        raise ConfigError(source, field, f"{path} has mode {mode:04o}: a secret must not be "
                          "readable by group or others (chmod 0600)")
    creds = {}
    for line in text.splitlines():
        user, sep, password = line.strip().partition(":")
        if line.strip() and (not sep or not user or not password):
            raise ConfigError(source, field, f"{path} must hold user:password lines")
        if sep:
            creds[user] = password
    if not creds:
        raise ConfigError(source, field, f"{path} holds no user:password line")
    return creds


def authorized(header: str | None, creds: dict[str, str]) -> bool:
    """Whether a basic-auth *header* names a user of *creds* with the right password."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        supplied = base64.b64decode(header[6:], validate=True)
    except binascii.Error:
        return False
    # Digests of the whole user:password, compared with every line: equal
    # lengths whatever was sent, and no early exit on a known user name.
    digest = hashlib.sha256(supplied).digest()
    found = False
    for user, password in creds.items():
        expected = hashlib.sha256(f"{user}:{password}".encode()).digest()
        found |= hmac.compare_digest(digest, expected)
    return found


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 5  # connections the kernel holds before accept; more wait or fail
    registry: Collector
    creds: dict[str, str] | None
    deadline: float = REQUEST_DEADLINE

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer's own would ask socket.getfqdn(): a reverse DNS lookup
        # at start that can hang the worker's start on a broken resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed at once, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback on stderr; a client cut off at its
        # deadline (or gone mid-answer) is worth one line, not a traceback.
        structlog.get_logger().info("metrics-request-dropped", client=str(client_address[0]))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # Closing the socket at the deadline wakes a read or write blocked
        # on a slow client; the per-read timeout alone restarts at each byte.
        timer = threading.Timer(self.deadline, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._slots.release()


def _cut(request: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: the request ended meanwhile
        request.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    #: Seconds of silence from a client before it is dropped (and
    #: REQUEST_DEADLINE in all): one that connects and says nothing must
    #: not hold a thread of the worker for ever.
    timeout = 5

    def do_GET(self) -> None:
        creds = self.server.creds
        if creds is not None and not authorized(self.headers.get("Authorization"), creds):
            self._send(401, b"authentication required\n",
                       {"WWW-Authenticate": 'Basic realm="fcq metrics"'})
        elif self.path.split("?")[0] != "/metrics":
            self._send(404, b"only /metrics here\n")
        else:
            try:
                body = generate_latest(self.server.registry)
            except Exception as err:  # a collector failed: say so, keep serving
                structlog.get_logger().warning("metrics-collect-failed", error=str(err))
                self._send(500, f"collecting metrics failed: {err}\n".encode())
                return
            self._send(200, body, {"Content-Type": CONTENT_TYPE_LATEST})

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape on stderr would drown the worker's log


class MetricsEndpoint:
    """``/metrics`` of *registry* on *address*:*port*; *auth_file* as the settings name it.

    *source* and *prefix* name the settings file and section in errors
    (``metrics_port``, ``cluster.metrics_port``).
    """

    def __init__(self, registry: Collector, address: str, port: int,
                 auth_file: Path | None, source: str, prefix: str = "",
                 deadline: float = REQUEST_DEADLINE) -> None:
        self.registry = registry
        self.deadline = deadline
        self.address = address
        self.port = port
        self.auth_file = auth_file
        self.source = source
        self.prefix = prefix
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: Whether open() was called, whatever came of it.
        self.tried = False

    def open(self) -> None:
        """Read the credentials and bind; a ConfigError names the setting that is wrong."""
        self.tried = True
        p = self.prefix
        if self.auth_file is None and not is_loopback(self.address):
            raise ConfigError(self.source, f"{p}metrics_auth_file",
                              f"is required when {p}metrics_address is not a loopback "
                              f"address (got {self.address!r})")
        creds = None if self.auth_file is None else \
            read_credentials(self.source, f"{p}metrics_auth_file", self.auth_file)
        try:
            server = (_Server6 if ":" in self.address else _Server)((self.address, self.port),
                                                                    _Handler)
        except OSError as err:
            raise ListenError(self.source, f"{p}metrics_port",
                              f"cannot listen on {self.address}:{self.port}: "
                              f"{err.strerror or err}") from err
        server.registry = self.registry
        server.creds = creds
        server.deadline = self.deadline
        self._server = server

    @property
    def is_open(self) -> bool:
        return self._server is not None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def serve(self) -> None:
        if self._server is None:  # not an assert: those vanish under python -O
            raise RuntimeError("metrics endpoint: open() before serve()")
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fcq-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            if self._thread is not None:
                self._server.shutdown()
            self._server.server_close()
            self._server = None
