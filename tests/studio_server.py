"""A real Studio stand-in on 127.0.0.1: checks `Authorization`, validates every body with
dvc-studio-client's own schema, records what it accepted, and misbehaves on command.

Usage:
    with StudioServer(token="t0k3n") as studio:
        ... studio.url ...             # http://127.0.0.1:PORT/api/live
        studio.faults.extend([503, 503, Fault(status=429, headers={"Retry-After": "1"})])
        studio.wait_for(lambda s: s.count("done") == 1)

Run alone (`python tests/studio_server.py --port 8000 --token T`) it serves until interrupted and
prints each accepted request, which is handy for trying livesend by hand.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from dvc_studio_client.schema import SCHEMAS_BY_TYPE
from voluptuous import Invalid


@dataclass
class Fault:
    """How to answer one request instead of 200: a status (with headers and body), a delay before
    answering, a connection reset, or a redirect."""

    status: int = 503
    delay: float = 0.0
    headers: dict = field(default_factory=dict)
    body: str = '{"detail": "injected fault"}'
    reset: bool = False  # close the connection without answering
    process: bool = False  # record the body as accepted before misbehaving (a lost acknowledgement)


@dataclass
class Received:
    time: float
    body: dict
    headers: dict
    status: int
    error: Optional[str] = None


class StudioServer:
    def __init__(self, token: str = "test-token", host: str = "127.0.0.1", port: int = 0, path: str = "/api/live",
                 tls: Optional[tuple] = None):
        self.token = token
        self.scheme = "https" if tls else "http"
        self.path = path
        self.faults: list = []  # consumed one per request; an entry may be an int status or a Fault
        self.rule: Optional[Callable[[dict], Optional[Fault]]] = None  # a fault chosen per body
        self.received: list[Received] = []  # every request, answered or not
        self.invalid: list[Received] = []  # bodies that failed the schema or auth
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        if tls:  # (certfile, keyfile)
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=lambda: self.httpd.serve_forever(poll_interval=0.05), daemon=True)

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}{self.path}"

    def __enter__(self) -> "StudioServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- queries ----------------------------------------------------------------------------------

    @property
    def accepted(self) -> list:
        """Bodies answered with 200, in arrival order."""
        with self.lock:
            return [r.body for r in self.received if r.status == 200]

    def count(self, event: str, name: Optional[str] = None) -> int:
        return sum(1 for b in self.accepted if b["type"] == event and (name is None or b.get("name") == name))

    def wait_for(self, predicate: Callable[["StudioServer"], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 0.2))
        return True

    # --- the handler ------------------------------------------------------------------------------

    def _next_fault(self, body: dict) -> Optional[Fault]:
        with self.lock:
            if self.faults:
                fault = self.faults.pop(0)
                return Fault(status=fault) if isinstance(fault, int) else fault
        return self.rule(body) if self.rule else None

    def _record(self, entry: Received) -> None:
        with self.cond:
            self.received.append(entry)
            if entry.error:
                self.invalid.append(entry)
            self.cond.notify_all()

    def _handler(server_self):  # noqa: N805 - closes over the server
        server = server_self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK wait

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                headers = {k: v for k, v in self.headers.items()}
                if self.path != server.path:
                    return self._answer(404, '{"detail": "not found"}')
                if self.headers.get("Authorization") != f"token {server.token}":
                    server._record(Received(time.time(), {}, headers, 401, "bad or missing Authorization"))
                    return self._answer(401, '{"detail": "Invalid token"}')
                try:
                    body = json.loads(raw)
                    SCHEMAS_BY_TYPE[body["type"]](body)
                except (ValueError, KeyError, TypeError, Invalid) as exc:
                    server._record(Received(time.time(), {}, headers, 400, f"invalid body: {exc}"))
                    return self._answer(400, json.dumps({"detail": str(exc)}))
                fault = server._next_fault(body)
                if fault is None:
                    server._record(Received(time.time(), body, headers, 200))
                    return self._answer(200, "{}")
                if fault.process:
                    server._record(Received(time.time(), body, headers, 200))
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.reset:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    if not fault.process:
                        server._record(Received(time.time(), body, headers, 0))  # reset: no answer
                    return None
                if not fault.process:
                    server._record(Received(time.time(), body, headers, fault.status))
                return self._answer(fault.status, fault.body, fault.headers)

            def _answer(self, status: int, text: str, extra: Optional[dict] = None) -> None:
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (extra or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        return Handler


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default="test-token")
    options = parser.parse_args()
    with StudioServer(options.token, port=options.port) as studio:
        print(f"serving {studio.url} (token {options.token!r}); Ctrl-C stops", flush=True)
        seen = 0
        try:
            while True:
                studio.wait_for(lambda s: len(s.received) > seen, timeout=3600)
                for r in studio.received[seen:]:
                    print(r.status, r.error or json.dumps(r.body)[:200], flush=True)
                seen = len(studio.received)
        except KeyboardInterrupt:
            pass
