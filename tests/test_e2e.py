"""End to end: the real `livesend` command wrapping real DVCLive trainings, against the real loopback
Studio server, which validates every body with dvc-studio-client's schema."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, TOKEN, clean_env, git, livesend_cmd, run_livesend
from dvclive_files import disk_state, leaf_types, received_state

TRAIN = [sys.executable, str(EXAMPLES / "train.py")]


def spawn(cwd: Path, studio, *args: str) -> subprocess.Popen:
    """`livesend run ARGS` in the background, with the token and the loopback endpoint."""
    return subprocess.Popen(
        livesend_cmd("run", *args), cwd=cwd, env=clean_env(STUDIO_ENDPOINT=studio.url, STUDIO_TOKEN=TOKEN),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def release_when(proc: subprocess.Popen, repo: Path, ready) -> str:
    """Run `ready()` (its assertions), then create `go`, which the command waits for, and wait for
    livesend to end; its stderr."""
    try:
        ready()
        (repo / "go").touch()
        return proc.communicate(timeout=60)[1]
    finally:
        proc.kill()


def signal_once_streaming(proc: subprocess.Popen, studio, signum: int, data_events: int = 1) -> str:
    """Send `signum` to livesend once Studio has data events, wait for it to end; its stderr."""
    try:
        assert studio.wait_for(lambda s: s.count("data") >= data_events)
        proc.send_signal(signum)
        return proc.communicate(timeout=60)[1]
    finally:
        proc.kill()


def assert_all_valid(studio) -> None:
    assert studio.invalid == [], [r.error for r in studio.invalid]


def assert_delivered(studio, repo: Path, name: str | None = None, live_dir: str = "dvclive") -> None:
    """Every TSV row on disk arrived exactly once; the last metrics/params/images equal the files."""
    expected = disk_state(repo / live_dir, repo)
    got = received_state(studio.accepted, name)
    assert got["plots"] == expected["plots"]
    assert got["metrics"] == expected["metrics"]
    assert got["params"] == expected["params"]
    assert got["images"] == expected["images"]


def test_training_streams_every_row_once_and_final_state(studio, repo):
    result = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "30", "--image-every", "4"], "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert "trained 30 epochs" in result.stdout  # the command's output passes through
    assert_all_valid(studio)
    bodies = studio.accepted
    assert [b["type"] for b in bodies][0] == "start" and bodies[-1]["type"] == "done"
    assert studio.count("start") == 1 and studio.count("done") == 1
    assert_delivered(studio, repo)
    head = git(repo, "rev-parse", "HEAD")
    for body in bodies:
        assert body["baseline_sha"] == head
        assert body["repo_url"] == "https://example.com/group/project.git"  # job token stripped
        assert body["client"] == "dvclive"
    assert all(r.headers.get("Authorization") == f"token {TOKEN}" for r in studio.received)
    assert all(r.headers.get("Content-type") == "application/json" for r in studio.received)
    steps = [b["step"] for b in bodies if b["type"] == "data"]
    assert steps == sorted(steps) and steps[-1] == 29
    assert "Studio keeps live metrics only while the experiment runs" in result.stderr
    assert "git add dvclive dvc.yaml" in result.stderr


def test_same_experiment_as_dvclives_own_posting(studio, repo):
    """Differential: DVCLive posting by itself vs. livesend wrapping the same script."""
    base = studio.url.rsplit("/api/live", 1)[0]
    own = subprocess.run(
        [*TRAIN, "--epochs", "12", "--image-every", "3"], cwd=repo, capture_output=True, text=True, timeout=120,
        env=clean_env(DVC_STUDIO_TOKEN=TOKEN, DVC_STUDIO_URL=base,
                      DVC_STUDIO_REPO_URL="https://example.com/group/project.git"),
    )
    assert own.returncode == 0, own.stderr
    assert studio.wait_for(lambda s: s.count("done") == 1, timeout=10)
    theirs = studio.accepted
    studio.received.clear()

    ours_run = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "12", "--image-every", "3"])
    assert ours_run.returncode == 0, ours_run.stderr
    ours = studio.accepted
    assert_all_valid(studio)

    assert received_state(ours) == received_state(theirs)

    def keys_by_type(bodies):
        return {(b["type"], tuple(b)) for b in bodies}

    def subsequence(short, long) -> bool:
        it = iter(long)
        return all(k in it for k in short)

    # Same keys in the same order; a body may lack a key DVCLive leaves out when empty (dvc-studio-client
    # drops empty `metrics`), e.g. when livesend saw params.yaml before the first metrics.json.
    for event, keys in keys_by_type(ours):
        assert any(e == event and subsequence(keys, theirs_keys) for e, theirs_keys in keys_by_type(theirs)), keys
    assert {k for b in ours for k in b} == {k for b in theirs for k in b}

    def types_by_key(bodies):
        """(event, key) -> every (leaf path, type) sent under it over the run. livesend coalesces steps, so
        it sends fewer intermediate documents than DVCLive; the leaves and their types must be the same."""
        out: dict = {}
        for b in bodies:
            for k, v in b.items():
                if k == "name":
                    continue
                if k == "plots":  # per entry; DVCLive also sends `{"data": []}` for files without new rows
                    v = {"entry": [e for e in v.values() if e.get("data", True)]}
                out.setdefault((b["type"], k), set()).update(leaf_types(v))
        return out

    assert types_by_key(ours) == types_by_key(theirs)


def test_torn_writes_are_never_sent(studio, repo):
    """A partial TSV line and a half-written metrics.json are held back until they are complete."""
    script = repo / "torn.py"
    script.write_text(
        "import json, os, pathlib\n"
        "d = pathlib.Path('dvclive'); (d / 'plots/metrics').mkdir(parents=True)\n"
        "tsv = d / 'plots/metrics/loss.tsv'\n"
        "(d / 'metrics.json').write_text(json.dumps({'loss': 0.5, 'step': 2}) + '\\n')\n"
        "tsv.write_text('step\\tloss\\n0\\t1.0\\n1\\t0.75\\n2\\t0.5\\n3\\t0.2')\n"  # last line torn
        "(d / 'metrics.json').write_text('{\"loss\": 0.25, \"st')\n"  # torn JSON
        "while not pathlib.Path('go').exists(): pass\n"
        "with tsv.open('a') as f: f.write('5\\n')\n"
        "(d / 'metrics.json').write_text(json.dumps({'loss': 0.25, 'step': 3}) + '\\n')\n"
    )
    proc = spawn(repo, studio, "--interval", "0.05", "--", sys.executable, "torn.py")

    def complete_rows_only() -> None:
        assert studio.wait_for(lambda s: len(received_state(s.accepted)["plots"].get("dvclive/plots/metrics/loss.tsv", [])) >= 3)
        seen = received_state(studio.accepted)["plots"]["dvclive/plots/metrics/loss.tsv"]
        assert seen == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.75}, {"step": 2, "loss": 0.5}]

    err = release_when(proc, repo, complete_rows_only)
    assert proc.returncode == 0, err
    assert_all_valid(studio)
    state = received_state(studio.accepted)
    assert state["plots"]["dvclive/plots/metrics/loss.tsv"][-1] == {"step": 3, "loss": 0.25}
    assert len(state["plots"]["dvclive/plots/metrics/loss.tsv"]) == 4
    for body in studio.accepted:
        for value in body.get("metrics", {}).values():
            assert value["data"] in ({"loss": 0.5, "step": 2}, {"loss": 0.25, "step": 3})
    assert state["metrics"]["dvclive/metrics.json"] == {"loss": 0.25, "step": 3}


def test_directory_that_appears_late(studio, repo):
    script = repo / "late.py"
    script.write_text(
        "import pathlib, runpy, sys\n"
        "while not pathlib.Path('go').exists(): pass\n"
        f"sys.argv = ['train.py', '--epochs', '4']\nrunpy.run_path({str(EXAMPLES / 'train.py')!r}, run_name='__main__')\n"
    )
    proc = spawn(repo, studio, "--interval", "0.1", "--", sys.executable, "late.py")

    go: list = []

    def nothing_yet() -> None:
        assert not (repo / "dvclive").exists() and studio.received == []  # no empty experiment at launch
        go.append(time.time())

    err = release_when(proc, repo, nothing_yet)
    assert proc.returncode == 0, err
    assert studio.count("start") == 1 and studio.count("done") == 1
    assert studio.received[0].time >= go[0]
    assert_delivered(studio, repo)


def test_fresh_run_in_same_directory_starts_a_new_experiment(studio, repo):
    second = f"{sys.executable} {EXAMPLES / 'train.py'} --epochs 3"
    first = f"{sys.executable} {EXAMPLES / 'train.py'} --epochs 5"
    command = ["bash", "-c", f"{first} && while [ ! -e go ]; do sleep 0.05; done && {second}"]
    proc = spawn(repo, studio, "--name", "fresh", "--interval", "0.1", "--", *command)
    key = "dvclive/plots/metrics/train/loss.tsv"

    def first_run_delivered() -> None:
        assert studio.wait_for(lambda s: len(received_state(s.accepted, "fresh")["plots"].get(key, [])) == 5)

    err = release_when(proc, repo, first_run_delivered)
    assert proc.returncode == 0, err
    assert_all_valid(studio)
    assert [(b["type"], b["name"]) for b in studio.accepted if b["type"] != "data"] == [
        ("start", "fresh"), ("done", "fresh"), ("start", "fresh-2"), ("done", "fresh-2"),
    ]
    assert len(received_state(studio.accepted, "fresh")["plots"][key]) == 5
    assert_delivered(studio, repo, name="fresh-2")


def test_exit_status_of_a_failing_command_passes_through(studio, repo):
    result = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "3", "--exit-code", "3"])
    assert result.returncode == 3
    assert studio.count("done") == 1
    assert_delivered(studio, repo)
    assert "failed with exit status 3" in result.stderr


def test_command_killed_by_a_signal(studio, repo):
    script = repo / "killed.py"
    script.write_text(
        "import os, signal\nfrom dvclive import Live\n"
        "live = Live(save_dvc_exp=False)\n"
        "for i in range(3):\n    live.log_metric('loss', 1 / (i + 1)); live.next_step()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = run_livesend(repo, studio.url, [sys.executable, "killed.py"])
    assert result.returncode == 128 + signal.SIGKILL
    assert studio.count("done") == 1  # livesend ends the experiment DVCLive could not
    assert_delivered(studio, repo)
    assert "killed by signal 9" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_are_forwarded_and_the_experiment_is_done(studio, repo, signum):
    script = repo / "slow.py"
    script.write_text(
        "import signal, sys, pathlib\nfrom dvclive import Live\n"
        "got = []\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, lambda n, f: got.append(n))\n"
        "live = Live(save_dvc_exp=False)\n"
        "step = 0\n"
        "while not got:\n"
        "    live.log_metric('loss', 1 / (step + 1)); live.next_step(); step += 1\n"
        "    signal.sigtimedwait([], 0.05) if hasattr(signal, 'sigtimedwait') else None\n"
        "live.end()\n"
        "pathlib.Path('got').write_text(str(got[0]))\n"
        "sys.exit(7)\n"
    )
    proc = spawn(repo, studio, "--interval", "0.1", "--", sys.executable, "slow.py")
    err = signal_once_streaming(proc, studio, signum, data_events=2)
    assert (repo / "got").read_text() == str(int(signum))
    assert proc.returncode == 7, err
    assert studio.count("done") == 1
    assert_delivered(studio, repo)


def test_signal_that_kills_the_command_gives_128_plus_n(studio, repo):
    script = repo / "plain.py"
    script.write_text(
        "import time\nfrom dvclive import Live\nlive = Live(save_dvc_exp=False)\n"
        "live.log_metric('loss', 1.0); live.next_step()\n"
        "while True: time.sleep(0.05)\n"
    )
    proc = spawn(repo, studio, "--interval", "0.1", "--", sys.executable, "plain.py")
    signal_once_streaming(proc, studio, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert studio.count("done") == 1


def test_no_token_trains_anyway_with_one_warning(studio, repo):
    result = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "2"], token=None)
    assert result.returncode == 0
    assert "trained 2 epochs" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "live metrics are off" in line]
    assert len(warnings) == 1 and "STUDIO_TOKEN" in warnings[0] and "fork" in warnings[0]
    assert studio.received == []
    strict = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "2"], "--strict", token=None)
    assert strict.returncode == 3


def test_rejected_token_is_one_clear_error_and_no_retry_storm(studio, repo):
    result = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "10"], "--interval", "0.05", token="wrong-token")
    assert result.returncode == 0
    assert "trained 10 epochs" in result.stdout
    assert len(studio.received) <= 2
    errors = [line for line in result.stderr.splitlines() if "rejected the token (HTTP 401)" in line]
    assert len(errors) == 1 and "Check the STUDIO_TOKEN secret" in errors[0]
    assert run_livesend(repo, studio.url, [*TRAIN, "--epochs", "2"], "--strict", token="wrong-token").returncode == 3


def test_token_appears_nowhere(studio, repo, tmp_path):
    record, report = tmp_path / "record.jsonl", tmp_path / "report.json"
    script = repo / "env.py"
    script.write_text(
        "import os, pathlib, runpy, sys\n"
        "pathlib.Path('environ').write_bytes(open('/proc/self/environ', 'rb').read())\n"
        f"sys.argv = ['train.py', '--epochs', '3']\nrunpy.run_path({str(EXAMPLES / 'train.py')!r}, run_name='__main__')\n"
    )
    result = run_livesend(
        repo, studio.url, [sys.executable, "env.py"], "-v", "--record", str(record), "--report-json", str(report),
        env={"DVC_STUDIO_TOKEN": TOKEN, "ALSO_HOLDS_IT": f"prefix-{TOKEN}"},
    )
    assert result.returncode == 0, result.stderr
    assert studio.count("done") == 1
    environ = (repo / "environ").read_bytes()
    assert TOKEN.encode() not in environ
    variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
    assert b"STUDIO_TOKEN" not in variables and b"DVC_STUDIO_TOKEN" not in variables and b"ALSO_HOLDS_IT" not in variables
    assert variables[b"DVC_STUDIO_OFFLINE"] == b"true"
    assert variables[b"DVC_EXP_NAME"].decode() == studio.accepted[0]["name"]
    for text in (result.stdout, result.stderr, record.read_text(), report.read_text()):
        assert TOKEN not in text
    assert len(record.read_text().splitlines()) == len(studio.received)
    for r in studio.received:
        assert TOKEN not in json.dumps(r.body)
    for path in repo.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_dry_run_needs_no_token_and_prints_payloads(repo):
    result = subprocess.run(
        livesend_cmd("run", "--dry-run", "--", *TRAIN, "--epochs", "3"), cwd=repo, env=clean_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    sent = [json.loads(line.split("would send ", 1)[1]) for line in result.stderr.splitlines() if "would send " in line]
    assert [b["type"] for b in sent][0] == "start" and sent[-1]["type"] == "done"
    images = [v["image"] for b in sent for v in b.get("plots", {}).values() if "image" in v]
    assert images and all(i.startswith("<base64 image:") for i in images)


def test_usage_errors_are_one_line_and_exit_2(repo):
    cases = [
        ["run", "--endpoint", "http://studio.example.com/api/live", "--", "true"],
        ["run", "--interval", "soon", "--", "true"],
        ["run", "--name", "bad/name", "--", "true"],
        ["run"],
    ]
    for args in cases:
        result = subprocess.run(livesend_cmd(*args), cwd=repo, env=clean_env(STUDIO_TOKEN=TOKEN),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("livesend: error:"), (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_command_not_found_and_not_executable(studio, repo):
    assert run_livesend(repo, studio.url, ["no-such-command-xyz"]).returncode == 127
    script = repo / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert run_livesend(repo, studio.url, [str(script)]).returncode == 126


def test_several_directories_are_several_experiments(studio, repo):
    script = repo / "two.py"
    script.write_text(
        "from dvclive import Live\n"
        "for d in ('train_a', 'train_b'):\n"
        "    with Live(d, save_dvc_exp=False) as live:\n"
        "        for i in range(3):\n            live.log_metric('loss', i / 10); live.next_step()\n"
    )
    result = run_livesend(repo, studio.url, [sys.executable, "two.py"], "--name", "multi", "--dir", "train_a", "--dir", "train_b")
    assert result.returncode == 0, result.stderr
    assert studio.count("done", "multi-train_a") == 1 and studio.count("done", "multi-train_b") == 1
    assert_delivered(studio, repo, name="multi-train_a", live_dir="train_a")
    assert_delivered(studio, repo, name="multi-train_b", live_dir="train_b")


def test_saved_experiment_gets_experiment_rev_and_the_push_reminder(studio, repo):
    script = repo / "save.py"
    script.write_text(
        "from dvclive import Live\n"
        "with Live(save_dvc_exp=True) as live:\n"  # DVCLive takes the name from DVC_EXP_NAME, set by livesend
        "    for i in range(3):\n        live.log_metric('loss', 1 / (i + 1)); live.next_step()\n"
    )
    result = run_livesend(repo, studio.url, [sys.executable, "save.py"], "--name", "saved-exp")
    assert result.returncode == 0, result.stderr
    head = git(repo, "rev-parse", "HEAD")
    rev = git(repo, "rev-parse", f"refs/exps/{head[:2]}/{head[2:]}/saved-exp")
    done = [b for b in studio.accepted if b["type"] == "done"]
    assert done == [{**done[0], "experiment_rev": rev}] and done[0]["name"] == "saved-exp"
    assert "dvc exp push origin saved-exp" in result.stderr


def test_dvc_root_below_the_git_root_gives_subdir_and_keys(studio, repo):
    project = repo / "proj"
    project.mkdir()
    subprocess.run(["dvc", "init", "--subdir", "-q"], cwd=project, check=True, capture_output=True)
    result = run_livesend(project, studio.url, [*TRAIN, "--epochs", "3"])
    assert result.returncode == 0, result.stderr
    start = studio.accepted[0]
    assert start["type"] == "start" and start["subdir"] == "proj"
    keys = {k for b in studio.accepted for k in b.get("plots", {})}
    assert "dvclive/plots/metrics/train/loss.tsv" in keys  # relative to the DVC root, as DVCLive sends them
    assert_delivered(studio, project)


def test_github_step_gets_annotations_unless_turned_off(studio, repo):
    github = {"GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": "org/repo", "GITHUB_SERVER_URL": "https://github.com",
              "GITHUB_JOB": "train", "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "1"}
    plain = run_livesend(repo, studio.url, ["true"], token=None, env=github)
    assert any(line.startswith("::warning title=livesend::livesend: live metrics are off") for line in plain.stderr.splitlines())
    off = run_livesend(repo, studio.url, ["true"], token=None, env={**github, "LIVESEND_ANNOTATIONS": "false"})
    assert "::warning" not in off.stderr and "live metrics are off" in off.stderr
    run = run_livesend(repo, studio.url, [*TRAIN, "--epochs", "2"], env=github)
    assert run.returncode == 0
    assert {b["repo_url"] for b in studio.accepted} == {"https://github.com/org/repo"}
    assert studio.accepted[0]["name"].startswith("train-42-1-")
