"""The `.livesend` job script run directly by dash, as GitLab runs a job in an image without bash: it
must stay POSIX. Also what gitlab-ci-local hides: the raw collapsible-section markers GitLab parses
(the install section is the script's, the summary section livesend's own), the failure paths (install,
strict delivery), and the merge request note of `comment: true` with the tokens kept from install and
setup."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT, TOKEN, clean_env, git, kill_tree
from test_comment import WRITE, Forge

HIDDEN_JOB = yaml.safe_load((ROOT / "gitlab" / "livesend.gitlab-ci.yml").read_text())[".livesend"]
SCRIPT, AFTER_SCRIPT = HIDDEN_JOB["script"], HIDDEN_JOB["after_script"]
COMPONENT = ROOT / "templates" / "livesend.yml"
SH = shutil.which("dash") or "/bin/sh"
PROJECT_URL = "https://gitlab.example.com/acme/ml"
GITHUB_TOKEN = "ghp-OTHER-comment-token-4d5e6f"
SECRETS = ("STUDIO_TOKEN", "DVC_STUDIO_TOKEN", "LIVESEND_GITLAB_TOKEN", "LIVESEND_GITHUB_TOKEN")
# which of the secret variables a process started by the job sees, as one log line
SEES = "python -c \"import os; print('{what}-sees', sorted(k for k in os.environ if k.endswith('_TOKEN')))\""
# GitLab's section markers: ESC[0K section_start:<unix time>:<name>[options] CR ESC[0K <header>
SUMMARY_START = r"\x1b\[0Ksection_start:\d+:livesend_summary\r\x1b\[0Klivesend: summary\n"
SUMMARY_END = r"\x1b\[0Ksection_end:\d+:livesend_summary\r\x1b\[0K\n"
ARTIFACTS = "livesend: the job artifacts keep the DVCLive files, also when the job fails (job page > Job artifacts)"


@pytest.fixture
def job_python(tmp_path) -> Path:
    """A venv seeing the system site-packages (livesend from this checkout, numpy, dvclive) whose
    `pip` installs into the venv, never into the interpreter running the tests."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
                   check=True, timeout=120)
    return path / "bin"


def job_env(repo: Path, bin_dir: Path, token: str | None = TOKEN, **variables: str) -> dict:
    """The job's environment as GitLab's runner gives it: predefined variables, then the job's."""
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GITLAB_CI="true", CI_PROJECT_URL=PROJECT_URL,
                    CI_JOB_NAME="train", CI_JOB_NAME_SLUG="train", CI_JOB_ID="4242",
                    CI_COMMIT_SHA=git(repo, "rev-parse", "HEAD"), **variables)
    if token is not None:
        env["STUDIO_TOKEN"] = token
    return env


def run_script(repo: Path, bin_dir: Path, token: str | None = TOKEN, merged: bool = False,
               **variables: str) -> subprocess.CompletedProcess:
    """The script as GitLab's runner runs it with sh: `set -e`, job variables in the environment.
    `merged`: stderr into stdout, one log in the order it was written, as the runner keeps it."""
    env = job_env(repo, bin_dir, token, **variables)
    raw = subprocess.run([SH, "-e", "-c", "\n".join(SCRIPT)], cwd=repo, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT if merged else subprocess.PIPE, timeout=180,
                         stdin=subprocess.DEVNULL)
    # bytes, decoded by hand: text mode would turn the markers' \r into \n
    return subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), (raw.stderr or b"").decode())


