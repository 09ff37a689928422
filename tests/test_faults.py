"""Fault injection: a real loopback Studio that misbehaves on command, real DVCLive training.
In every case: no row lost, the last state sent equals the files, the exit status is the command's,
livesend ends within --flush-timeout after the command, and the token leaks nowhere."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import harness
import pytest
from conftest import TOKEN, descendants
from harness import TRAIN
from studio_server import Fault, StudioServer


def every(n: int, fault: Fault, first: int = 1):
    """A rule: fail requests first, first+n, ... (counting from 0)."""
    counter = {"i": -1}
    lock = threading.Lock()

    def rule(_body):
        with lock:
            counter["i"] += 1
            return fault if counter["i"] >= first and (counter["i"] - first) % n == 0 else None

    return rule


def test_bursts_of_5xx_are_retried_until_delivered(studio, repo):
    studio.faults.extend([500, 502, 503, 503, 500, 502])  # the first requests, start included
    burst = {"n": 0}

    def rule(_body):
        burst["n"] += 1
        return Fault(status=(500, 502, 503)[burst["n"] % 3]) if burst["n"] % 5 in (1, 2) else None

    studio.rule = rule
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "25", "--sleep", "0.02", "--image-every", "3"],
                          "--interval", "0.1", "--flush-timeout", "20")
    accounting = harness.check(outcome, studio, flush_timeout=20)
    assert accounting["rows"] == 100
    assert studio.count("done") == 1
    assert sum(1 for r in studio.received if r.status >= 500) >= 6
    assert outcome.report["experiments"][0]["retries"] >= 6


def test_429_retry_after_is_honoured(studio, repo):
    studio.faults.extend([Fault(status=429, headers={"Retry-After": "2"})])
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "5"], "--interval", "0.1", "--flush-timeout", "20")
    harness.check(outcome, studio, flush_timeout=20)
    first, second = studio.received[0], studio.received[1]
    assert first.status == 429
    assert second.time - first.time >= 1.9  # waited as Studio asked, not the 0.5 s backoff


def test_slow_responses_time_out_and_are_retried(studio, repo):
    # Studio processes the request but answers after the client gave up: the one case where a
    # duplicate can reach Studio (documented in the README's Guarantees).
    studio.faults.extend([Fault(status=200, delay=2.5, process=True), Fault(status=200, delay=2.5, process=True)])
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "8"], "--interval", "0.1",
                          "--request-timeout", "1", "--flush-timeout", "20")
    harness.check(outcome, studio, flush_timeout=20, duplicates_allowed=True)
    assert studio.count("done") == 1
    assert any(line.get("outcome") == "retry" for line in outcome.record)


def test_connection_reset_mid_request(studio, repo):
    studio.rule = every(3, Fault(reset=True), first=1)
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "12", "--sleep", "0.02"], "--interval", "0.1",
                          "--flush-timeout", "20")
    harness.check(outcome, studio, flush_timeout=20)
    assert any(r.status == 0 for r in studio.received)  # resets did happen
    assert studio.count("done") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_refusing_connections_for_60s_then_back(repo):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/live"
    proc = harness.start(repo, url, [*TRAIN, "--epochs", "10"], "--interval", "0.2", "--flush-timeout", "120")
    refused_until = time.monotonic() + 60
    # Nothing listens on the port for 60 s: every attempt is refused. Then Studio comes back.
    while time.monotonic() < refused_until:
        try:
            proc.wait(timeout=max(0.01, refused_until - time.monotonic()))
            break
        except subprocess.TimeoutExpired:
            pass
    assert proc.poll() is None, "livesend gave up before the flush timeout"
    with StudioServer(token=TOKEN, port=port) as studio:
        outcome = harness.finish(proc, repo, timeout=150)
        harness.check(outcome, studio, flush_timeout=120)
        assert studio.count("start") == 1 and studio.count("done") == 1
    assert outcome.report["experiments"][0]["retries"] >= 3


def test_endpoint_down_for_the_whole_run_gives_up_and_says_what_was_lost(repo):
    url = f"http://127.0.0.1:{free_port()}/api/live"
    with StudioServer(token=TOKEN) as studio:  # unused: just to share the checks' shape
        outcome = harness.run(repo, url, [*TRAIN, "--epochs", "6"], "--interval", "0.1", "--flush-timeout", "3")
        harness.check(outcome, studio, flush_timeout=3, delivered=False)
    assert outcome.returncode == 0
    lines = outcome.lines("not delivered to Studio")
    assert len(lines) == 1
    assert "24 plot rows" in lines[0] and "1 images" in lines[0] and "metrics" in lines[0]
    assert outcome.report["delivery_failed"] is True


def test_endpoint_down_with_strict_exits_3(repo):
    url = f"http://127.0.0.1:{free_port()}/api/live"
    with StudioServer(token=TOKEN) as studio:
        outcome = harness.run(repo, url, [*TRAIN, "--epochs", "2"], "--flush-timeout", "1", "--strict")
        harness.check(outcome, studio, status=3, flush_timeout=1, delivered=False)


@pytest.fixture
def certificate(tmp_path: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_untrusted_tls_certificate_is_a_clear_error_never_an_insecure_retry(repo, certificate):
    with StudioServer(token=TOKEN, tls=certificate) as studio:
        outcome = harness.run(repo, studio.url.replace("http://", "https://"), [*TRAIN, "--epochs", "3"],
                              "--interval", "0.1", "--flush-timeout", "5")
        harness.check(outcome, studio, flush_timeout=5, delivered=False)
        assert studio.received == []  # not a single request made it through, verified or not
    errors = outcome.lines("TLS verification")
    assert len(errors) == 1 and "certificate verify failed" in errors[0] and "REQUESTS_CA_BUNDLE" in errors[0]
    assert len(outcome.record) == 1  # no retry storm


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_private_ca_through_the_environment(repo, certificate, variable):
    with StudioServer(token=TOKEN, tls=certificate) as studio:
        outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "3"], "--interval", "0.1",
                              env={"REQUESTS_CA_BUNDLE": None, "CURL_CA_BUNDLE": None, variable: str(certificate[0])})
        harness.check(outcome, studio)
        assert studio.count("done") == 1


def test_redirect_is_not_followed(studio, repo):
    studio.faults.append(Fault(status=307, headers={"Location": "https://elsewhere.example/api/live"}))
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "5"], "--interval", "0.1", "--flush-timeout", "5")
    harness.check(outcome, studio, flush_timeout=5, delivered=False)
    assert len(studio.received) == 1
    errors = outcome.lines("redirects")
    assert len(errors) == 1 and "https://elsewhere.example/api/live" in errors[0]


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_token_stops_after_one_error(studio, repo, status):
    studio.rule = lambda _body: Fault(status=status, body='{"detail": "Invalid token"}')
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "10"], "--interval", "0.05", "--flush-timeout", "5")
    harness.check(outcome, studio, flush_timeout=5, delivered=False)
    assert len(studio.received) <= 2
    errors = outcome.lines(f"rejected the token (HTTP {status})")
    assert len(errors) == 1 and "Invalid token" in errors[0] and "STUDIO_TOKEN" in errors[0]


def test_other_4xx_drops_that_request_and_carries_on(studio, repo):
    seen = {"n": 0}

    def rule(body):
        seen["n"] += 1
        return Fault(status=422, body='{"detail": "unprocessable"}') if seen["n"] == 2 else None

    studio.rule = rule
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "6"], "--interval", "0.1")
    assert outcome.returncode == 0
    assert len(outcome.lines("HTTP 422")) == 1
    assert studio.count("done") == 1  # carried on after the refused request


# --- the command misbehaving ---------------------------------------------------------------------


def test_command_ignoring_sigterm_for_a_while(studio, repo):
    script = repo / "stubborn.py"
    script.write_text(
        "import signal, sys, time, pathlib\nfrom dvclive import Live\n"
        "got = []\nsignal.signal(signal.SIGTERM, lambda n, f: got.append(time.time()))\n"
        "live = Live(save_dvc_exp=False)\nstep = 0\n"
        "while not got or time.time() - got[0] < 2:\n"
        "    live.log_metric('loss', 1 / (step + 1)); live.next_step(); step += 1; time.sleep(0.01)\n"
        "live.end()\nsys.exit(0)\n"
    )
    proc = harness.start(repo, studio.url, [harness.sys.executable, "stubborn.py"], "--interval", "0.1")
    assert studio.wait_for(lambda s: s.count("data") >= 2)
    proc.terminate()
    outcome = harness.finish(proc, repo)
    harness.check(outcome, studio)
    assert studio.count("done") == 1


def test_a_cancelled_run_flushes_within_the_cancel_budget(studio, repo):
    """A CI runner kills a cancelled job soon after its signal: after a forwarded SIGTERM the flush is the
    shorter --cancel-flush-timeout (3 s by default), not --flush-timeout (30 s here). Studio fails from
    the signal on, so without the cap livesend would retry for the whole 30 s."""
    script = repo / "until_signal.py"
    script.write_text(
        "import signal, sys, time\nfrom dvclive import Live\n"
        "got = []\nsignal.signal(signal.SIGTERM, lambda n, f: got.append(n))\n"
        "live = Live(save_dvc_exp=False)\nstep = 0\n"
        "while not got:\n    live.log_metric('loss', 1 / (step + 1)); live.next_step(); step += 1; time.sleep(0.02)\n"
        "live.log_metric('loss', 0.0); live.next_step(); live.end()\nsys.exit(7)\n"
    )
    proc = harness.start(repo, studio.url, [harness.sys.executable, "until_signal.py"], "--interval", "0.1",
                         "--flush-timeout", "30")
    assert studio.wait_for(lambda s: s.count("data") >= 2)
    studio.rule = lambda body: Fault(status=503)
    proc.terminate()
    outcome = harness.finish(proc, repo)
    harness.check(outcome, studio, status=7, flush_timeout=3, delivered=False)
    assert len(outcome.lines("the run was cancelled: delivering the rest for up to 3 s")) == 1
    assert studio.count("done") == 0
    assert len(outcome.lines("not delivered to Studio")) == 1  # the rows logged after the signal, said plainly


def flushing_against_an_outage(studio, repo, *signals: int) -> tuple:
    """A training that ends normally, Studio failing from then on until 1 s after the first of `signals`,
    which are sent to livesend while it retries in its flush (--flush-timeout 30). Returns (outcome,
    seconds from the first signal to livesend's exit)."""
    ended = repo / ".command-ended"  # written by the harness's wrapper when the command exits
    signalled: list = []

    def rule(_body):
        if ended.exists() and (not signalled or time.monotonic() < signalled[0] + 1):
            return Fault(status=503)
        return None

    studio.rule = rule
    proc = harness.start(repo, studio.url, [*TRAIN, "--epochs", "4"], "--interval", "0.1", "--flush-timeout", "30")
    # the command has ended only once livesend has reaped it: a signal between the wrapper's last line
    # and its exit goes to the command, which is then rightly reported as killed by it
    assert studio.wait_for(lambda s: ended.exists() and not descendants(proc.pid)
                           and any(r.status == 503 for r in s.received), timeout=60)
    signalled.append(time.monotonic())
    for signum in signals:
        proc.send_signal(signum)
    outcome = harness.finish(proc, repo)
    return outcome, time.monotonic() - signalled[0]


def test_a_cancel_during_the_flush_cuts_it_short_and_still_sends_done(studio, repo):
    """A job cancelled after the training ended, while livesend retries a failing Studio: the flush ends
    within --cancel-flush-timeout (3 s) of the signal instead of running its 30 s, `done` still goes out
    (Studio is back 1 s after the signal), the exit status stays the training's."""
    outcome, took = flushing_against_an_outage(studio, repo, signal.SIGTERM)
    assert outcome.returncode == 0, outcome.stderr
    assert took < 3 + 2, f"livesend took {took:.1f} s after the signal"
    assert len(outcome.lines("cancelled while delivering the rest: 3 s left")) == 1
    assert studio.count("done") == 1
    harness.check(outcome, studio)  # and nothing was lost: the data went through with `done`


def test_a_second_signal_during_the_flush_stops_livesend_at_once(studio, repo):
    # two different signals: two of the same kind sent at once may be merged into one by the kernel
    outcome, took = flushing_against_an_outage(studio, repo, signal.SIGTERM, signal.SIGINT)
    assert outcome.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), outcome.stderr
    assert took < 2, f"livesend took {took:.1f} s after the signals"
    assert studio.count("done") == 0


def test_command_whose_children_get_the_signal_too(studio, repo):
    child = repo / "child.py"
    child.write_text(
        "import signal, sys, time, pathlib\nfrom dvclive import Live\n"
        "got = []\nsignal.signal(signal.SIGTERM, lambda n, f: got.append(n))\n"
        "live = Live(save_dvc_exp=False)\nstep = 0\n"
        "while not got:\n    live.log_metric('loss', 1 / (step + 1)); live.next_step(); step += 1; time.sleep(0.01)\n"
        "live.end()\npathlib.Path('child-got-sigterm').touch()\n"
    )
    parent = repo / "parent.py"
    parent.write_text(
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # the parent ignores it; its child must still get it
        "sys.exit(subprocess.call([sys.executable, 'child.py']) + 5)\n"
    )
    proc = harness.start(repo, studio.url, [harness.sys.executable, "parent.py"], "--interval", "0.1")
    assert studio.wait_for(lambda s: s.count("data") >= 2)
    proc.terminate()
    outcome = harness.finish(proc, repo)
    assert (repo / "child-got-sigterm").exists()
    harness.check(outcome, studio, status=5)
