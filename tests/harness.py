"""Runs `livesend run` for the reliability suites and checks the promises that hold in every case:
nothing lost (lost and duplicated rows counted separately), the last metrics/params/images sent equal
the files, the command's exit status unchanged, livesend done within --flush-timeout after the command,
and the token nowhere: not in output, record, report, payloads, files, or the command's environment."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conftest import EXAMPLES, TOKEN, clean_env, livesend_cmd
from dvclive_files import disk_state, received_state

# Wraps the command: records when it ended and dumps its environment, then exits with its status.
WRAPPER = (
    "import os, signal, subprocess, sys, time, pathlib\n"
    "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"  # the command's group gets them; a handler
    "    signal.signal(s, lambda *a: None)\n"  # (not SIG_IGN, which exec would pass on) keeps the wrapper alive

    "pathlib.Path('.child-environ').write_bytes(open('/proc/self/environ', 'rb').read())\n"
    "status = subprocess.call(sys.argv[1:])\n"
    "pathlib.Path('.command-ended').write_text(repr(time.time()))\n"
    "sys.exit(status)\n"
)
TRAIN = [sys.executable, str(EXAMPLES / "train.py")]
REMOTE_SECRET = "job-secret-123"  # in the `repo` fixture's origin URL


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    record: list
    report: dict
    command_ended: float
    livesend_ended: float
    repo: Path
    extra: dict = field(default_factory=dict)

    @property
    def flush_seconds(self) -> float:
        return self.livesend_ended - self.command_ended

    def lines(self, text: str) -> list:
        return [line for line in self.stderr.splitlines() if text in line]


def start(repo: Path, url: str, command: list, *options: str, token: str | None = TOKEN, env: dict | None = None,
          **popen) -> subprocess.Popen:
    (repo / ".wrapper.py").write_text(WRAPPER)
    environment = clean_env(STUDIO_ENDPOINT=url, **(env or {}))
    environment = {k: v for k, v in environment.items() if v is not None}  # env={"X": None} unsets X
    if token is not None:
        environment["STUDIO_TOKEN"] = token
    args = livesend_cmd(
        "run", "--record", str(repo / ".record.jsonl"), "--report-json", str(repo / ".report.json"), *options,
        "--", sys.executable, ".wrapper.py", *command,
    )
    return subprocess.Popen(args, cwd=repo, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def finish(proc: subprocess.Popen, repo: Path, timeout: float = 300) -> Outcome:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    ended = time.time()
    record_path, report_path = repo / ".record.jsonl", repo / ".report.json"
    command_ended = repo / ".command-ended"
    return Outcome(
        proc.returncode, out, err,
        [json.loads(line) for line in record_path.read_text().splitlines()] if record_path.exists() else [],
        json.loads(report_path.read_text()) if report_path.exists() else {},
        float(command_ended.read_text()) if command_ended.exists() else ended,
        ended, repo,
    )


def run(repo: Path, url: str, command: list, *options: str, timeout: float = 300, **kwargs) -> Outcome:
    return finish(start(repo, url, command, *options, **kwargs), repo, timeout)


def row_accounting(studio, repo: Path, live_dir: str = "dvclive", name: str | None = None) -> dict:
    """{"rows": on disk, "lost": not received, "duplicated": received more than once} over all TSVs."""
    expected = disk_state(repo / live_dir, repo)["plots"]
    got = received_state(studio.accepted, name)["plots"]
    rows = lost = duplicated = 0
    for path, disk_rows in expected.items():
        want = Counter(json.dumps(r, sort_keys=True) for r in disk_rows)
        have = Counter(json.dumps(r, sort_keys=True) for r in got.get(path, []))
        rows += sum(want.values())
        lost += sum((want - have).values())
        duplicated += sum((have - want).values())
    return {"rows": rows, "lost": lost, "duplicated": duplicated}


def check(outcome: Outcome, studio, *, status: int = 0, flush_timeout: float = 30.0, delivered: bool = True,
          duplicates_allowed: bool = False, live_dir: str = "dvclive", name: str | None = None) -> dict:
    """The promises of every case. Returns the row accounting."""
    assert outcome.returncode == status, outcome.stderr
    assert outcome.flush_seconds <= flush_timeout + 3.0, f"livesend took {outcome.flush_seconds:.1f} s after the command"
    assert studio.invalid == [] or all("Authorization" in (r.error or "") for r in studio.invalid), \
        [r.error for r in studio.invalid]
    assert_no_token(outcome, studio)
    accounting = row_accounting(studio, outcome.repo, live_dir, name)
    if delivered:
        assert accounting["lost"] == 0, accounting
        if not duplicates_allowed:
            assert accounting["duplicated"] == 0, accounting
        expected = disk_state(outcome.repo / live_dir, outcome.repo)
        got = received_state(studio.accepted, name)
        assert got["metrics"] == expected["metrics"]
        assert got["params"] == expected["params"]
        assert got["images"] == expected["images"]
    return accounting


def assert_no_token(outcome: Outcome, studio) -> None:
    """The Studio token, and the job token in the Git remote URL (the `repo` fixture's), appear nowhere."""
    for text in (outcome.stdout, outcome.stderr, json.dumps(outcome.record), json.dumps(outcome.report)):
        assert TOKEN not in text
        assert REMOTE_SECRET not in text
    for received in studio.received:
        assert TOKEN not in json.dumps(received.body)
        assert REMOTE_SECRET not in json.dumps(received.body)
    environ = outcome.repo / ".child-environ"
    if environ.exists():
        assert TOKEN.encode() not in environ.read_bytes()
    for path in outcome.repo.rglob("*"):
        ours = path.relative_to(outcome.repo).parts[:2] == (".git", "livesend")  # the open-experiment ledger
        if path.is_file() and (ours or ".git" not in path.parts) and path.stat().st_size < 50_000_000:
            assert TOKEN.encode() not in path.read_bytes(), path