def test_posix_sh_sections_status_and_no_token_for_setup(repo, studio, job_python):
    shutil.copy(EXAMPLES / "train.py", repo / "train.py")
    result = run_script(
        repo, job_python, merged=True, STUDIO_ENDPOINT=studio.url, LIVESEND_INSTALL="none", LIVESEND_INTERVAL="0.2",
        DVC_STUDIO_TOKEN=TOKEN, LIVESEND_GITLAB_TOKEN=WRITE, LIVESEND_GITHUB_TOKEN=GITHUB_TOKEN,
        LIVESEND_SETUP=SEES.format(what="setup"),
        LIVESEND_RUN='python train.py --epochs 5 --exit-code 3 && echo never',
    )
    log = result.stdout
    assert result.returncode == 3, log
    assert re.search(r"\x1b\[0Ksection_start:\d+:livesend_install\[collapsed=true\]\r\x1b\[0Klivesend: install\n", log)
    assert re.search(r"\x1b\[0Ksection_end:\d+:livesend_install\r\x1b\[0K\n", log)
    assert "\nsetup-sees []\n" in log
    assert "trained 5 epochs" in log and "never" not in log
    # livesend's own summary section, with its wording, after the training and before the artifacts line
    summary = re.search(SUMMARY_START + r"(.*?)" + SUMMARY_END + re.escape(ARTIFACTS), log, re.S)
    assert summary, log
    assert log.index("trained 5 epochs") < summary.start()
    lines = summary[1].splitlines()
    assert lines[0] == "livesend: the command failed with exit status 3."
    assert re.fullmatch(r"livesend: experiment train-4242: \d+ data events sent to 127\.0\.0\.1:\d+, 0 failed; .*; done\.",
                        lines[1])
    assert "livesend: results in dvclive at step 4:" in lines
    assert "livesend: The command failed: the results of such a run are worth keeping too " \
           "(or delete the experiment in Studio)." in lines
    assert "livesend:   git add dvclive dvc.yaml && git commit -m 'Results of train-4242' && git push" in lines
    assert log.count("livesend_summary") == 2 and log.endswith("to commit them.\n")
    assert studio.count("start", "train-4242") == 1 and studio.count("done", "train-4242") == 1
    assert {b["repo_url"] for b in studio.accepted} == {PROJECT_URL}
    for secret in (TOKEN, WRITE, GITHUB_TOKEN):
        assert secret not in log


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
    assert "livesend_summary" not in result.stdout + result.stderr  # livesend never started
    assert ARTIFACTS not in result.stdout + result.stderr
    assert studio.received == []


def test_strict_without_token_fails_the_job_and_says_why(repo, job_python):
    result = run_script(repo, job_python, token=None, LIVESEND_INSTALL="none", LIVESEND_STRICT="true",
                        LIVESEND_RUN="echo trained")
    assert result.returncode == 3
    assert result.stdout.endswith("\x1b[0K\ntrained\n")  # after the install section
    summary = re.search(SUMMARY_START + r"(.*?)" + SUMMARY_END + r"(.*)", result.stderr, re.S)
    assert summary, result.stderr
    assert summary[1].splitlines()[:2] == ["livesend: the command succeeded.",
                                           "livesend: no DVCLive output was sent to Studio (live metrics were off)."]
    # after the section, the reason for the exit status; no artifacts line: there are no DVCLive files
    assert summary[2] == "livesend: --strict: delivery to Studio failed, so livesend exits 3 although the command " \
                         "succeeded\n"
    assert result.stderr.count("live metrics are off") == 1


def test_empty_run_stops_before_anything(repo, job_python):
    result = run_script(repo, job_python, LIVESEND_RUN="")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("livesend: error: LIVESEND_RUN is empty")


# An in-tree PEP 517 backend whose build writes down which secret variables pip's build process sees:
# LIVESEND_INSTALL pointed at it shows what the install step hands to pip and to the code pip runs.
PROBE_BACKEND = '''\
import base64, hashlib, os, zipfile

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open({report!r}, "a") as f:
        f.write(repr(sorted(k for k in os.environ if k.endswith("_TOKEN"))) + "\\n")
    dist = "livesend_install_probe-0.0.0.dist-info"
    files = {{dist + "/METADATA": "Metadata-Version: 2.1\\nName: livesend-install-probe\\nVersion: 0.0.0\\n",
              dist + "/WHEEL": "Wheel-Version: 1.0\\nGenerator: probe\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}}
    name = "livesend_install_probe-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as whl:
        record = []
        for path, text in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{{path}},sha256={{digest}},{{len(text.encode())}}")
            whl.writestr(path, text)
        whl.writestr(dist + "/RECORD", "\\n".join(record + [dist + "/RECORD,,"]) + "\\n")
    return name
'''


def install_probe(tmp_path: Path) -> tuple:
    """A project for LIVESEND_INSTALL (pip arguments) and the file its build reports to."""
    project, report = tmp_path / "install-probe", tmp_path / "install-probe.txt"
    project.mkdir()
    (project / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "probe_backend"\n'
                                            'backend-path = ["."]\n')
    (project / "probe_backend.py").write_text(PROBE_BACKEND.format(report=str(report)))
    return f"--no-index --no-deps --no-build-isolation --no-cache-dir {project}", report


