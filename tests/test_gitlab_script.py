"""The `.livesend` job script run directly by dash, as GitLab runs a job in an image without bash: it
must stay POSIX. Also what gitlab-ci-local hides: the raw collapsible-section markers GitLab parses,
and the failure paths (install, strict delivery)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT, TOKEN, clean_env, git

SCRIPT = yaml.safe_load((ROOT / "gitlab" / "livesend.gitlab-ci.yml").read_text())[".livesend"]["script"]
SH = shutil.which("dash") or "/bin/sh"
PROJECT_URL = "https://gitlab.example.com/acme/ml"


@pytest.fixture
def job_python(tmp_path) -> Path:
    """A venv seeing the system site-packages (livesend from this checkout, numpy, dvclive) whose
    `pip` installs into the venv, never into the interpreter running the tests."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
                   check=True, timeout=120)
    return path / "bin"


def run_script(repo: Path, bin_dir: Path, token: str | None = TOKEN, **variables: str) -> subprocess.CompletedProcess:
    """The script as GitLab's runner runs it with sh: `set -e`, job variables in the environment."""
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GITLAB_CI="true", CI_PROJECT_URL=PROJECT_URL,
                    CI_JOB_NAME="train", CI_JOB_NAME_SLUG="train", CI_JOB_ID="4242",
                    CI_COMMIT_SHA=git(repo, "rev-parse", "HEAD"), **variables)
    if token is not None:
        env["STUDIO_TOKEN"] = token
    raw = subprocess.run([SH, "-e", "-c", "\n".join(SCRIPT)], cwd=repo, env=env, capture_output=True,
                         timeout=180, stdin=subprocess.DEVNULL)
    # bytes, decoded by hand: text mode would turn the markers' \r into \n
    return subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())


def test_posix_sh_sections_status_and_no_token_for_setup(repo, studio, job_python):
    shutil.copy(EXAMPLES / "train.py", repo / "train.py")
    result = run_script(
        repo, job_python, STUDIO_ENDPOINT=studio.url, LIVESEND_INSTALL="none", LIVESEND_INTERVAL="0.2",
        LIVESEND_SETUP='if [ -n "${STUDIO_TOKEN:-}${DVC_STUDIO_TOKEN:-}" ]; then echo setup-sees-token; '
                       'else echo setup-has-no-token; fi',
        LIVESEND_RUN='python train.py --epochs 5 --exit-code 3 && echo never',
    )
    out = result.stdout
    assert result.returncode == 3, result.stderr
    # GitLab's format: ESC[0K section_start:<unix time>:<name>[options] CR ESC[0K <header>
    assert re.search(r"\x1b\[0Ksection_start:\d+:livesend_install\[collapsed=true\]\r\x1b\[0Klivesend: install\n", out)
    assert re.search(r"\x1b\[0Ksection_end:\d+:livesend_install\r\x1b\[0K\n", out)
    assert re.search(r"\x1b\[0Ksection_start:\d+:livesend_summary\r\x1b\[0Klivesend: summary\n", out)
    assert re.search(r"\x1b\[0Ksection_end:\d+:livesend_summary\r\x1b\[0K\n$", out)
    assert "\nsetup-has-no-token\n" in out and "\nsetup-sees-token\n" not in out  # (the command is echoed)
    assert "trained 5 epochs" in out and "never" not in out
    assert "the training failed with exit status 3; the job exits with status 3." in out
    assert out.index("trained 5 epochs") < out.index("livesend_summary")
    assert studio.count("start", "train-4242") == 1 and studio.count("done", "train-4242") == 1
    assert {b["repo_url"] for b in studio.accepted} == {PROJECT_URL}
    assert TOKEN not in out + result.stderr


def test_install_failure_names_the_variable_and_hides_the_index_password(repo, studio, job_python):
    password = "idx-PASSWORD-9a8b7c"
    result = run_script(
        repo, job_python, STUDIO_ENDPOINT=studio.url, LIVESEND_RUN="python -c 'print(1)'",
        LIVESEND_INSTALL=f"--retries 0 --timeout 2 --index-url https://reader:{password}@127.0.0.1:9/simple "
                         "--no-cache-dir livesend-no-such-package",
    )
    assert result.returncode != 0
    assert "livesend: error: pip could not install livesend from LIVESEND_INSTALL=" in result.stderr
    assert "https://***@127.0.0.1:9/simple" in result.stdout + result.stderr
    assert password not in result.stdout + result.stderr
    assert "livesend_summary" not in result.stdout  # the training never started
    assert studio.received == []


def test_strict_without_token_fails_the_job_and_says_why(repo, job_python):
    result = run_script(repo, job_python, token=None, LIVESEND_INSTALL="none", LIVESEND_STRICT="true",
                        LIVESEND_RUN="echo trained")
    assert result.returncode == 3
    assert "trained" in result.stdout
    assert "the training succeeded; the job exits with status 3 (LIVESEND_STRICT: delivery to Studio failed)." \
        in result.stdout
    assert result.stderr.count("live metrics are off") == 1


def test_empty_run_stops_before_anything(repo, job_python):
    result = run_script(repo, job_python, LIVESEND_RUN="")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("livesend: error: LIVESEND_RUN is empty")
