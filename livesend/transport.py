"""HTTP to Studio: one POST at a time, its outcome classified so the session knows what to do next.

Outcomes:
  ok        HTTP 200, the only success (as dvc-studio-client counts it)
  retry     connection errors, timeouts, 408, 429 (with Retry-After) and 5xx: send again later
  rejected  any other answer (4xx but 401/403, non-200 2xx): logged with its body, that request dropped
  fatal     401/403, a redirect, a TLS failure: said once, then no request is made for the rest of the run
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, TextIO

import requests

from livesend import __version__
from livesend.config import ConfigError
from livesend.studio import Request

log = logging.getLogger("livesend")

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


@dataclass
class Outcome:
    kind: str  # ok | retry | rejected | fatal
    status: Optional[int] = None
    detail: str = ""
    retry_after: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def backoff(failures: int, rng: random.Random = random.Random()) -> float:
    """Exponential backoff with full jitter, capped at 30 s: failures=1 -> up to 0.5 s, 2 -> 1 s, ..."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(max(0, failures - 1), 16)))  # 2**n overflows a float
    return ceiling * (0.5 + rng.random() / 2)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def classify(status: int, body: str, headers: dict) -> Outcome:
    snippet = " ".join(body.split())[:300]
    if status == 200:
        return Outcome("ok", status)
    if status in (401, 403):
        return Outcome("fatal", status, f"Studio rejected the token (HTTP {status}): {snippet}. Check the STUDIO_TOKEN secret")
    if 300 <= status < 400:
        where = headers.get("Location", "?")
        return Outcome(
            "fatal", status, f"the endpoint redirects (HTTP {status}) to {where}; set --endpoint/STUDIO_ENDPOINT to the final URL"
        )
    if status in (408, 429) or status >= 500:
        return Outcome("retry", status, f"HTTP {status}: {snippet}", parse_retry_after(headers.get("Retry-After")))
    return Outcome("rejected", status, f"Studio refused the request (HTTP {status}): {snippet}")


def abbreviate(body: bytes) -> dict:
    """A body with images replaced by their size and sha256, for records and dry runs."""
    obj = json.loads(body)
    for value in (obj.get("plots") or {}).values():
        if isinstance(value, dict) and "image" in value:
            raw = value["image"].encode()
            value["image"] = f"<base64 image: {len(raw)} chars, sha256 {hashlib.sha256(raw).hexdigest()}>"
    return obj


class Recorder:
    """--record FILE: one JSON line per request made (never the token: it is only in a header)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, request: Request, outcome: Outcome) -> None:
        now = time.time()  # read once: seconds and milliseconds of the same instant
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "event": request.event,
            "status": outcome.status,
            "outcome": outcome.kind,
            "body": abbreviate(request.body),
        }
        if outcome.detail and not outcome.ok:
            line["detail"] = outcome.detail
        with self.lock:
            self.stream.write(json.dumps(line) + "\n")
            self.stream.flush()


class Transport:
    """POSTs to the Studio endpoint with the token. Shared by every experiment of the run: once the
    token is rejected (or the endpoint redirects, or TLS fails) nothing more is sent by anyone."""

    def __init__(self, endpoint: str, token: str, recorder: Optional[Recorder] = None, timeout: float = READ_TIMEOUT,
                 say_fatal: bool = True) -> None:
        self.endpoint = endpoint
        self.say_fatal = say_fatal  # log the first fatal outcome (else the caller says it)
        self.timeout = timeout
        self.recorder = recorder
        self.session = requests.Session()
        if not (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")) and os.environ.get("SSL_CERT_FILE"):
            self.session.verify = os.environ["SSL_CERT_FILE"]
        self.session.headers.update(
            {"Content-type": "application/json", "Authorization": f"token {token}", "User-Agent": f"livesend/{__version__}"}
        )
        self.stopped: Optional[str] = None
        self.lock = threading.Lock()
        self.requests = 0
        self._secret = token

    def post(self, request: Request, timeout: float = READ_TIMEOUT) -> Outcome:
        if self.stopped:
            return Outcome("fatal", None, self.stopped)
        outcome = self._post(request, max(0.5, timeout))
        if self._secret and self._secret in outcome.detail:  # a server echoing the token: not into records/logs
            outcome.detail = outcome.detail.replace(self._secret, "***")
        self.requests += 1
        if self.recorder:
            self.recorder.write(request, outcome)
        if outcome.kind == "fatal":
            with self.lock:
                if not self.stopped:
                    self.stopped = outcome.detail
                    if self.say_fatal:
                        log.error("%s; live metrics are off for the rest of this run", outcome.detail)
        return outcome

    def _post(self, request: Request, timeout: float) -> Outcome:
        try:
            response = self.session.post(
                self.endpoint,
                data=request.body,
                timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            return Outcome(
                "fatal", None,
                f"TLS verification of {self.endpoint} failed ({_reason(exc)}); "
                "if it uses a private CA, point REQUESTS_CA_BUNDLE at its certificate",
            )
        except requests.exceptions.Timeout:
            return Outcome("retry", None, f"no answer within {timeout:.0f} s")
        except requests.exceptions.ConnectionError as exc:
            return Outcome("retry", None, f"connection failed ({_reason(exc)})")
        except requests.exceptions.RequestException as exc:
            return Outcome("retry", None, f"request failed ({_reason(exc)})")
        with response:
            try:
                text = response.text
            except requests.exceptions.RequestException:
                text = ""
            return classify(response.status_code, text, response.headers)

    def close(self) -> None:
        self.session.close()


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("certificate verify failed", "Connection refused", "Connection reset", "Name or service not known"):
        if marker in text:
            return marker
    return text.splitlines()[0][:160] if text else type(exc).__name__


class DryRunTransport:
    """--dry-run: print each payload that would be sent (images abbreviated) and answer 200."""

    def __init__(self, stream: TextIO, recorder: Optional[Recorder] = None) -> None:
        self.stream = stream
        self.recorder = recorder
        self.stopped: Optional[str] = None
        self.requests = 0
        self.lock = threading.Lock()
        self.timeout = READ_TIMEOUT

    def post(self, request: Request, timeout: float = READ_TIMEOUT) -> Outcome:
        with self.lock:
            self.stream.write("livesend: would send " + json.dumps(abbreviate(request.body)) + "\n")
            self.stream.flush()
        self.requests += 1
        outcome = Outcome("ok", 200)
        if self.recorder:
            self.recorder.write(request, outcome)
        return outcome

    def close(self) -> None:
        pass


def open_transport(config, stack: contextlib.ExitStack, say_fatal: bool = True):
    """The transport a Config asks for (a dry run prints each request instead), with its --record file;
    both are closed with `stack`. ConfigError when the record file cannot be opened."""
    recorder = None
    if config.record:
        try:
            recorder = Recorder(stack.enter_context(open(config.record, "a", encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(f"cannot open --record file {config.record}: {exc.strerror}") from None
    if config.dry_run:
        transport = DryRunTransport(sys.stderr, recorder)
    else:
        transport = Transport(config.endpoint, config.token or "", recorder, config.request_timeout, say_fatal)
    stack.callback(transport.close)
    return transport
