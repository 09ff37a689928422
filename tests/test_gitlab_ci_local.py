"""The GitLab template (`.livesend` hidden job), the CI/CD component and the example pipeline, run for real
by gitlab-ci-local 4.73.0 with the shell executor: livesend installed from this checkout through
LIVESEND_INSTALL, a real DVCLive training (examples/train.py), the loopback Studio server.

How GitLab is reproduced here:
- the project is a throwaway Git repository whose `origin` carries a job token in its URL, as GitLab's
  clone does; gitlab-ci-local derives CI_PROJECT_URL, CI_SERVER_FQDN and CI_PROJECT_PATH from it;
- the token reaches the job through the environment only (never argv, never a file): gitlab-ci-local
  hands its own environment to shell-executor jobs, as a runner does with a masked variable;
- other project CI/CD variables go into `.gitlab-ci-local-variables.yml` (untracked), including
  GITLAB_CI=true: gitlab-ci-local sets "false" where GitLab sets "true";
- `include: project` and a released component are fetched the way gitlab-ci-local fetches them, with
  `git clone` over HTTP, from a loopback Git host (`git http-backend`) holding acme/livesend tagged
  v<version>; `include: remote` from a loopback web server;
- the job installs livesend into a virtual environment of its own (system site-packages visible, so the
  training's numpy/dvclive need no download), never into the interpreter running these tests.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import EXAMPLES, ROOT, TOKEN, clean_env, git
from dvclive_files import disk_state, received_state
from test_comment import WRITE, Forge

import livesend

GCL = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "gitlab-ci-local"
GCL_VERSION = "4.73.0"
TEMPLATE = ROOT / "gitlab" / "livesend.gitlab-ci.yml"
COMPONENT = ROOT / "templates" / "livesend.yml"
EXAMPLE = ROOT / "examples" / "gitlab" / ".gitlab-ci.yml"
PROJECT_URL = "https://gitlab.example.com/acme/ml"
JOB_TOKEN = "glcbt-JOBTOKEN-5e4d3c2b1a"  # what GitLab writes into the clone's `origin` URL
ORIGIN = f"https://gitlab-ci-token:{JOB_TOKEN}@gitlab.example.com/acme/ml.git"

ARTIFACTS = "livesend: the job artifacts keep the DVCLive files, also when the job fails (job page > Job artifacts)"

pytestmark = pytest.mark.timeout(240)


# --- tools and builds ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gitlab_ci_local() -> Path:
    if not GCL.exists():
        pytest.fail(f"{GCL.relative_to(ROOT)} is missing: run .ci/install-gitlab.sh")
    if shutil.which("rsync") is None:
        pytest.fail("rsync is missing (gitlab-ci-local copies the project with it): run .ci/install-gitlab.sh")
    version = subprocess.run([str(GCL), "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    assert version == GCL_VERSION, f"gitlab-ci-local {version}; the tests pin {GCL_VERSION} (4.74+ crash on Node 20)"
    return GCL


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """livesend built from this checkout. From a copy of it, so that builds never share a build/ folder."""
    base = tmp_path_factory.mktemp("livesend-build")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".ci", "node_modules", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
        ".gitlab-ci-local", "dvclive", ".benchmarks", ".venv"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, result.stderr
    (built,) = (base / "dist").glob("livesend-*.whl")
    return built


@pytest.fixture
def venv(tmp_path) -> Path:
    """The job's Python: a venv that sees the system site-packages, with a `pip` that installs into it."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
                   check=True, timeout=120)
    pip = path / "bin" / "pip"
    pip.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
    pip.chmod(0o755)
    return path


