"""The action's entrypoint.py as a real process, with exactly the environment the GitHub runner gives a
container action (actions/runner ContainerActionHandler): INPUT_<NAME> for every input of action.yml
(hyphens kept, defaults filled in), action.yml's runs.env expanded, GITHUB_* variables, HOME, the
event file, and the step summary and output files; the workspace belongs to another user (the
runner's uid 1001) while the entrypoint runs as root. Against the real loopback Studio server, with
the real DVCLive training of examples/ (installed on this machine, as `install` would inside the image).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT, TOKEN, clean_env, descendants, git, wait_until
from dvclive_files import disk_state, received_state
from studio_server import Fault, StudioServer

ENTRYPOINT = ROOT / "entrypoint.py"
ACTION = yaml.safe_load((ROOT / "action.yml").read_text())
RUNNER_UID = 1001  # the hosted runner's user, who owns the workspace
WORKFLOW_TOKEN = "ghs_workflow-token-0d1e2f3a"  # what `${{ github.token }}` evaluates to here
EXPR = re.compile(r"\$\{\{\s*inputs\.([A-Za-z0-9_-]+)\s*\}\}")
FILE_COMMANDS = {"GITHUB_STEP_SUMMARY": "step_summary", "GITHUB_OUTPUT": "set_output", "GITHUB_ENV": "set_env",
                 "GITHUB_STATE": "save_state", "GITHUB_PATH": "add_path"}


@pytest.fixture
def workspace(repo: Path) -> Path:
    """A checkout as actions/checkout leaves it: a Git repository with the training (handed to the
    runner's uid by each test once it has set up its commits)."""
    shutil.copy(EXAMPLES / "train.py", repo / "train.py")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "training")
    return repo


def checkout_test_merge(repo: Path, change) -> tuple:
    """What actions/checkout leaves on `pull_request`: `change()` committed on a feature branch (the
    PR head), main moved on meanwhile, and the test merge of both checked out detached (GITHUB_SHA).
    Returns (head, base, merge)."""
    git(repo, "checkout", "-q", "-b", "feature")
    change()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "feature work")
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    (repo / "NOTES").write_text("main moved on\n")
    git(repo, "add", "NOTES")
    git(repo, "commit", "-q", "-m", "notes")
    base = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach")
    git(repo, "merge", "-q", "--no-ff", "-m", "Merge feature into main", "feature")
    merge = git(repo, "rev-parse", "HEAD")
    assert len({head, base, merge}) == 3
    return head, base, merge


def hand_to_runner(path: Path) -> None:
    for top, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            os.lchown(os.path.join(top, name), RUNNER_UID, RUNNER_UID)


