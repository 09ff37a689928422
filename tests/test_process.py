"""Unit tests of the wrapped command's environment and exit status (livesend.process)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from livesend.process import child_env, exit_status

TOKEN = "lsd-SECRET-token-7f3a9c"


def test_child_env_drops_every_token_variable():
    env = {
        "PATH": "/usr/bin", "HOME": "/root", "STUDIO_TOKEN": TOKEN, "DVC_STUDIO_TOKEN": "another-token",
        "MY_COPY": TOKEN, "AUTH_HEADER": f"token {TOKEN}", "DVC_STUDIO_URL": "https://studio.example",
        "EMPTY": "",
    }
    out = child_env(env, TOKEN, "areal-coze")
    assert "STUDIO_TOKEN" not in out and "DVC_STUDIO_TOKEN" not in out
    assert "MY_COPY" not in out and "AUTH_HEADER" not in out
    assert TOKEN not in "".join(out.values()) and "another-token" not in "".join(out.values())
    assert {k: out[k] for k in ("PATH", "HOME", "DVC_STUDIO_URL", "EMPTY")} == {
        "PATH": "/usr/bin", "HOME": "/root", "DVC_STUDIO_URL": "https://studio.example", "EMPTY": ""}
    assert env["STUDIO_TOKEN"] == TOKEN  # the caller's mapping is left alone


def test_child_env_sets_offline_and_the_experiment_name():
    out = child_env({"DVC_STUDIO_OFFLINE": "false", "DVC_EXP_NAME": "users-own", "PATH": "/bin"}, None, "train-1-1-abcd")
    assert out["DVC_STUDIO_OFFLINE"] == "true" and out["DVC_EXP_NAME"] == "train-1-1-abcd"
    assert out["PATH"] == "/bin"


def test_child_env_without_token_keeps_everything_else():
    env = {"A": "1", "B": "", "DVC_STUDIO_TOKEN": ""}
    out = child_env(env, None, "n")
    assert out == {"A": "1", "B": "", "DVC_STUDIO_OFFLINE": "true", "DVC_EXP_NAME": "n"}
    assert child_env(env, "", "n") == out  # an empty token matches nothing


def test_child_env_reaches_a_real_child():
    out = child_env({"PATH": "/usr/bin:/bin", "STUDIO_TOKEN": TOKEN, "X": TOKEN}, TOKEN, "exp")
    shown = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.environ.items()))"], env=out,
                           capture_output=True, text=True, check=True).stdout
    assert TOKEN not in shown and "('DVC_STUDIO_OFFLINE', 'true')" in shown and "('DVC_EXP_NAME', 'exp')" in shown


@pytest.mark.parametrize(
    "returncode, expected",
    [(0, 0), (1, 1), (3, 3), (126, 126), (255, 255), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143),
     (-signal.SIGINT, 130), (-signal.SIGHUP, 129), (-signal.SIGSEGV, 139)],
)
def test_exit_status(returncode, expected):
    assert exit_status(returncode) == expected


def test_exit_status_of_a_real_killed_child():
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert exit_status(proc.wait()) == 137
