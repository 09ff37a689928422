"""Unit tests of livesend.transport: outcome classes, Retry-After, backoff, abbreviation, records; and a few
real POSTs to the loopback Studio server (tests/studio_server.py)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import logging
import random
import socket

import pytest
from requests.structures import CaseInsensitiveDict
from studio_server import Fault, StudioServer

from livesend import studio, transport
from livesend.transport import DryRunTransport, Outcome, Recorder, Transport, abbreviate, backoff, classify, parse_retry_after

TOKEN = "lsd-SECRET-token-7f3a9c"
IDENT = studio.Identity("https://github.com/o/r", "c45d3d9ae43b014f4a6af78076a819168d492562", "areal-coze")


def headers(**values: str) -> CaseInsensitiveDict:
    return CaseInsensitiveDict({k.replace("_", "-"): v for k, v in values.items()})


# --- classify ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, kind",
    [(200, "ok"), (201, "rejected"), (204, "rejected"), (301, "fatal"), (302, "fatal"), (307, "fatal"), (308, "fatal"),
     (400, "rejected"), (401, "fatal"), (403, "fatal"), (404, "rejected"), (408, "retry"), (413, "rejected"),
     (422, "rejected"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry")],
)
def test_classify(status, kind):
    outcome = classify(status, '{"detail": "x"}', headers(Location="https://elsewhere/api/live"))
    assert outcome.kind == kind and outcome.status == status
    assert outcome.ok is (kind == "ok")
    if kind != "ok":
        assert str(status) in outcome.detail


def test_classify_details():
    out = classify(401, '{"detail":\n  "Invalid token"}', headers())
    assert out.detail == 'Studio rejected the token (HTTP 401): {"detail": "Invalid token"}. Check the STUDIO_TOKEN secret'
    out = classify(302, "", headers(location="https://studio.example/new"))
    assert "https://studio.example/new" in out.detail and "--endpoint" in out.detail
    assert classify(404, "x" * 1000, headers()).detail.endswith("x" * 300)
    assert len(classify(404, "x" * 1000, headers()).detail) < 400
    assert classify(429, "", headers(retry_after="7")).retry_after == 7.0
    assert classify(503, "", headers()).retry_after is None


# --- Retry-After ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("120", 120.0), (" 5 ", 5.0), (None, None), ("", None),
                                             ("soon", None), ("-5", None), ("1.5", None)])
def test_parse_retry_after_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date():
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now=now) == pytest.approx(90)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0  # in the past: now
    assert parse_retry_after(email.utils.formatdate(now + 30), now=now) == pytest.approx(30)  # "-0000" form


# --- backoff ----------------------------------------------------------------------------------------


def test_backoff_grows_and_is_capped():
    rng = random.Random(3)
    samples = {}
    for failures in range(1, 12):
        samples[failures] = [backoff(failures, rng) for _ in range(200)]
        ceiling = min(30.0, 0.5 * 2 ** (failures - 1))
        assert all(ceiling / 2 <= s <= ceiling for s in samples[failures])  # jitter within [ceiling/2, ceiling]
        assert len(set(samples[failures])) > 100  # jittered
    for failures in range(1, 6):  # doubles per failure until the cap
        assert min(samples[failures + 2]) > max(samples[failures])
    assert max(max(s) for s in samples.values()) <= 30.0
    assert backoff(1, random.Random(0)) <= 0.5
    assert backoff(0, random.Random(0)) <= 0.5


@pytest.mark.parametrize("failures", [64, 1025, 10**6])
def test_backoff_after_hours_of_failures_stays_capped(failures):
    assert 15.0 <= backoff(failures) <= 30.0


# --- abbreviate and records -------------------------------------------------------------------------


def image_request() -> studio.Request:
    png = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 10).decode()
    entries = [studio.image_entry("dvclive/plots/images/a.png", png, None),
               *studio.tsv_entries("dvclive/plots/metrics/m.tsv", ['{"step": 0, "m": 1.0}'], [10], 10**7)]
    (request,) = studio.plots_requests(IDENT, 0, entries)
    return request


def test_abbreviate_replaces_images_by_size_and_sha256():
    request = image_request()
    b64 = json.loads(request.body)["plots"]["dvclive/plots/images/a.png"]["image"]
    out = abbreviate(request.body)
    digest = hashlib.sha256(b64.encode()).hexdigest()
    assert out["plots"]["dvclive/plots/images/a.png"] == {"image": f"<base64 image: {len(b64)} chars, sha256 {digest}>"}
    assert out["plots"]["dvclive/plots/metrics/m.tsv"] == {"data": [{"step": 0, "m": 1.0}]}
    assert abbreviate(studio.start_request(IDENT, "m").body) == json.loads(studio.start_request(IDENT, "m").body)


def test_recorder_lines(tmp_path):
    stream = io.StringIO()
    recorder = Recorder(stream)
    recorder.write(image_request(), Outcome("ok", 200))
    recorder.write(studio.done_request(IDENT), Outcome("retry", 503, "HTTP 503: busy"))
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert set(first) == {"time", "event", "status", "outcome", "body"} and first["status"] == 200
    assert first["body"]["plots"]["dvclive/plots/images/a.png"]["image"].startswith("<base64 image: ")
    assert (second["event"], second["status"], second["outcome"], second["detail"]) == ("done", 503, "retry", "HTTP 503: busy")
    assert second["time"].endswith("Z") and len(second["time"]) == len("2025-01-01T00:00:00.000Z")


def test_dry_run_prints_abbreviated_payloads_and_answers_200():
    out, records = io.StringIO(), io.StringIO()
    dry = DryRunTransport(out, Recorder(records))
    assert dry.post(image_request()).ok and dry.post(studio.start_request(IDENT)).ok
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("livesend: would send {") for line in lines)
    assert "<base64 image:" in lines[0] and dry.requests == 2 and len(records.getvalue().splitlines()) == 2
    assert json.loads(lines[1][len("livesend: would send "):]) == json.loads(studio.start_request(IDENT).body)


# --- real POSTs to the loopback server --------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server():
    with StudioServer(token=TOKEN) as s:  # one per module: stopping a server takes up to half a second
        yield s


@pytest.fixture
def server(shared_server):
    with shared_server.lock:
        shared_server.faults.clear()
        shared_server.received.clear()
        shared_server.invalid.clear()
    return shared_server


@pytest.fixture
def records():
    return io.StringIO()


@pytest.fixture
def post(server, records):
    t = Transport(server.url, TOKEN, Recorder(records))
    yield t
    t.close()


def test_post_sends_the_body_bytes_with_dvclive_headers(server, post, records):
    request = studio.start_request(IDENT, "hello")
    outcome = post.post(request, timeout=5)
    assert outcome.ok and outcome.status == 200 and post.requests == 1
    (received,) = server.received
    assert received.body == json.loads(request.body)
    assert received.headers["Authorization"] == f"token {TOKEN}"
    assert received.headers["Content-type"] == "application/json"
    assert received.headers["Content-Length"] == str(len(request.body))
    assert TOKEN not in records.getvalue()


@pytest.mark.parametrize(
    "fault, kind, retry_after",
    [(Fault(status=503), "retry", None), (Fault(status=429, headers={"Retry-After": "3"}), "retry", 3.0),
     (Fault(status=500), "retry", None), (Fault(status=404), "rejected", None), (Fault(status=204, body=""), "rejected", None),
     (Fault(reset=True), "retry", None)],
)
def test_post_outcomes(server, post, fault, kind, retry_after):
    server.faults.append(fault)
    outcome = post.post(studio.done_request(IDENT), timeout=5)
    assert (outcome.kind, outcome.retry_after) == (kind, retry_after)
    assert not post.stopped
    assert post.post(studio.done_request(IDENT), timeout=5).ok  # the next request goes through


def test_a_body_the_schema_refuses_is_rejected(server, post):
    bad = studio.Request("start", b'{"type": "start"}')
    assert post.post(bad, timeout=5).kind == "rejected"
    assert server.invalid and not post.stopped


def test_wrong_token_stops_all_requests_with_one_error(server, records, caplog):
    t = Transport(server.url, "wrong-token-123")
    try:
        first = t.post(studio.start_request(IDENT), timeout=5)
        again = t.post(studio.start_request(IDENT), timeout=5)
    finally:
        t.close()
    assert first.kind == "fatal" and first.status == 401 and "Check the STUDIO_TOKEN secret" in first.detail
    assert again.kind == "fatal" and again.status is None
    assert len(server.received) == 1 and t.requests == 1
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_a_redirect_is_not_followed(server, post):
    server.faults.append(Fault(status=307, headers={"Location": "https://elsewhere.example/api/live"}))
    outcome = post.post(studio.start_request(IDENT), timeout=5)
    assert outcome.kind == "fatal" and "https://elsewhere.example/api/live" in outcome.detail
    assert len(server.received) == 1 and post.stopped


def test_a_timeout_is_retried():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # connects, never answers
        t = Transport(f"http://127.0.0.1:{sock.getsockname()[1]}/api/live", TOKEN)
        outcome = t.post(studio.start_request(IDENT), timeout=0.5)
        t.close()
    assert outcome.kind == "retry" and "no answer" in outcome.detail and not t.stopped


def test_connection_refused_is_retried():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        t = Transport(f"http://127.0.0.1:{port}/api/live", TOKEN)
        outcome = t.post(studio.start_request(IDENT), timeout=2)
        t.close()
    assert outcome.kind == "retry" and "Connection refused" in outcome.detail


def test_a_server_echoing_the_token_does_not_put_it_in_records(server, post, records, caplog):
    server.faults.append(Fault(status=500, body=json.dumps({"detail": f"token {TOKEN} is throttled"})))
    outcome = post.post(studio.start_request(IDENT), timeout=5)
    assert outcome.kind == "retry" and TOKEN not in outcome.detail and "***" in outcome.detail
    assert TOKEN not in records.getvalue() and "***" in records.getvalue()


def test_timeouts_are_bounded(server, post, monkeypatch):
    seen = []
    real = post.session.post
    monkeypatch.setattr(post.session, "post", lambda *a, **kw: seen.append(kw["timeout"]) or real(*a, **kw))
    post.post(studio.start_request(IDENT), timeout=0.01)
    post.post(studio.start_request(IDENT), timeout=60)
    assert seen == [(0.5, 0.5), (transport.CONNECT_TIMEOUT, 60)]
