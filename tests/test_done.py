"""`livesend done` and the ledger of open experiments. A run killed before it could send `done` (a
cancelled GitLab job whose runner sends no SIGTERM, an OOM kill) leaves its experiments listed in the Git
directory; `livesend done` closes them afterwards, once. Real DVCLive training, real loopback Studio."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import harness
import pytest
from conftest import TOKEN, clean_env, git, kill_tree, livesend_cmd
from harness import TRAIN
from studio_server import Fault

from livesend import ledger
from livesend.studio import Identity

NAME = "killed-run"


def open_ledgers(repo: Path) -> list:
    folder = repo / ".git" / "livesend" / "open"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def killed_run(studio, repo: Path) -> dict:
    """A training streamed live, then killed with livesend: returns the `start` Studio took."""
    proc = harness.start(repo, studio.url, [*TRAIN, "--epochs", "100000", "--sleep", "0.05"],
                         "--interval", "0.1", "--name", NAME)
    try:
        assert studio.wait_for(lambda s: s.count("data") >= 2)
    finally:
        kill_tree(proc)
    assert studio.count("done") == 0
    (start,) = [b for b in studio.accepted if b["type"] == "start"]
    return start


def done(repo: Path, url: str, *options: str, token: str | None = TOKEN, **env: str) -> subprocess.CompletedProcess:
    environment = clean_env(STUDIO_ENDPOINT=url, **env)
    if token is not None:
        environment["STUDIO_TOKEN"] = token
    return subprocess.run(livesend_cmd("done", *options), cwd=repo, env=environment, capture_output=True, text=True,
                          timeout=120)


# --- the ledger ------------------------------------------------------------------------------------------


def test_ledger_lists_open_experiments_and_goes_with_the_last(tmp_path):
    path = ledger.ledger_path(str(tmp_path / ".git"), "run-1")
    book = ledger.Ledger(path, "run-1")
    a, b = Identity("https://example.com/r", "a" * 40, "run-1"), Identity("https://example.com/r", "a" * 40, "run-1-2")
    book.opened(a)
    book.opened(b)
    assert ledger.Ledger.load(path, "run-1").open == [a, b]
    doc = json.loads(Path(path).read_text())
    assert doc["run"] == "run-1" and set(doc["open"][0]) == {"name", "repo_url", "baseline_sha"}
    book.closed("run-1")
    assert ledger.Ledger.load(path, "run-1").open == [b]
    book.closed("run-1-2")
    assert not os.path.exists(path)
    assert list(tmp_path.iterdir()) == [tmp_path / ".git"] and list((tmp_path / ".git").iterdir()) == []
    book.closed("run-1-2")  # closing twice is harmless


def test_a_new_run_of_the_same_name_keeps_what_an_earlier_one_left_open(tmp_path):
    git_dir = str(tmp_path)
    left = Identity("https://example.com/r", "b" * 40, "same")
    ledger.Ledger(ledger.ledger_path(git_dir, "same"), "same").opened(left)
    assert ledger.for_run(git_dir, "same").open == [left]
    Path(ledger.ledger_path(git_dir, "same")).write_text("{not json")
    assert ledger.for_run(git_dir, "same").open == []  # garbage: start afresh, never fail the run
    assert ledger.for_run(None, "same").path is None  # no Git clone, no ledger


@pytest.mark.parametrize("text", ["[]", '{"version": 2, "open": []}', '{"version": 1, "open": [{"name": 1}]}'])
def test_a_file_that_is_not_a_ledger_is_refused(text):
    with pytest.raises(ValueError):
        ledger.decode(text)


def test_an_unwritable_git_directory_costs_the_ledger_not_the_run(tmp_path):
    blocker = tmp_path / "livesend"
    blocker.write_text("a file where the ledger's folder would go")
    book = ledger.Ledger(ledger.ledger_path(str(tmp_path), "r"), "r")
    book.opened(Identity("u", "c" * 40, "r"))  # no exception
    assert book.open and blocker.is_file()


# --- livesend run keeps it, livesend done closes it ----------------------------------------------------------


def test_a_finished_run_leaves_nothing_open(studio, repo):
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "3"], "--interval", "0.1", "--name", NAME)
    harness.check(outcome, studio)
    assert not (repo / ".git" / "livesend").exists()  # not even an empty folder
    result = done(repo, studio.url, "--name", NAME)
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"livesend: nothing left open in Studio by run {NAME}\n"
    assert studio.count("done") == 1  # the run's own; `livesend done` sent nothing


def test_a_killed_run_is_marked_done_once_by_livesend_done(studio, repo):
    start = killed_run(studio, repo)
    assert open_ledgers(repo) == [f"{NAME}.json"]
    text = (repo / ".git" / "livesend" / "open" / f"{NAME}.json").read_text()
    assert TOKEN not in text and harness.REMOTE_SECRET not in text
    dry = done(repo, studio.url, "--name", NAME, "--dry-run", token=None)
    assert dry.returncode == 0, dry.stderr
    assert '"type": "done"' in dry.stderr and f"dry run: would mark experiment {NAME} done" in dry.stderr
    assert open_ledgers(repo) == [f"{NAME}.json"] and studio.count("done") == 0  # sent nothing, closed nothing
    result = done(repo, studio.url, "--name", NAME, "--record", str(repo / ".done-record.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"livesend: marked experiment {NAME} done in Studio\n"
    (closing,) = [b for b in studio.accepted if b["type"] == "done"]
    assert {k: closing[k] for k in ("repo_url", "baseline_sha", "name", "client")} == \
        {k: start[k] for k in ("repo_url", "baseline_sha", "name", "client")}
    assert studio.invalid == []
    assert open_ledgers(repo) == []
    again = done(repo, studio.url, "--name", NAME)
    assert again.returncode == 0 and "nothing left open" in again.stderr
    assert studio.count("done") == 1
    record = (repo / ".done-record.jsonl").read_text()
    assert '"event": "done"' in record and TOKEN not in record + result.stderr + result.stdout


def test_livesend_done_rides_out_an_outage_and_keeps_the_ledger_when_it_cannot(studio, repo):
    killed_run(studio, repo)
    studio.rule = lambda body: Fault(status=503)
    failed = done(repo, studio.url, "--name", NAME, "--flush-timeout", "1")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        f"livesend: could not mark experiment {NAME} done (HTTP 503: {{\"detail\": \"injected fault\"}}); "
        f"`livesend done --name {NAME}` tries again")
    assert open_ledgers(repo) == [f"{NAME}.json"]
    studio.rule = None
    studio.faults.extend([503, 502])  # a short outage: retried within the time given
    result = done(repo, studio.url, "--name", NAME)
    assert result.returncode == 0, result.stderr
    assert studio.count("done") == 1 and open_ledgers(repo) == []


def test_a_rejected_token_is_one_line_and_keeps_the_ledger(studio, repo):
    killed_run(studio, repo)
    result = done(repo, studio.url, "--name", NAME, token="lsd-WRONG-token")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"livesend: could not mark experiment {NAME} done (Studio rejected the token (HTTP 401): "
        '{"detail": "Invalid token"}. Check the STUDIO_TOKEN secret)']
    assert open_ledgers(repo) == [f"{NAME}.json"]  # a right token can still close it
    assert studio.count("done") == 0


def test_livesend_done_without_token_says_so(studio, repo):
    killed_run(studio, repo)
    result = done(repo, studio.url, "--name", NAME, token=None)
    assert result.returncode == 1
    assert result.stderr == f"livesend: cannot mark {NAME} done: no Studio token (set STUDIO_TOKEN)\n"
    assert open_ledgers(repo) == [f"{NAME}.json"]


def test_livesend_done_needs_a_name_where_runs_are_named_at_random(repo):
    result = done(repo, "http://127.0.0.1:9/api/live")
    assert result.returncode == 2
    assert result.stderr.startswith("livesend: error: which run? set --name")
    assert len(result.stderr.splitlines()) == 1


def test_in_gitlab_ci_livesend_done_finds_the_job_s_own_run(studio, repo):
    gitlab = {"GITLAB_CI": "true", "CI_JOB_NAME_SLUG": "train", "CI_JOB_ID": "777",
              "CI_PROJECT_URL": "https://gitlab.example.com/acme/ml", "CI_COMMIT_SHA": git(repo, "rev-parse", "HEAD")}
    proc = harness.start(repo, studio.url, [*TRAIN, "--epochs", "100000", "--sleep", "0.05"], "--interval", "0.1",
                         env=gitlab)
    try:
        assert studio.wait_for(lambda s: s.count("data") >= 2)
    finally:
        kill_tree(proc)
    result = done(repo, studio.url, **gitlab)
    assert result.returncode == 0, result.stderr
    assert studio.count("done", "train-777") == 1
    assert {b["repo_url"] for b in studio.accepted} == {"https://gitlab.example.com/acme/ml"}


def test_a_run_that_could_not_send_done_says_how_to_close_it_later(studio, repo):
    studio.rule = lambda body: Fault(status=503) if body.get("type") == "done" else None
    outcome = harness.run(repo, studio.url, [*TRAIN, "--epochs", "3"], "--interval", "0.1", "--name", NAME,
                          "--flush-timeout", "2")
    harness.check(outcome, studio, flush_timeout=2)  # everything but `done` went through
    hint = f"`livesend done --name {NAME}` marks it done later"
    assert len(outcome.lines(f"could not send `done` for {NAME} before the flush timeout; Studio will show it "
                             f"as running ({hint})")) == 1
    assert len(outcome.lines(f"NOT marked done ({hint}).")) == 1  # in the summary too
    assert open_ledgers(repo) == [f"{NAME}.json"]
    studio.rule = None
    result = done(repo, studio.url, "--name", NAME)
    assert result.returncode == 0, result.stderr
    assert studio.count("done") == 1 and open_ledgers(repo) == []
