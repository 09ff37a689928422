"""Shared fixtures: a real loopback Studio server, a throwaway Git repository, and a way to run the
real `livesend` command (as a subprocess, the way users run it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(HERE))

from studio_server import StudioServer  # noqa: E402

TOKEN = "lsd-SECRET-token-7f3a9c"  # recognisable: tests assert it never leaks

# Variables of the developer's or CI's own environment that would change what livesend detects.
_CI_VARS = ("GITHUB_", "GITLAB_", "CI_", "STUDIO_", "DVC_", "LIVESEND_", "RUNNER_", "INPUT_")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CI_VARS) and k not in ("CI",)}
    env.update({"PYTHONUNBUFFERED": "1", "GIT_TERMINAL_PROMPT": "0"})
    env.update(extra)
    return env


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def studio():
    with StudioServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A Git repository with one commit and an `origin` remote (with credentials, as GitLab clones)."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "t@example.com")
    git(path, "config", "user.name", "t")
    git(path, "remote", "add", "origin", "https://gitlab-ci-token:job-secret-123@example.com/group/project.git")
    (path / "README").write_text("x\n")
    git(path, "add", "README")
    git(path, "commit", "-q", "-m", "init")
    return path


def livesend_cmd(*args: str) -> list:
    return [sys.executable, "-m", "livesend", *args]


def run_livesend(repo: Path, studio_url: str, command: list, *options: str, token: str | None = TOKEN,
                 env: dict | None = None, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """Run `livesend run OPTIONS -- COMMAND` in `repo` and wait for it."""
    environment = clean_env(STUDIO_ENDPOINT=studio_url, **(env or {}))
    if token is not None:
        environment["STUDIO_TOKEN"] = token
    return subprocess.run(
        livesend_cmd("run", *options, "--", *command), cwd=repo, env=environment, capture_output=True, text=True,
        timeout=timeout, **popen,
    )


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll a condition with a deadline (never a bare sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (its own process groups too), as a runner killing a
    job's container or the OOM killer does; then reap it."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=30)


def descendants(pid: int) -> list:
    """The live (not yet reaped) descendants of process `pid`, from /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found
