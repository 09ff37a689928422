"""The real action image: shared/tools/gh-docker-action builds the Dockerfile with podman and runs it
the way the GitHub runner runs a container action (workspace and file-command mounts, INPUT_*
variables with hyphens, runs.env, GITHUB_* variables, no --init, values passed by name only),
against the loopback Studio server, with the real DVCLive training of examples/ installed inside
the container through the `install` input. Slow (an image build and a pip install per run), so two
runs only: a pull request that trains to the end, and a push that is cancelled mid-training.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import EXAMPLES, ROOT, TOKEN, git
from studio_server import StudioServer
from test_entrypoint import hand_to_runner, owned_by_runner, checkout_test_merge

TOOL = ROOT.parent / "shared" / "tools" / "gh-docker-action"
REQUIREMENTS = "dvclive==3.49.1\nnumpy==2.4.6\npillow==13.0.0\n"
# Runs the tool with the token added to its arguments inside the process, from the environment:
# so the token is on no command line (the tool passes it to podman by name only, as the runner does).
WITH_TOKEN = (
    "import os, runpy, sys\n"
    "tool = sys.argv[1]\n"
    "sys.argv = [tool, *sys.argv[2:], '--input', 'studio-token=' + os.environ.pop('TEST_STUDIO_TOKEN')]\n"
    "runpy.run_path(tool, run_name='__main__')\n"
)

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture
def one_image_run_at_a_time():
    """Image builds share podman's storage and the machine's two cores: one at a time across workers."""
    with open("/tmp/livesend-test-action-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def workspace(repo: Path) -> Path:
    """The checkout: the example training and its requirements (handed to the runner's uid later)."""
    shutil.copy(EXAMPLES / "train.py", repo / "train.py")
    (repo / "requirements.txt").write_text(REQUIREMENTS)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "training")
    return repo


def outputs_of(out: Path) -> dict:
    return dict(line.split("=", 1) for line in (out / "output.txt").read_text().splitlines())


def start_action(workspace: Path, out: Path, event_name: str, event: Path, inputs: dict, env: dict,
                 action: Path = ROOT) -> subprocess.Popen:
    assert TOOL.exists(), f"{TOOL} is missing: shared/ must sit beside the repository"
    argv = [sys.executable, "-c", WITH_TOKEN, str(TOOL), "--action", str(action), "--workspace", str(workspace),
            "--out", str(out), "--event-name", event_name, "--event", str(event), "--timeout", "1200"]
    for name, value in inputs.items():
        argv += ["--input", f"{name}={value}"]
    for name, value in env.items():
        argv += ["--env", f"{name}={value}"]
    assert not any(TOKEN in a for a in argv)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "INPUT_", "RUNNER_"))}
    environment["TEST_STUDIO_TOKEN"] = TOKEN
    return subprocess.Popen(argv, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 1200) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return output.decode("utf-8", "replace")


def assert_token_only_masked(out: Path, log: str) -> None:
    stdout = (out / "stdout.txt").read_text()
    assert stdout.splitlines()[0] == f"::add-mask::{TOKEN}"
    assert TOKEN not in "\n".join(stdout.splitlines()[1:])
    for name in ("stderr.txt", "cmd.txt", "step_summary.md", "output.txt", "env.txt"):
        assert TOKEN not in (out / name).read_text(), name
    assert log.count(TOKEN) == 1  # the tool's own output is the container's, with the one mask line


def test_pull_request_trains_in_the_image_with_live_metrics(tmp_path, workspace, one_image_run_at_a_time):
    ws = workspace
    head, _, merge = checkout_test_merge(ws, lambda: (ws / "params.txt").write_text("lr=0.5\n"))
    hand_to_runner(ws)
    event = tmp_path / "event.json"
    event.write_text(f'{{"number": 5, "pull_request": {{"number": 5, "head": {{"sha": "{head}"}}}}}}')
    out = tmp_path / "out"

    with StudioServer(token=TOKEN) as studio:
        started = time.monotonic()
        proc = start_action(ws, out, "pull_request", event, {
            "install": "pip install -r requirements.txt",
            "run": "python train.py --epochs 10 --image-every 5",
            "studio-endpoint": studio.url, "interval": "0.5", "name": "image-pr-5",
        }, {"GITHUB_SHA": merge, "GITHUB_REF": "refs/pull/5/merge", "GITHUB_REF_NAME": "5/merge",
            "GITHUB_HEAD_REF": "feature", "GITHUB_BASE_REF": "main"})
        log = finish(proc)
        print(f"image build + install + training: {time.monotonic() - started:.1f} s")
        assert proc.returncode == 0, log[-5000:]
        assert studio.invalid == [], [r.error for r in studio.invalid]
        bodies = studio.accepted

    assert (out / "exit_code").read_text().strip() == "0"
    types = [b["type"] for b in bodies]
    assert types[0] == "start" and types[-1] == "done" and "data" in types
    assert studio.count("done", "image-pr-5") == 1
    assert {b["baseline_sha"] for b in bodies} == {head}  # the PR head, not the test merge
    images = [k for b in bodies if b["type"] == "data" for k in b.get("plots", {}) if k.endswith(".png")]
    assert images  # pillow came in through `install`

    stdout = (out / "stdout.txt").read_text()
    assert "::group::install: pip install -r requirements.txt" in stdout
    assert "trained 10 epochs" in stdout
    summary = (out / "step_summary.md").read_text()
    assert summary.startswith("### ✅ Training succeeded: `image-pr-5`")
    assert "| `val/acc` |" in summary and "git add dvclive dvc.yaml" in summary
    assert "Not committed yet:" in summary  # git worked in the runner-owned workspace (safe.directory)
    outputs = outputs_of(out)
    assert outputs["exit-code"] == "0" and outputs["experiment-name"] == "image-pr-5"
    assert outputs["baseline-sha"] == head and int(outputs["events-sent"]) >= 1
    assert_token_only_masked(out, log)
    assert (ws / "dvclive" / "metrics.json").exists()
    assert owned_by_runner(ws) == []