@pytest.fixture
def remote_include():
    """A loopback web server publishing gitlab/ (for `include: remote`)."""
    handler = functools.partial(_QuietFiles, directory=str(ROOT / "gitlab"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/livesend.gitlab-ci.yml"
    httpd.shutdown()
    httpd.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class GitHost:
    """A GitLab stand-in for what gitlab-ci-local fetches over HTTP: `git clone` of other projects, served
    by `git http-backend` (Git's own smart-HTTP server) on 127.0.0.1. It holds acme/livesend, this
    checkout's GitLab files committed and tagged v<version> as a release would be."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_GitBackend, root=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def publish_livesend(self, work: Path) -> None:
        work.mkdir()
        git(work, "init", "-q", "-b", "main")
        for path in (TEMPLATE, COMPONENT):
            target = work / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        git(work, "add", "-A")
        git(work, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "release")
        git(work, "tag", f"v{livesend.__version__}")
        bare = self.root / "acme" / "livesend.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        git(work, "clone", "-q", "--bare", str(work), str(bare))
        git(bare, "config", "uploadpack.allowFilter", "true")  # gitlab-ci-local clones with --filter=tree:0

    def origin(self, project: str) -> str:
        """The `origin` of a GitLab clone of `project` on this host, job token included."""
        return f"http://gitlab-ci-token:{JOB_TOKEN}@127.0.0.1:{self.port}/{project}.git"

    def project_url(self, project: str) -> str:
        return f"http://127.0.0.1:{self.port}/{project}"


class _GitBackend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, root: str, **kwargs) -> None:
        self.git_root = root
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._cgi()

    def do_POST(self) -> None:  # noqa: N802
        self._cgi()

    def _cgi(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": self.git_root, "GIT_HTTP_EXPORT_ALL": "1",
               "REQUEST_METHOD": self.command, "PATH_INFO": url.path, "QUERY_STRING": url.query,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
               "REMOTE_ADDR": "127.0.0.1", "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", "")}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def git_host(tmp_path):
    host = GitHost(tmp_path / "git-host")
    host.publish_livesend(tmp_path / "livesend-release")
    host.thread.start()
    yield host
    host.httpd.shutdown()
    host.httpd.server_close()


# --- a project and a pipeline run ---------------------------------------------------------------------


def make_project(tmp_path: Path, pipeline: str, files: dict | None = None, origin: str = ORIGIN) -> Path:
    """A Git repository as a GitLab job sees it, with the pipeline and a copy of the example training."""
    path = tmp_path / "project"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "t@example.com")
    git(path, "config", "user.name", "t")
    git(path, "remote", "add", "origin", origin)
    (path / ".gitlab-ci.yml").write_text(pipeline)
    shutil.copy(EXAMPLES / "train.py", path / "train.py")
    (path / ".gitignore").write_text(".gitlab-ci-local/\n.gitlab-ci-local-variables.yml\n")
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    git(path, "update-ref", "refs/remotes/origin/main", "HEAD")
    git(path, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
    return path


@dataclass
class Pipeline:
    returncode: int
    output: str  # what gitlab-ci-local printed
    logs: dict  # job name -> its log file (.gitlab-ci-local/output/<job>.log)
    project: Path

    @property
    def everything(self) -> str:
        return self.output + "".join(self.logs.values())

    def artifact(self, job: str, name: str) -> Path:
        return self.project / ".gitlab-ci-local" / "artifacts" / job / name


def run_pipeline(gcl: Path, project: Path, venv: Path, variables: dict, token: str | None = TOKEN,
                 overridden: tuple = (), masked: dict | None = None) -> Pipeline:
    """`gitlab-ci-local --force-shell-executor` in `project`. `variables` are project CI/CD variables
    (a variables file); `overridden` names predefined variables among them that we set on purpose;
    `masked` are more masked variables, passed like the token through the environment."""
    (project / ".gitlab-ci-local-variables.yml").write_text(yaml.safe_dump(
        # explicit `type: variable`: a bare value that is an existing path would become a file variable
        {key: {"type": "variable", "values": {"*": str(value)}} for key, value in variables.items()}
    ))
    env = clean_env(
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        GCL_IGNORE_PREDEFINED_VARS=",".join(("GITLAB_CI", *overridden)),
    )
    if token is not None:
        env["STUDIO_TOKEN"] = token
    env.update(masked or {})
    home = project.parent / "gcl-home"
    home.mkdir(exist_ok=True)
    result = subprocess.run(
        [str(gcl), "--force-shell-executor", "--no-color", "--home", str(home)],
        cwd=project, env=env, capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL,
    )
    outputs = project / ".gitlab-ci-local" / "output"
    logs = {p.stem: p.read_text(errors="replace") for p in outputs.glob("*.log")} if outputs.exists() else {}
    return Pipeline(result.returncode, result.stdout + result.stderr, logs, project)


def job_variables(studio, wheel: Path, **more) -> dict:
    return {"GITLAB_CI": "true", "STUDIO_ENDPOINT": studio.url, "LIVESEND_INSTALL": str(wheel),
            "LIVESEND_INTERVAL": "0.2", **more}


# --- checks -------------------------------------------------------------------------------------------


def assert_no_secret(run: Pipeline, studio) -> None:
    """Neither the Studio token, the merge request note token nor the job token in the log, in any file
    the run wrote, or (the job token) in anything sent to Studio."""
    for secret in (TOKEN, WRITE, JOB_TOKEN):
        assert secret not in run.everything
    for path in run.project.rglob("*"):
        if path.is_file() and ".git" not in path.relative_to(run.project).parts:
            data = path.read_bytes()
            assert TOKEN.encode() not in data and WRITE.encode() not in data, path
    assert JOB_TOKEN not in repr([r.body for r in studio.received])


def assert_streamed(studio, project: Path, name: str, baseline: str, project_url: str = PROJECT_URL) -> None:
    """start, data, done arrived, all valid, with GitLab's identity, and every DVCLive row once."""
    assert studio.invalid == [], [r.error for r in studio.invalid]
    bodies = studio.accepted
    assert [b["type"] for b in bodies][0] == "start" and bodies[-1]["type"] == "done"
    assert studio.count("start") == 1 and studio.count("done") == 1 and studio.count("data") >= 1
    for body in bodies:
        assert body["repo_url"] == project_url
        assert body["baseline_sha"] == baseline
        assert body["name"] == name
    assert all(r.headers.get("Authorization") == f"token {TOKEN}" for r in studio.received)
    expected, got = disk_state(project / "dvclive", project), received_state(bodies)
    assert got == expected


def job_name(run: Pipeline, job: str = "train") -> str:
    """The experiment name GitLab context gives: <job name slug>-<job id> (echoed by the test pipeline)."""
    found = re.findall(r"experiment-name=(\S+)", run.logs[job])
    assert found, run.output
    return found[-1]


def assert_sections(log: str) -> None:
    """The collapsible sections (gitlab-ci-local shows a section as `<name>_started` ... `took`): the
    script's install section, then livesend's own summary and, after it, the script's artifacts line."""
    assert "livesend_install_started" in log and "livesend_install took" in log
    assert "livesend_summary_started" in log and "livesend_summary took" in log
    assert log.count("livesend_summary_started") == 1
    assert log.index("livesend_install took") < log.index("livesend_summary_started")
    assert log.index("livesend_summary took") < log.index(ARTIFACTS)


def assert_report(log: str, outcome: str, name: str) -> None:
    """livesend's own end-of-run report in the job log: outcome, delivery, metrics, the commit command."""
    assert f"livesend: the command {outcome}." in log
    assert re.search(rf"livesend: experiment {re.escape(name)}: \d+ data events sent to 127\.0\.0\.1:\d+, 0 failed; "
                     r".*; done\.", log)
    assert "livesend: results in dvclive at step" in log
    assert f"git add dvclive dvc.yaml && git commit -m 'Results of {name}' && git push" in log


def assert_artifacts(run: Pipeline, job: str = "train") -> None:
    for name in ("dvclive/metrics.json", "dvclive/params.yaml", "dvc.yaml"):
        kept = run.artifact(job, name)
        assert kept.is_file(), f"{name} is not among the artifacts"
        assert kept.read_bytes() == (run.project / name).read_bytes()


HIDDEN_JOB = """\
include:
  - {include}

train:
  extends: .livesend
  image: python:3.12
  before_script:
    - echo "experiment-name=$CI_JOB_NAME_SLUG-$CI_JOB_ID"
  variables:
    LIVESEND_RUN: {run}
"""


# --- the hidden job -----------------------------------------------------------------------------------


def test_hidden_job_streams_a_real_training(gitlab_ci_local, wheel, venv, studio, tmp_path):
    pipeline = HIDDEN_JOB.format(include="local: gitlab/livesend.gitlab-ci.yml",
                                 run="python train.py --epochs 12 --image-every 4")
    project = make_project(tmp_path, pipeline, {"gitlab/livesend.gitlab-ci.yml": TEMPLATE.read_text()})
    run = run_pipeline(gitlab_ci_local, project, venv, job_variables(studio, wheel))
    assert run.returncode == 0, run.output
    assert "PASS  train" in run.output
    log = run.logs["train"]
    assert "trained 12 epochs" in log
    assert_streamed(studio, project, job_name(run), git(project, "rev-parse", "HEAD"))
    assert_sections(log)
    assert_report(log, "succeeded", job_name(run))
    assert "live metrics are off" not in log
    assert_artifacts(run)
    assert_no_secret(run, studio)


def test_failed_training_fails_the_job_and_keeps_artifacts(gitlab_ci_local, wheel, venv, studio, tmp_path,
                                                           remote_include):
    """Through `include: remote` this time; the training exits 1, so the job does."""
    pipeline = HIDDEN_JOB.format(include=f"remote: {remote_include}",
                                 run="python train.py --epochs 6 --image-every 3 --exit-code 1")
    project = make_project(tmp_path, pipeline)
    run = run_pipeline(gitlab_ci_local, project, venv, job_variables(studio, wheel))
    assert run.returncode != 0
    assert "FAIL 1" in run.output and "FAIL  train" in run.output
    log = run.logs["train"]
    assert "trained 6 epochs" in log
    assert_report(log, "failed with exit status 1", job_name(run))
    assert "livesend: The command failed: the results of such a run are worth keeping too" in log
    assert_streamed(studio, project, job_name(run), git(project, "rev-parse", "HEAD"))
    assert_artifacts(run)  # `when: always`
    assert_no_secret(run, studio)


def test_after_script_closes_the_run_of_a_killed_livesend(gitlab_ci_local, wheel, venv, studio, tmp_path):
    """livesend is killed (SIGKILL, as the OOM killer or a runner without SIGTERM would) before it could
    send `done`: the job fails with 137, and the template's after_script, which GitLab runs after the
    script, marks the experiment done in Studio."""
    go = tmp_path / "go"  # the kill waits until Studio has the experiment's start and data
    pipeline = HIDDEN_JOB.format(
        include="local: gitlab/livesend.gitlab-ci.yml",
        run=f"python train.py --epochs 4 && until [ -e {go} ]; do sleep 0.05; done && kill -9 $$PPID",  # PPID: livesend
    )
    project = make_project(tmp_path, pipeline, {"gitlab/livesend.gitlab-ci.yml": TEMPLATE.read_text()})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(run_pipeline, gitlab_ci_local, project, venv, job_variables(studio, wheel))
        try:
            assert studio.wait_for(lambda s: s.count("data") >= 1, timeout=150), "no live data from the job"
        finally:
            go.touch()
        run = pending.result()
    assert run.returncode != 0 and "FAIL 137" in run.output, run.output
    name = job_name(run)
    log = run.logs["train"]
    assert "trained 4 epochs" in log and "livesend_summary" not in log  # livesend never got to its report
    assert f"livesend: marked experiment {name} done in Studio" in log
    assert log.index("trained 4 epochs") < log.index("close what the run left open") < log.index("marked experiment")
    assert studio.count("start", name) == 1 and studio.count("done", name) == 1
    (done,) = [b for b in studio.accepted if b["type"] == "done"]
    assert (done["repo_url"], done["baseline_sha"]) == (PROJECT_URL, git(project, "rev-parse", "HEAD"))
    assert studio.invalid == []
    assert_no_secret(run, studio)


def test_without_token_trains_with_one_warning(gitlab_ci_local, wheel, venv, studio, tmp_path):
    """A merge request from a fork gets no masked variables: the training runs, nothing is sent."""
    pipeline = HIDDEN_JOB.format(include="local: gitlab/livesend.gitlab-ci.yml", run="python train.py --epochs 4")
    project = make_project(tmp_path, pipeline, {"gitlab/livesend.gitlab-ci.yml": TEMPLATE.read_text()})
    run = run_pipeline(gitlab_ci_local, project, venv, job_variables(studio, wheel), token=None)
    assert run.returncode == 0, run.output
    log = run.logs["train"]
    assert "trained 4 epochs" in log
    assert log.count("live metrics are off") == 1
    assert "livesend: no DVCLive output was sent to Studio (live metrics were off)." in log
    assert "livesend:   git add dvclive dvc.yaml && git commit -m 'Results of train-" in log
    assert studio.received == []
    assert_artifacts(run)


def test_empty_run_fails_with_a_clear_message(gitlab_ci_local, wheel, venv, studio, tmp_path):
    pipeline = HIDDEN_JOB.format(include="local: gitlab/livesend.gitlab-ci.yml", run='""')
    project = make_project(tmp_path, pipeline, {"gitlab/livesend.gitlab-ci.yml": TEMPLATE.read_text()})
    run = run_pipeline(gitlab_ci_local, project, venv, job_variables(studio, wheel))
    assert run.returncode != 0
    assert "FAIL 2" in run.output
    assert "livesend: error: LIVESEND_RUN is empty: set it in the job's variables to the training command" in run.logs["train"]
    assert "livesend_install_started" not in run.logs["train"], "it stops before installing anything"
    assert studio.received == []


# --- the component ------------------------------------------------------------------------------------

COMPONENT_PIPELINE = """\
include:
  - component: {component}
    inputs:
      job-name: train
      run: {run}
      install: {install}
      interval: 0.2
      message: component run{more}

train:
  before_script:
    - echo "experiment-name=$CI_JOB_NAME_SLUG-$CI_JOB_ID"
"""


@pytest.mark.parametrize("form, exit_code, comment", [("self-test", 0, True), ("release", 1, False)])
def test_component_streams_a_real_training(gitlab_ci_local, wheel, venv, studio, tmp_path, git_host, form, exit_code,
                                           comment):
    """self-test: the project includes its own component at the commit being built (GitLab's documented
    pattern), with `comment: true`. release: another project includes it from acme/livesend at the
    release tag, fetched over HTTP from the loopback Git host, and leaves `comment` at its default.
    Both run in a merge request pipeline with LIVESEND_GITLAB_TOKEN, against a loopback GitLab API:
    only the first posts the merge request note."""
    run_cmd = f"python train.py --epochs 8 --image-every 4 --exit-code {exit_code}"
    more = "\n      comment: true" if comment else ""
    if form == "self-test":
        pipeline = COMPONENT_PIPELINE.format(component="$CI_SERVER_FQDN/$CI_PROJECT_PATH/livesend@$CI_COMMIT_SHA",
                                             run=run_cmd, install=wheel, more=more)
        project = make_project(tmp_path, pipeline, {"templates/livesend.yml": COMPONENT.read_text()})
    else:
        pipeline = COMPONENT_PIPELINE.format(
            component=f"$CI_SERVER_FQDN/acme/livesend/livesend@v{livesend.__version__}", run=run_cmd, install=wheel,
            more=more)
        project = make_project(tmp_path, pipeline, origin=git_host.origin("acme/ml"))
    with Forge() as forge:
        project_url = f"{forge.url}/gl/acme/ml"  # as on GitLab, CI_PROJECT_URL is CI_SERVER_URL/<project path>
        variables = job_variables(studio, wheel, CI_SERVER_URL=f"{forge.url}/gl", CI_PROJECT_ID="42",
                                  CI_MERGE_REQUEST_IID="5")
        del variables["LIVESEND_INSTALL"], variables["LIVESEND_INTERVAL"]  # inputs this time
        run = run_pipeline(gitlab_ci_local, project, venv, variables, overridden=("CI_SERVER_URL", "CI_PROJECT_ID"),
                           masked={"LIVESEND_GITLAB_TOKEN": WRITE})
    log = run.logs["train"]
    assert "trained 8 epochs" in log
    if exit_code:
        assert run.returncode != 0 and "FAIL 1" in run.output
        assert_report(log, "failed with exit status 1", job_name(run))
    else:
        assert run.returncode == 0, run.output
        assert "PASS  train" in run.output
        assert_report(log, "succeeded", job_name(run))
    if comment:
        assert "livesend: --comment: created the report note on merge request !5" in log
        (note,) = forge.notes[("42", 5)]
        assert note["body"].startswith("<!-- livesend:train -->\n") and f"`{job_name(run)}`" in note["body"]
        assert {token for _, _, token in forge.requests} == {WRITE}
    else:
        assert forge.requests == [] and "--comment" not in log
    assert_streamed(studio, project, job_name(run), git(project, "rev-parse", "HEAD"), project_url)
    assert {b.get("message") for b in studio.accepted if b["type"] == "start"} == {"component run"}
    assert_sections(log)
    assert_artifacts(run)
    assert_no_secret(run, studio)


# --- the example pipeline -----------------------------------------------------------------------------


def test_example_pipeline_in_a_merged_results_pipeline(gitlab_ci_local, wheel, venv, studio, tmp_path, git_host):
    """examples/gitlab/.gitlab-ci.yml as it is: its `include: project: acme/livesend` at the release tag is
    fetched from the loopback Git host. In a merge request pipeline for merged results, Studio gets the
    source branch head as baseline, not the merge commit GitLab made."""
    project = make_project(tmp_path, EXAMPLE.read_text(), {"requirements.txt": "numpy\ndvclive\npillow\n"},
                           origin=git_host.origin("acme/ml"))
    git(project, "checkout", "-q", "-b", "feature")
    (project / "params.txt").write_text("lr=0.5\n")
    git(project, "add", "params.txt")
    git(project, "commit", "-q", "-m", "feature work")
    source_sha = git(project, "rev-parse", "HEAD")
    git(project, "checkout", "-q", "main")
    git(project, "merge", "-q", "--no-ff", "-m", "merged result", "feature")
    assert git(project, "rev-parse", "HEAD") != source_sha

    run = run_pipeline(gitlab_ci_local, project, venv, job_variables(
        studio, wheel, CI_PIPELINE_SOURCE="merge_request_event", CI_MERGE_REQUEST_EVENT_TYPE="merged_result",
        CI_MERGE_REQUEST_SOURCE_BRANCH_SHA=source_sha), overridden=("CI_PIPELINE_SOURCE",))
    assert run.returncode == 0, run.output
    assert f"downloaded acme/livesend v{livesend.__version__} gitlab/livesend.gitlab-ci.yml" in run.output
    log = run.logs["train"]
    assert "livesend: setup: pip install -r requirements.txt" in log
    assert "trained 20 epochs" in log
    names = {b["name"] for b in studio.accepted}
    assert len(names) == 1 and re.fullmatch(r"train-\d+", names.pop())
    assert_streamed(studio, project, studio.accepted[0]["name"], source_sha, git_host.project_url("acme/ml"))
    assert_artifacts(run)
    assert_no_secret(run, studio)