class Step:
    """One run of the action's step: the files the runner provides, and what came out."""

    def __init__(self, tmp: Path, workspace: Path) -> None:
        self.workspace = workspace
        self.home = tmp / "home"
        self.workflow = tmp / "workflow"
        self.file_commands = tmp / "file_commands"
        for d in (self.home, self.workflow, self.file_commands):
            d.mkdir(parents=True, exist_ok=True)
        for f in FILE_COMMANDS.values():
            (self.file_commands / f).write_text("")
        self.proc: subprocess.Popen | None = None
        self.stdout = ""
        self.stderr = ""

    def env(self, event_name: str, event: dict, inputs: dict, sha: str, runs_env: bool = True, **extra) -> dict:
        (self.workflow / "event.json").write_text(json.dumps(event))
        # The image's environment (python on PATH, unbuffered output), then what the runner adds.
        env = {k: v for k, v in clean_env().items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")}
        env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.update({
            "HOME": str(self.home), "CI": "true", "GITHUB_ACTIONS": "true", "RUNNER_OS": "Linux",
            "RUNNER_TEMP": str(self.home.parent / "runner_temp"),
            "GITHUB_WORKSPACE": str(self.workspace), "GITHUB_EVENT_PATH": str(self.workflow / "event.json"),
            "GITHUB_EVENT_NAME": event_name, "GITHUB_SHA": sha,
            "GITHUB_REPOSITORY": "example-org/example-repo", "GITHUB_REPOSITORY_OWNER": "example-org",
            "GITHUB_SERVER_URL": "https://github.com", "GITHUB_API_URL": "https://api.github.com",
            "GITHUB_RUN_ID": "4242424242", "GITHUB_RUN_NUMBER": "7", "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_JOB": "train", "GITHUB_ACTION": "__self", "GITHUB_ACTOR": "example-user",
            "GITHUB_WORKFLOW": "train",
        })
        if event_name.startswith("pull_request"):
            number = event["pull_request"]["number"]
            env.update({"GITHUB_REF": f"refs/pull/{number}/merge", "GITHUB_REF_NAME": f"{number}/merge",
                        "GITHUB_HEAD_REF": "feature", "GITHUB_BASE_REF": "main"})
        else:
            env.update({"GITHUB_REF": "refs/heads/main", "GITHUB_REF_NAME": "main", "GITHUB_HEAD_REF": "",
                        "GITHUB_BASE_REF": ""})
        for var, name in FILE_COMMANDS.items():
            env[var] = str(self.file_commands / name)
        values = {}
        for name, spec in ACTION["inputs"].items():
            default = str((spec or {}).get("default", "")).replace("${{ github.token }}", WORKFLOW_TOKEN)
            values[name] = inputs.get(name, default)
        for name, value in values.items():
            env[f"INPUT_{name.replace(' ', '_').upper()}"] = value  # hyphens kept, as the runner does
        if runs_env:
            for key, value in ACTION["runs"]["env"].items():
                env[key] = EXPR.sub(lambda m: values.get(m.group(1), ""), str(value))
        env.update(extra)
        return env

    def start(self, env: dict) -> subprocess.Popen:
        self.proc = subprocess.Popen([sys.executable, str(ENTRYPOINT)], cwd=self.workspace, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.proc

    def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def run(self, env: dict, timeout: float = 120) -> int:
        self.start(env)
        return self.wait(timeout)

    @property
    def lines(self) -> list:
        return self.stdout.splitlines()

    @property
    def summary(self) -> str:
        return (self.file_commands / "step_summary").read_text()

    @property
    def outputs(self) -> dict:
        text = (self.file_commands / "set_output").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if line)

    def blocks(self) -> tuple:
        """(lines before the first stop-commands block, the lines inside each block, lines after the last)."""
        before, inside, after = [], [], []
        end = None
        for line in self.lines:
            m = re.fullmatch(r"::stop-commands::(\w+)", line)
            if end is None and m:
                end = f"::{m.group(1)}::"
                inside.append([])
                after = []
            elif end is not None and line == end:
                end = None
            elif end is not None:
                inside[-1].append(line)
            elif inside:
                after.append(line)
            else:
                before.append(line)
        assert end is None, "a stop-commands block was never closed"
        return before, inside, after


def annotations(lines: list, level: str) -> list:
    return [line for line in lines if line.startswith(f"::{level} ")]


def assert_token_nowhere(step: Step, *others: str) -> None:
    """The tokens are in `::add-mask::` lines only: not in any other output, file or environment."""
    rest = "\n".join(line for line in step.lines if not line.startswith("::add-mask::"))
    for token in (TOKEN, WORKFLOW_TOKEN, *others):
        assert token not in rest
        assert token not in step.stderr
        for root in (step.workspace, step.home, step.file_commands):
            for top, _dirs, files in os.walk(root):
                for name in files:
                    assert token.encode() not in Path(top, name).read_bytes(), os.path.join(top, name)


def owned_by_runner(path: Path) -> list:
    """Paths under `path` that are not owned by the runner's user (should be none)."""
    bad = []
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(top, name)
            if os.lstat(p).st_uid != RUNNER_UID:
                bad.append(p)
    return bad


# --- push ------------------------------------------------------------------------------------------


def test_push_streams_live_and_reports(tmp_path, workspace):
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio:
        env = step.env("push", {"after": sha, "ref": "refs/heads/main"}, {
            "run": "python train.py --epochs 12 --image-every 4 && env > command-env.txt "
                   "&& echo '::error::injected by the training' && echo '::add-mask::trained'",
            "studio-token": TOKEN, "studio-endpoint": studio.url, "interval": "0.2",
        }, sha)
        assert step.run(env) == 0, step.stdout + step.stderr
        assert studio.invalid == [], [r.error for r in studio.invalid]
        bodies = studio.accepted

    # Studio got the whole experiment, against the pushed commit.
    assert [b["type"] for b in bodies][0] == "start" and bodies[-1]["type"] == "done"
    assert studio.count("start") == 1 and studio.count("done") == 1 and studio.count("data") >= 1
    assert {b["baseline_sha"] for b in bodies} == {sha}
    assert {b["repo_url"] for b in bodies} == {"https://github.com/example-org/example-repo"}
    name = bodies[0]["name"]
    assert name.startswith("train-4242424242-1-")

    # Masking first; the command's output (and livesend's log) inside one stop-commands block; the
    # command's own workflow commands stay inside it; nothing on stderr.
    assert step.lines[0] == f"::add-mask::{TOKEN}"
    before, inside, after = step.blocks()
    assert before == [f"::add-mask::{TOKEN}", f"::add-mask::{WORKFLOW_TOKEN}"]
    assert len(inside) == 1
    assert any(line.startswith("trained 12 epochs") for line in inside[0])
    assert "::error::injected by the training" in inside[0]
    assert "::add-mask::trained" in inside[0]
    assert not any(line.startswith("::") for line in after)  # a clean run: no annotations
    assert step.stderr == ""

    # Outputs and job summary.
    outputs = step.outputs
    events = int(outputs.pop("events-sent"))
    assert 1 <= events <= studio.count("data")  # livesend counts a round of POSTs as one data event
    assert outputs == {"exit-code": "0", "experiment-name": name, "baseline-sha": sha}
    # The job summary is livesend's own report (written once, not twice).
    summary = step.summary
    assert summary.startswith(f"### ✅ Training succeeded: `{name}`") and summary.count("Training succeeded") == 1
    assert f"`{name}`: {events} data events sent to 127.0.0.1:" in summary
    assert "| Metric | Value | Trend |" in summary
    assert "| `train/loss` |" in summary and "| `best_val_acc` |" in summary
    assert "git add dvclive dvc.yaml && git commit" in summary
    # `git status` worked in the runner-owned checkout (safe.directory), so the summary knows what to commit.
    assert "Not committed yet:" in summary and "`dvclive/metrics.json`" in summary
    assert str(workspace) in (step.home / ".gitconfig").read_text()

    # The command's environment: no token, no action inputs.
    command_env = (workspace / "command-env.txt").read_text()
    assert "INPUT_" not in command_env and "LIVESEND_ACTION_" not in command_env
    assert "STUDIO_TOKEN" not in command_env
    assert_token_nowhere(step)

    # Everything the step created in the workspace belongs to the runner's user again.
    assert (workspace / "dvclive" / "metrics.json").exists()
    assert owned_by_runner(workspace) == []


# --- pull_request ----------------------------------------------------------------------------------


def test_a_finished_step_keeps_delivering_through_a_short_outage(tmp_path, workspace):
    """Only a cancelled step has the 3 s flush budget: a step whose training finished flushes for
    livesend's 30 s, so a Studio that is down for 5 s when the training ends still gets the rest and `done`."""
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    flag = workspace / "trained.flag"

    def down_for_5_seconds_after_training(_body):
        return Fault(status=503) if flag.exists() and time.time() - flag.stat().st_mtime < 5 else None

    with StudioServer(token=TOKEN) as studio:
        studio.rule = down_for_5_seconds_after_training
        env = step.env("push", {"after": sha, "ref": "refs/heads/main"}, {
            "run": "python train.py --epochs 6 && touch trained.flag",
            "studio-token": TOKEN, "studio-endpoint": studio.url, "interval": "0.2",
        }, sha)
        assert step.run(env) == 0, step.stdout + step.stderr
        refused = [r for r in studio.received if r.status == 503]
    assert refused, "Studio was never down: the test did not test the outage"
    assert studio.count("done") == 1
    assert "not delivered" not in step.stdout
    rows = received_state(studio.accepted)["plots"]
    assert rows == disk_state(workspace / "dvclive", workspace)["plots"]


def test_pull_request_baseline_is_the_head_commit_not_the_test_merge(tmp_path, workspace):
    """actions/checkout checks out refs/pull/N/merge (GITHUB_SHA), a commit Studio never sees; the
    baseline must be the PR head from the event file. Here in a sub-directory (working-directory)."""
    def move_the_training():
        (workspace / "ml").mkdir()
        shutil.move(workspace / "train.py", workspace / "ml" / "train.py")

    head, base, merge = checkout_test_merge(workspace, move_the_training)
    hand_to_runner(workspace)

    event = {"action": "synchronize", "number": 7,
             "pull_request": {"number": 7, "head": {"sha": head, "ref": "feature"}, "base": {"sha": base, "ref": "main"}}}
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio:
        env = step.env("pull_request", event, {
            "run": "python train.py --epochs 6", "working-directory": "ml", "studio-token": TOKEN,
            "studio-endpoint": studio.url, "name": "pr-7-exp",
        }, merge)
        assert step.run(env) == 0, step.stdout + step.stderr
        bodies = studio.accepted
        assert studio.invalid == []

    assert bodies and {b["baseline_sha"] for b in bodies} == {head}
    assert {b["name"] for b in bodies} == {"pr-7-exp"}
    assert studio.count("done") == 1
    assert step.outputs["baseline-sha"] == head
    assert step.outputs["experiment-name"] == "pr-7-exp"
    assert f"| Baseline commit | `{head[:12]}` |" in step.summary
    assert (workspace / "ml" / "dvclive" / "metrics.json").exists()
    assert owned_by_runner(workspace) == []
    assert_token_nowhere(step)


def test_fork_pull_request_without_token_warns_and_trains(tmp_path, workspace):
    """Secrets are withheld from fork PRs: no mask, nothing sent, one warning annotation, exit 0."""
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    event = {"number": 9, "pull_request": {"number": 9, "head": {"sha": sha}}}
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio:
        env = step.env("pull_request", event, {"run": "python train.py --epochs 3", "studio-endpoint": studio.url}, sha)
        assert step.run(env) == 0, step.stdout + step.stderr
        assert studio.received == []
    assert step.lines[0] == f"::add-mask::{WORKFLOW_TOKEN}"  # the default github-token; no Studio token
    assert not any(line.startswith("::add-mask::") for line in step.lines[1:])
    _, inside, after = step.blocks()
    assert any(line.startswith("trained 3 epochs") for line in inside[0])
    warnings = annotations(after, "warning")
    assert len(warnings) == 1 and "live metrics are off: no Studio token" in warnings[0]
    # inside the block livesend logs plain lines (an annotation there would be inert text)
    assert any(line.startswith("livesend: live metrics are off") for line in inside[0])
    assert not any(line.startswith("::") for line in inside[0])
    assert warnings[0].startswith("::warning title=livesend::")
    assert "| Studio | live metrics were off (no token) |" in step.summary
    assert step.outputs["exit-code"] == "0" and step.outputs["events-sent"] == "0"


def test_comment_posts_the_report_on_the_pull_request(tmp_path, workspace):
    """`comment: true` with `github-token`: livesend's report as a PR comment through the GitHub API at
    GITHUB_API_URL (a loopback stand-in here); the GitHub token is masked and never reaches the command."""
    from test_comment import WRITE, Forge

    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    event = {"number": 7, "pull_request": {"number": 7, "head": {"sha": sha}}}
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio, Forge() as forge:
        env = step.env("pull_request", event, {
            "run": "python train.py --epochs 3 && env > command-env.txt", "studio-token": TOKEN,
            "studio-endpoint": studio.url, "name": "commented", "comment": "true", "github-token": WRITE,
        }, sha, GITHUB_API_URL=f"{forge.url}/gh", GITHUB_TOKEN=WRITE)  # also in the step's env: kept from the command
        assert step.run(env) == 0, step.stdout
        assert studio.count("done", "commented") == 1
    bodies = [c["body"] for c in forge.comments[("example-org/example-repo", 7)]]
    assert len(bodies) == 1 and "Training succeeded: `commented`" in bodies[0]
    assert all(token == WRITE for _, _, token in forge.requests)
    assert step.lines[:2] == [f"::add-mask::{TOKEN}", f"::add-mask::{WRITE}"]
    command_env = (workspace / "command-env.txt").read_text()
    assert "GITHUB_TOKEN" not in command_env
    assert_token_nowhere(step, WRITE)


# --- exit status, strict, install, inputs -----------------------------------------------------------


def test_exit_status_passes_through_with_the_runners_own_input_variables(tmp_path, workspace):
    """The command's exit status is the step's; the inputs are read from INPUT_<NAME-WITH-HYPHENS>
    alone when runs.env is not there (the fallback)."""
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio:
        env = step.env("push", {}, {"run": "python train.py --epochs 4 --exit-code 4", "studio-token": TOKEN,
                                    "studio-endpoint": studio.url, "name": "failing-run"}, sha, runs_env=False)
        assert not any(k.startswith("LIVESEND_ACTION_") for k in env)
        assert "INPUT_STUDIO-TOKEN" in env
        assert step.run(env) == 4, step.stdout + step.stderr
        assert studio.count("done", "failing-run") == 1
    assert step.outputs["exit-code"] == "4"
    assert step.outputs["experiment-name"] == "failing-run"
    assert step.summary.startswith("### ❌ Training failed: `failing-run`")
    assert_token_nowhere(step)


def test_rejected_token_is_an_error_annotation_and_strict_fails_the_step(tmp_path, workspace):
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    results = {}
    with StudioServer(token="a-different-token") as studio:
        for strict in ("false", "true"):
            step = Step(tmp_path / strict, workspace)
            env = step.env("push", {}, {"run": "python train.py --epochs 3", "studio-token": TOKEN,
                                        "studio-endpoint": studio.url, "strict": strict}, sha)
            results[strict] = (step.run(env), step)
        assert studio.accepted == []
    for strict, (code, step) in results.items():
        assert code == (3 if strict == "true" else 0), step.stdout
        _, inside, after = step.blocks()
        errors = annotations(after, "error")
        assert errors and all(e.startswith("::error title=livesend::") for e in errors)
        assert any("Studio rejected the token (HTTP 401)" in e for e in errors)
        assert step.outputs["exit-code"] == str(code)
        assert_token_nowhere(step)


def test_install_runs_first_in_a_folded_group(tmp_path, workspace):
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    env = step.env("push", {}, {
        "install": "echo installing requirements && echo '::warning::from install' && touch installed.txt",
        "run": "test -f installed.txt && echo ran after install", "dry-run": "true"}, sha)
    assert step.run(env) == 0, step.stdout
    before, inside, _ = step.blocks()
    assert before == [f"::add-mask::{WORKFLOW_TOKEN}", "::group::install: echo installing requirements && "
                      "echo '::warning::from install' && touch installed.txt"]
    assert "installing requirements" in inside[0] and "::warning::from install" in inside[0]
    assert "ran after install" in inside[1]
    starts = [i for i, line in enumerate(step.lines) if line.startswith("::stop-commands::")]
    endgroup = step.lines.index("::endgroup::")
    assert starts[0] < endgroup < starts[1]  # the install's block closes inside the group, the run's opens after
    assert owned_by_runner(workspace) == []

    failing = Step(tmp_path / "failing", workspace)
    env = failing.env("push", {}, {"install": "echo cannot install; exit 5", "run": "touch should-not-exist"}, sha)
    assert failing.run(env) == 5
    assert not (workspace / "should-not-exist").exists()
    _, inside, after = failing.blocks()
    assert len(inside) == 1
    assert annotations(after, "error") == [
        "::error title=livesend::the install command failed with exit status 5; the training did not run"]
    assert failing.outputs["exit-code"] == "5"
    assert "The `install` command failed with exit status 5" in failing.summary


@pytest.mark.parametrize("inputs, message", [
    ({"run": ""}, "the `run` input is required"),
    ({"run": "true", "interval": "soon"}, "--interval/LIVESEND_INTERVAL must be a number of seconds"),
    ({"run": "true", "strict": "maybe"}, "the `strict` input must be true or false"),
    ({"run": "true", "working-directory": "nowhere"}, "the working-directory 'nowhere' does not exist"),
])
def test_input_mistakes_are_one_error_annotation_and_exit_2(tmp_path, workspace, inputs, message):
    sha = git(workspace, "rev-parse", "HEAD")
    step = Step(tmp_path, workspace)
    assert step.run(step.env("push", {}, inputs, sha)) == 2
    errors = annotations(step.lines, "error")
    assert len(errors) == 1 and message in errors[0], step.stdout
    assert not any(line.startswith("::stop-commands::") for line in step.lines)
    assert step.outputs["exit-code"] == "2"
    assert step.summary.startswith("### livesend: the step failed (exit status 2)")
    assert message in step.summary


# --- cancellation ----------------------------------------------------------------------------------


STUBBORN = (
    "import signal, sys, time\n"
    "from dvclive import Live\n"
    "for s in (signal.SIGINT, signal.SIGTERM):\n"
    "    signal.signal(s, lambda n, f: print('ignoring signal', n, flush=True))\n"
    "with Live('dvclive', save_dvc_exp=False) as live:\n"
    "    step = 0\n"
    "    while True:\n"
    "        live.log_metric('loss', 1.0 / (step + 1))\n"
    "        live.next_step()\n"
    "        step += 1\n"
    "        time.sleep(0.05)\n"
)


@pytest.mark.parametrize("signum, script, expected", [
    (signal.SIGTERM, None, 128 + signal.SIGTERM),  # the runner's second signal; the training dies of it
    (signal.SIGINT, STUBBORN, 128 + signal.SIGKILL),  # a training that ignores both: escalated to SIGKILL
], ids=["sigterm", "sigint-ignored-by-the-training"])
def test_cancel_forwards_sends_done_and_ends_within_7_seconds(tmp_path, workspace, signum, script, expected):
    if script:
        (workspace / "stubborn.py").write_text(script)
    run = "python stubborn.py" if script else "python train.py --epochs 100000 --sleep 0.05"
    step, studio, code, took = cancel(tmp_path, workspace, run, signum)
    assert studio.count("done", "cancelled-run") == 1
    assert code == expected, step.stdout
    assert took < 7.0, f"the step took {took:.2f} s to end after the signal"
    if script:
        assert any(line.startswith("ignoring signal") for line in step.lines)
    assert step.outputs["exit-code"] == str(expected)
    assert step.summary.startswith("### ⏹️ Training cancelled: `cancelled-run`")
    assert "marked done" in step.summary and "not marked done" not in step.summary
    assert owned_by_runner(workspace) == []
    assert_token_nowhere(step)
    assert wait_until(lambda: processes_in(workspace) == [], timeout=5), "a process was left behind"


def test_cancel_while_studio_stalls_still_ends_within_7_seconds(tmp_path, workspace):
    """Studio stops answering when the step is cancelled: the cancel flush budget the action passes (3 s)
    and the entrypoint's own deadline end the step in time anyway, with the loss said plainly."""
    step, studio, code, took = cancel(tmp_path, workspace, "python train.py --epochs 100000 --sleep 0.05",
                                      signal.SIGINT, stall=True)
    assert code == 128 + signal.SIGINT, step.stdout
    assert took < 7.0, f"the step took {took:.2f} s to end after the signal"
    assert studio.count("done") == 0
    _, _, after = step.blocks()
    errors = annotations(after, "error")
    assert step.outputs["exit-code"] == str(128 + signal.SIGINT)
    if "livesend did not finish within the cancellation grace period" in step.stdout:
        # the backstop: livesend stuck past 6 s (a request Studio never answers, a loaded machine)
        assert step.summary.startswith("### livesend: the step cancelled (exit status 130)")
        assert any("did not finish within the cancellation grace period" in e for e in errors)
    else:
        # livesend said it itself (`done` failed) or the entrypoint read it from the report (never tried)
        assert any("`done`" in e for e in errors), step.stdout
        assert step.summary.startswith("### ⏹️ Training cancelled: `cancelled-run`")
        assert "**not marked done**" in step.summary
    assert owned_by_runner(workspace) == []
    assert wait_until(lambda: processes_in(workspace) == [], timeout=5), "a process was left behind"


def test_cancel_while_livesend_flushes_after_the_training_cuts_the_flush_to_3_seconds(tmp_path, workspace):
    """The training has ended and livesend is retrying a failing Studio in its 30 s flush when the run is
    cancelled: the signal goes to livesend, which cuts the flush to 3 s and still sends `done` (Studio is
    back 1 s after the signal); the step ends well within 7 s with the training's status."""
    flag = workspace / "trained.flag"
    signalled: list = []

    def rule(_body):
        if flag.exists() and (not signalled or time.monotonic() < signalled[0] + 1):
            return Fault(status=503)
        return None

    step, studio, code, took = cancel(
        tmp_path, workspace, "python train.py --epochs 4 && touch trained.flag", signal.SIGINT, rule=rule,
        # ended once livesend (the entrypoint's only child now) has reaped bash: before that, the signal
        # would go to the command, which is then rightly reported as killed by it
        ready=lambda s, proc: (flag.exists() and len(descendants(proc.pid)) == 1
                               and any(r.status == 503 for r in s.received)),
        before_signal=lambda s: signalled.append(time.monotonic()),
    )
    assert code == 0, step.stdout
    assert took < 5.0, f"the step took {took:.2f} s to end after the signal"
    assert studio.count("done", "cancelled-run") == 1
    _, _, after = step.blocks()
    assert any("cancelled while delivering the rest" in w for w in annotations(after, "warning")), after
    assert owned_by_runner(workspace) == []


def cancel(tmp_path: Path, workspace: Path, run: str, signum: int, stall: bool = False, rule=None,
           ready=lambda s, _proc: s.count("data") >= 2, before_signal=lambda s: None) -> tuple:
    """Start the step, wait until `ready(studio, entrypoint process)` (live data by default), send `signum`
    to the entrypoint (PID 1 in the container: what `docker run` proxies when the runner cancels), time how
    long until it ends.
    `stall`: Studio stops answering at the signal; `rule`: Studio's faults from the start."""
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio:
        studio.rule = rule
        env = step.env("push", {}, {"run": run, "studio-token": TOKEN, "studio-endpoint": studio.url,
                                    "interval": "0.2", "name": "cancelled-run"}, sha)
        proc = step.start(env)
        try:
            assert studio.wait_for(lambda s: ready(s, proc), timeout=60), "never got what the cancel waits for"
            if stall:
                studio.rule = lambda body: Fault(status=503, delay=20)
            before_signal(studio)
            cancelled = time.monotonic()
            proc.send_signal(signum)
            code = step.wait(timeout=30)
            took = time.monotonic() - cancelled
        finally:
            if proc.poll() is None:
                proc.kill()
        assert studio.invalid == []
    print(f"cancel-to-exit: {took:.2f} s")
    return step, studio, code, took


def processes_in(path: Path) -> list:
    """Processes whose working directory is under `path` (the training, livesend)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd == str(path) or cwd.startswith(f"{path}/"):
                found.append(pid)
    return found


# --- the post step ----------------------------------------------------------------------------------


def post_step(step: Step, env: dict) -> subprocess.CompletedProcess:
    """The post step as the runner runs it: a new container of the image (`entrypoint.py post`), the
    same inputs, and the main step's saved state as STATE_* variables."""
    saved = (step.file_commands / FILE_COMMANDS["GITHUB_STATE"]).read_text()
    state = {f"STATE_{k}": v for k, v in (line.split("=", 1) for line in saved.splitlines() if line)}
    return subprocess.run([sys.executable, str(ENTRYPOINT), "post"], cwd=step.workspace, env={**env, **state},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_post_step_sends_the_done_a_killed_livesend_could_not(tmp_path, workspace):
    """The cancel signal never reached the container (actions/runner#2128), or the OOM killer picked
    livesend: it dies without `done`. The post step, which the runner runs after the job even when it was
    cancelled, sends it, once; with nothing left open it prints nothing but the masks."""
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    go = tmp_path / "go"  # livesend is killed once Studio has the experiment's start and data
    with StudioServer(token=TOKEN) as studio:
        env = step.env("push", {}, {
            "run": f"python train.py --epochs 4 && until [ -e {go} ]; do sleep 0.05; done && kill -9 $PPID",
            "studio-token": TOKEN, "studio-endpoint": studio.url, "interval": "0.2",
        }, sha)
        step.start(env)
        try:
            assert studio.wait_for(lambda s: s.count("data") >= 1, timeout=60)
        finally:
            go.touch()
        assert step.wait() == 128 + signal.SIGKILL, step.stdout
        assert studio.count("done") == 0
        name = studio.accepted[0]["name"]
        assert name.startswith("train-4242424242-1-")

        result = post_step(step, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"::add-mask::{TOKEN}", f"::add-mask::{WORKFLOW_TOKEN}"]
        assert result.stderr == f"livesend: marked experiment {name} done in Studio\n"
        assert studio.count("done", name) == 1 and studio.invalid == []

        again = post_step(step, env)
        assert (again.returncode, again.stderr) == (0, "")
        assert studio.count("done") == 1
    assert owned_by_runner(workspace) == []
    assert TOKEN not in result.stderr


def test_post_step_after_a_normal_run_or_none_does_nothing(tmp_path, workspace):
    sha = git(workspace, "rev-parse", "HEAD")
    hand_to_runner(workspace)
    step = Step(tmp_path, workspace)
    with StudioServer(token=TOKEN) as studio:
        env = step.env("push", {}, {"run": "python train.py --epochs 3", "studio-token": TOKEN,
                                    "studio-endpoint": studio.url, "interval": "0.2"}, sha)
        nothing_ran = post_step(step, env)  # the main step never saved state (it failed before livesend)
        assert (nothing_ran.returncode, nothing_ran.stderr) == (0, "")
        assert step.run(env) == 0, step.stdout
        finished = post_step(step, env)
        assert (finished.returncode, finished.stderr) == (0, "")
        assert studio.count("done") == 1 and len(studio.received) == len(studio.accepted)