def test_push_cancelled_in_the_image_sends_done_and_ends_within_7_seconds(tmp_path, workspace, one_image_run_at_a_time):
    """The runner cancels a step with SIGINT to `docker run`, which passes it to the container's PID 1."""
    ws = workspace
    sha = git(ws, "rev-parse", "HEAD")
    hand_to_runner(ws)
    event = tmp_path / "event.json"
    event.write_text(f'{{"after": "{sha}"}}')
    out = tmp_path / "out"

    with StudioServer(token=TOKEN) as studio:
        proc = start_action(ws, out, "push", event, {
            "install": "pip install -r requirements.txt",
            "run": "python train.py --epochs 100000 --sleep 0.05",
            "studio-endpoint": studio.url, "interval": "0.5", "name": "image-cancelled",
        }, {"GITHUB_SHA": sha})
        try:
            assert studio.wait_for(lambda s: s.count("data") >= 2, timeout=900), "no live data from the container"
            podman = [p for p in psutil.Process(proc.pid).children(recursive=True)
                      if p.name() == "podman" and "run" in p.cmdline()]
            assert len(podman) == 1
            cancelled = time.monotonic()
            podman[0].send_signal(signal.SIGINT)
            podman[0].wait(timeout=30)
            took = time.monotonic() - cancelled
        finally:
            log = finish(proc, timeout=120)
        print(f"cancel-to-exit in the image: {took:.2f} s")
        assert studio.count("done", "image-cancelled") == 1
        assert studio.invalid == []

    code = int((out / "exit_code").read_text())
    assert code == 128 + signal.SIGINT, log[-3000:]
    assert took < 7.0
    summary = (out / "step_summary.md").read_text()
    assert summary.startswith("### ⏹️ Training cancelled: `image-cancelled`")
    outputs = outputs_of(out)
    assert outputs["exit-code"] == str(code) and outputs["baseline-sha"] == sha
    assert_token_only_masked(out, log)
    assert owned_by_runner(ws) == []


def post_step_action(tmp_path: Path) -> Path:
    """The action as the runner runs its post step: the same image, entered at runs.post-entrypoint (the
    tool enters at runs.entrypoint, so a copy of the action gets the one as the other)."""
    action = tmp_path / "post-action"
    shutil.copytree(ROOT, action, ignore=shutil.ignore_patterns(
        ".git", ".ci", "node_modules", "__pycache__", "*.egg-info", "build", "dist", "tests", "bench", "examples",
        ".gitlab-ci-local", "dvclive", ".venv"))
    meta = yaml.safe_load((ROOT / "action.yml").read_text())
    meta["runs"]["entrypoint"] = meta["runs"].pop("post-entrypoint")
    (action / "action.yml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return action


def test_post_entrypoint_in_the_image_closes_what_a_killed_run_left_open(tmp_path, workspace, one_image_run_at_a_time):
    """action.yml's post-entrypoint in the real image, run as the runner runs a post step: a new container
    with the workspace, the inputs and the main step's state (STATE_*). A run killed before `done` left its
    experiment in the workspace's ledger; the post step sends the `done`."""
    from livesend import ledger
    from livesend.studio import Identity

    sha = git(workspace, "rev-parse", "HEAD")
    name = "train-4242424242-1-k1ll"
    ledger.Ledger(ledger.ledger_path(str(workspace / ".git"), name), name).opened(
        Identity("https://github.com/example-org/example-repo", sha, name))
    hand_to_runner(workspace)
    event = tmp_path / "event.json"
    event.write_text(f'{{"after": "{sha}"}}')
    out = tmp_path / "out"
    with StudioServer(token=TOKEN) as studio:
        proc = start_action(workspace, out, "push", event, {"run": "python train.py", "studio-endpoint": studio.url},
                            {"GITHUB_SHA": sha, "STATE_livesend_name": name,
                             "STATE_livesend_workdir": "/github/workspace"}, action=post_step_action(tmp_path))
        log = finish(proc)
        assert proc.returncode == 0, log[-3000:]
        assert studio.count("done", name) == 1 and studio.invalid == []
        (done,) = studio.accepted
        assert (done["repo_url"], done["baseline_sha"]) == ("https://github.com/example-org/example-repo", sha)
    assert f"livesend: marked experiment {name} done in Studio" in (out / "stderr.txt").read_text()
    assert_token_only_masked(out, log)
    assert not (workspace / ".git" / "livesend").exists()
    assert owned_by_runner(workspace) == []