def test_the_install_probe_sees_a_token_handed_to_pip(tmp_path, job_python):
    """Negative control: pip without the script's `env -u` hands LIVESEND_GITLAB_TOKEN to the build."""
    arguments, report = install_probe(tmp_path)
    subprocess.run([str(job_python / "python"), "-m", "pip", "install", "-q", *arguments.split()], check=True,
                   timeout=120, env=clean_env(LIVESEND_GITLAB_TOKEN=WRITE, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert report.read_text() == "['LIVESEND_GITLAB_TOKEN']\n"


def test_component_comment_input_posts_the_merge_request_note(repo, studio, job_python, tmp_path):
    """`comment: true` becomes LIVESEND_COMMENT=true; the job script then has livesend post the report on
    the merge request (loopback GitLab API) with LIVESEND_GITLAB_TOKEN, which install, setup and the
    training never see."""
    header, component = yaml.safe_load_all(COMPONENT.read_text())
    spec = header["spec"]["inputs"]["comment"]
    assert spec["type"] == "boolean" and spec["default"] is False
    variables = component["$[[ inputs.job-name ]]"]["variables"]
    assert variables["LIVESEND_COMMENT"] == "$[[ inputs.comment ]]"
    assert component["$[[ inputs.job-name ]]"]["script"] == SCRIPT
    shutil.copy(EXAMPLES / "train.py", repo / "train.py")
    install, report = install_probe(tmp_path)
    with Forge() as forge:
        result = run_script(
            repo, job_python, merged=True, STUDIO_ENDPOINT=studio.url, LIVESEND_INTERVAL="0.2",
            LIVESEND_COMMENT=variables["LIVESEND_COMMENT"].replace("$[[ inputs.comment ]]", "true"),
            LIVESEND_GITLAB_TOKEN=WRITE, LIVESEND_GITHUB_TOKEN=GITHUB_TOKEN, LIVESEND_INSTALL=install,
            LIVESEND_SETUP=SEES.format(what="setup"),
            LIVESEND_RUN=f"{SEES.format(what='training')} && python train.py --epochs 3",
            CI_SERVER_URL=f"{forge.url}/gl", CI_PROJECT_ID="42", CI_MERGE_REQUEST_IID="5",
        )
        log = result.stdout
        assert result.returncode == 0, log
        assert report.read_text() == "[]\n", "pip's build saw a token"
        assert "\nsetup-sees []\n" in log and "\ntraining-sees []\n" in log
        assert "livesend: --comment: created the report note on merge request !5" in log
        (note,) = forge.notes[("42", 5)]
        assert note["body"].startswith("<!-- livesend:train -->\n") and "`train-4242`" in note["body"]
        assert {token for _, _, token in forge.requests} == {WRITE}
    for secret in (TOKEN, WRITE, GITHUB_TOKEN):
        assert secret not in log


# --- after_script: a cancelled job ---------------------------------------------------------------------


def run_after_script(repo: Path, bin_dir: Path, status: str, **variables: str) -> subprocess.CompletedProcess:
    """The after_script as the runner runs it: a new shell, CI_JOB_STATUS set."""
    env = job_env(repo, bin_dir, CI_JOB_STATUS=status, **variables)
    return subprocess.run([SH, "-e", "-c", "\n".join(AFTER_SCRIPT)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("status", ["canceled", "failed"])
def test_after_script_marks_the_run_of_a_cancelled_job_done(repo, studio, job_python, status):
    """The runner kills the job's processes without a signal livesend could act on (shell executor,
    gitlab-runner#27443), or the kernel kills livesend (OOM): no `done`. The after_script, which GitLab
    runs then too (CI_JOB_STATUS canceled, failed), sends it, once."""
    shutil.copy(EXAMPLES / "train.py", repo / "train.py")
    job = subprocess.Popen(
        [SH, "-e", "-c", "\n".join(SCRIPT)], cwd=repo, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=job_env(repo, job_python, STUDIO_ENDPOINT=studio.url, LIVESEND_INSTALL="none",
                                               LIVESEND_INTERVAL="0.1",
                                               LIVESEND_RUN="python train.py --epochs 100000 --sleep 0.05"))
    try:
        assert studio.wait_for(lambda s: s.count("data", "train-4242") >= 2, timeout=60)
    finally:
        kill_tree(job)
    assert studio.count("done") == 0
    cancelled = run_after_script(repo, job_python, status, STUDIO_ENDPOINT=studio.url, LIVESEND_INSTALL="none")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stderr == "livesend: marked experiment train-4242 done in Studio\n"
    assert studio.count("done", "train-4242") == 1 and studio.invalid == []
    again = run_after_script(repo, job_python, "success", STUDIO_ENDPOINT=studio.url)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")  # nothing left open: not even a pip run
    assert studio.count("done") == 1
    assert TOKEN not in cancelled.stdout + cancelled.stderr


def test_after_script_where_livesend_cannot_run_says_what_to_do(repo, tmp_path):
    """A fresh container without livesend, whose reinstall fails: one line, the job's status untouched."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    (repo / ".git" / "livesend" / "open").mkdir(parents=True)
    (repo / ".git" / "livesend" / "open" / "train-4242.json").write_text("{}")
    result = run_after_script(repo, bare / "bin", "canceled", LIVESEND_INSTALL="livesend-no-such-package")
    assert result.returncode == 0
    assert result.stderr.startswith("livesend: Studio was not told that the run ended, and livesend cannot run here")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
