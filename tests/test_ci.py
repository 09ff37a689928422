"""Unit tests of livesend.ci: repository URL, baseline, experiment name and roots, with real throwaway Git
repositories (no CI system needed: every function takes the environment as a mapping)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livesend import ci
from livesend.studio import NULL_SHA

SHA_A = "a" * 40
SHA_B = "b1" * 20


@pytest.fixture
def env(tmp_path) -> dict:
    """A minimal environment: no CI variables, no user Git config, no repository above tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CEILING_DIRECTORIES": str(tmp_path), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }


def git(cwd: Path, env: dict, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, env: dict, commit: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, env, "init", "-q", "-b", "main")
    if commit:
        (path / "README").write_text("x\n")
        git(path, env, "add", "README")
        git(path, env, "commit", "-q", "-m", "init")
    return path


def head(repo: Path, env: dict) -> str:
    return git(repo, env, "rev-parse", "HEAD")


def check_ref_format(name: str) -> bool:
    return subprocess.run(["git", "check-ref-format", "--allow-onelevel", name], capture_output=True).returncode == 0


# --- platform and credentials -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables, expected",
    [({}, "local"), ({"GITHUB_ACTIONS": "true"}, "github"), ({"GITLAB_CI": "true"}, "gitlab"),
     ({"GITHUB_ACTIONS": "false"}, "local"), ({"CI": "true"}, "local")],
)
def test_platform(variables, expected):
    assert ci.platform(variables) == expected


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://gitlab-ci-token:job-secret-123@gitlab.example.com/group/project.git",
         "https://gitlab.example.com/group/project.git"),
        ("https://x-access-token:ghs_secret@github.com/o/r", "https://github.com/o/r"),
        ("https://ghp_secretonly@github.com/o/r.git", "https://github.com/o/r.git"),
        ("http://u:p@127.0.0.1:8080/o/r?x=1#f", "http://127.0.0.1:8080/o/r?x=1#f"),
        ("https://us@er:p@ss@host/o/r", "https://host/o/r"),
        ("https://github.com/o/r.git", "https://github.com/o/r.git"),
        ("https://host/path@with-at", "https://host/path@with-at"),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
        ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),
        ("ssh://git:secret@host:22/org/repo.git", "ssh://git@host:22/org/repo.git"),
        ("ssh://:secret@host/org/repo.git", "ssh://host/org/repo.git"),
        ("/local/path/repo", "/local/path/repo"),
        ("", ""),
    ],
)
def test_strip_credentials(url, expected):
    assert ci.strip_credentials(url) == expected


# --- repo URL ---------------------------------------------------------------------------------------

GITHUB = {"GITHUB_ACTIONS": "true", "GITHUB_SERVER_URL": "https://github.example.com", "GITHUB_REPOSITORY": "o/gh"}
GITLAB = {"GITLAB_CI": "true", "CI_PROJECT_URL": "https://gitlab.example.com/g/p"}


@pytest.fixture
def remotes(tmp_path, env) -> Path:
    repo = make_repo(tmp_path / "repo", env)
    git(repo, env, "remote", "add", "origin", "https://gitlab-ci-token:s3cret@gitlab.example.com/g/origin.git")
    return repo


@pytest.mark.parametrize(
    "flag, extra, expected, source",
    [
        ("https://flag.example/o/r", {"DVC_STUDIO_REPO_URL": "https://dvc.example/o/r", **GITHUB}, "https://flag.example/o/r", "--repo-url"),
        (None, {"DVC_STUDIO_REPO_URL": "https://dvc.example/o/r", "STUDIO_REPO_URL": "https://s.example/o/r", **GITHUB},
         "https://dvc.example/o/r", "DVC_STUDIO_REPO_URL"),
        (None, {"STUDIO_REPO_URL": "git@github.com:o/legacy.git", **GITHUB}, "git@github.com:o/legacy.git", "STUDIO_REPO_URL"),
        (None, {"DVC_STUDIO_REPO_URL": "", "STUDIO_REPO_URL": "https://s.example/o/r"}, "https://s.example/o/r", "STUDIO_REPO_URL"),
        (None, GITHUB, "https://github.example.com/o/gh", "GITHUB_REPOSITORY"),
        (None, {**GITHUB, "GITHUB_SERVER_URL": ""}, "https://github.com/o/gh", "GITHUB_REPOSITORY"),
        (None, {**GITHUB, "GITHUB_SERVER_URL": "https://github.com/"}, "https://github.com/o/gh", "GITHUB_REPOSITORY"),
        (None, {**GITHUB, "GITHUB_ACTIONS": ""}, "https://gitlab.example.com/g/origin.git", "git remote"),
        (None, GITLAB, "https://gitlab.example.com/g/p", "CI_PROJECT_URL"),
        (None, {**GITLAB, "CI_PROJECT_URL": ""}, "https://gitlab.example.com/g/origin.git", "git remote"),
        (None, {}, "https://gitlab.example.com/g/origin.git", "git remote"),
        ("https://tok:en@flag.example/o/r", {}, "https://flag.example/o/r", "--repo-url"),
        (None, {"DVC_STUDIO_REPO_URL": "https://u:pw@dvc.example/o/r"}, "https://dvc.example/o/r", "DVC_STUDIO_REPO_URL"),
    ],
)
def test_detect_repo_url_precedence(remotes, env, flag, extra, expected, source):
    assert ci.detect_repo_url(flag, {**env, **extra}, str(remotes)) == (expected, source)


def test_repo_url_prefers_the_branch_upstream_remote(remotes, env):
    git(remotes, env, "remote", "add", "upstream", "git@github.com:o/upstream.git")
    git(remotes, env, "config", "branch.main.remote", "upstream")
    assert ci.detect_repo_url(None, env, str(remotes)) == ("git@github.com:o/upstream.git", "git remote")
    git(remotes, env, "checkout", "-q", "--detach")  # detached HEAD: no branch, so origin
    assert ci.detect_repo_url(None, env, str(remotes)) == ("https://gitlab.example.com/g/origin.git", "git remote")


def test_repo_url_local_tracking_branch_falls_back_to_origin(remotes, env):
    git(remotes, env, "config", "branch.main.remote", ".")
    assert ci.detect_repo_url(None, env, str(remotes))[0] == "https://gitlab.example.com/g/origin.git"


def test_repo_url_upstream_remote_without_url_falls_back_to_origin(remotes, env):
    git(remotes, env, "config", "branch.main.remote", "gone")
    assert ci.git_remote_url(str(remotes), env) == "https://gitlab-ci-token:s3cret@gitlab.example.com/g/origin.git"


def test_repo_url_none_without_remote_or_git(tmp_path, env):
    repo = make_repo(tmp_path / "bare", env)
    assert ci.detect_repo_url(None, env, str(repo)) == (None, "")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert ci.detect_repo_url(None, env, str(plain)) == (None, "")
    assert ci.detect_repo_url(None, {**env, "PATH": "/nonexistent"}, str(plain)) == (None, "")  # no git at all


def test_repo_url_from_a_subdirectory(remotes, env):
    sub = remotes / "a" / "b"
    sub.mkdir(parents=True)
    assert ci.detect_repo_url(None, env, str(sub))[0] == "https://gitlab.example.com/g/origin.git"


# --- baseline ---------------------------------------------------------------------------------------


def event_file(tmp_path: Path, sha) -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"pull_request": {"head": {"sha": sha}, "number": 1}}))
    return str(path)


def test_baseline_flag_wins(remotes, env):
    assert ci.detect_baseline(SHA_B.upper(), env, str(remotes)) == (SHA_B, "--baseline-sha")


def test_baseline_is_git_head(remotes, env):
    assert ci.detect_baseline(None, {**env, "GITHUB_SHA": SHA_A}, str(remotes)) == (head(remotes, env), "git HEAD")


@pytest.mark.parametrize("event", ["pull_request", "pull_request_target"])
def test_baseline_github_pr_head_when_head_is_the_test_merge(remotes, env, tmp_path, event):
    merge = head(remotes, env)
    gh = {**env, "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": event, "GITHUB_SHA": merge,
          "GITHUB_EVENT_PATH": event_file(tmp_path, SHA_B.upper())}
    assert ci.detect_baseline(None, gh, str(remotes)) == (SHA_B, "pull request head")
    # the workflow checked out something else (e.g. the PR head itself): HEAD is the baseline
    assert ci.detect_baseline(None, {**gh, "GITHUB_SHA": SHA_A}, str(remotes)) == (merge, "git HEAD")
    # not on GitHub Actions, or not a pull request: the event file is not consulted
    assert ci.detect_baseline(None, {**gh, "GITHUB_ACTIONS": ""}, str(remotes))[1] == "git HEAD"
    assert ci.detect_baseline(None, {**gh, "GITHUB_EVENT_NAME": "push"}, str(remotes))[1] == "git HEAD"


@pytest.mark.parametrize("content", [None, "not json", "[]", '{"pull_request": {}}', '{"pull_request": {"head": {"sha": 5}}}',
                                     '{"pull_request": {"head": {"sha": "abc"}}}'])
def test_baseline_bad_event_file_falls_back_to_head(remotes, env, tmp_path, content):
    path = tmp_path / "event.json"
    if content is not None:
        path.write_text(content)
    gh = {**env, "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "pull_request", "GITHUB_SHA": head(remotes, env),
          "GITHUB_EVENT_PATH": str(path)}
    assert ci.detect_baseline(None, gh, str(remotes)) == (head(remotes, env), "git HEAD")


def test_baseline_github_pr_outside_git(tmp_path, env):
    gh = {**env, "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "pull_request", "GITHUB_SHA": SHA_A,
          "GITHUB_EVENT_PATH": event_file(tmp_path, SHA_B)}
    assert ci.detect_baseline(None, gh, str(tmp_path)) == (SHA_B, "pull request head")


def test_baseline_gitlab_merged_result_uses_the_source_branch(remotes, env):
    merge = head(remotes, env)
    gl = {**env, "GITLAB_CI": "true", "CI_MERGE_REQUEST_EVENT_TYPE": "merged_result", "CI_COMMIT_SHA": merge,
          "CI_MERGE_REQUEST_SOURCE_BRANCH_SHA": SHA_B.upper()}
    assert ci.detect_baseline(None, gl, str(remotes)) == (SHA_B, "merge request source branch")
    for other in ({"CI_MERGE_REQUEST_EVENT_TYPE": "detached"}, {"CI_COMMIT_SHA": SHA_A},
                  {"CI_MERGE_REQUEST_SOURCE_BRANCH_SHA": ""}, {"CI_MERGE_REQUEST_SOURCE_BRANCH_SHA": "not-a-sha"},
                  {"GITLAB_CI": ""}):
        assert ci.detect_baseline(None, {**gl, **other}, str(remotes)) == (merge, "git HEAD")


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"GITHUB_SHA": SHA_A.upper()}, (SHA_A, "GITHUB_SHA")),
        ({"CI_COMMIT_SHA": SHA_B}, (SHA_B, "CI_COMMIT_SHA")),
        ({"GITHUB_SHA": SHA_A, "CI_COMMIT_SHA": SHA_B}, (SHA_A, "GITHUB_SHA")),
        ({"GITHUB_SHA": "short"}, (NULL_SHA, "none")),
        ({}, (NULL_SHA, "none")),
    ],
)
def test_baseline_outside_git(tmp_path, env, extra, expected):
    assert ci.detect_baseline(None, {**env, **extra}, str(tmp_path)) == expected
    empty = make_repo(tmp_path / "empty", env, commit=False)  # a repository without commits has no HEAD
    assert ci.detect_baseline(None, {**env, **extra}, str(empty)) == expected


# --- names ------------------------------------------------------------------------------------------

HOSTILE = ["../../etc/passwd", "a b", "x.lock", "x.LOCK", "@{u}", "@", "ü-naïve", "", "-", "...", "\n", "x" * 1000,
           "refs/heads/main", "a..b", "~^:?*[\\", ".hidden", "trailing.", "job.lock.lock", "-.-.lock", "\x00\x7f",
           "train (py3.11, gpu)", "🚀"]


def gh_env(job: str, run_id: str = "9876543210", attempt: str = "1") -> dict:
    return {"GITHUB_ACTIONS": "true", "GITHUB_JOB": job, "GITHUB_RUN_ID": run_id, "GITHUB_RUN_ATTEMPT": attempt}


def gl_env(slug: str, job_id: str = "4242") -> dict:
    return {"GITLAB_CI": "true", "CI_JOB_NAME_SLUG": slug, "CI_JOB_ID": job_id}


def test_github_name_shape():
    name = ci.generate_name(gh_env("train"), random.Random(1))
    assert re.fullmatch(r"train-9876543210-1-[a-z0-9]{4}", name)


def test_gitlab_name_shape():
    assert ci.generate_name(gl_env("train-gpu")) == "train-gpu-4242"
    assert ci.generate_name({"GITLAB_CI": "true", "CI_JOB_NAME": "train: [gpu, 3.11]", "CI_JOB_ID": "7"}) == "train-gpu-3.11-7"
    assert ci.generate_name({"GITLAB_CI": "true", "CI_JOB_ID": "7"}) == "job-7"


def test_local_name_shape():
    assert re.fullmatch(r"[a-z]+-[a-z]+-[0-9a-f]{4}", ci.generate_name({}, random.Random(2)))
    assert re.fullmatch(r"[a-z]+-[a-z]+-[0-9a-f]{4}", ci.generate_name({"GITLAB_CI": "true"}))  # no job id


@pytest.mark.parametrize("job", HOSTILE)
def test_names_from_hostile_job_names_are_valid_refs(job):
    for variables in (gh_env(job), gh_env("train", job, job), gl_env(job), gl_env("train", job),
                      {"GITLAB_CI": "true", "CI_JOB_NAME": job, "CI_JOB_ID": job}):
        name = ci.generate_name(variables, random.Random(0))
        assert ci.valid_ref_component(name) and check_ref_format(name), (variables, name)
        assert len(name) <= 60


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80), st.text(max_size=15))
def test_generated_names_always_pass_git_check_ref_format(job, job_id):
    for variables in (gh_env(job, job_id), gl_env(job, job_id or "1")):
        name = ci.generate_name(variables, random.Random(0))
        assert ci.valid_ref_component(name) and "/" not in name
        assert check_ref_format(name), name


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_valid_ref_component_implies_git_accepts_it(name):
    if ci.valid_ref_component(name) and "\x00" not in name:
        assert check_ref_format(name), name


@pytest.mark.parametrize("name", ["a/b", "", ".x", "x.", "x.lock", "a..b", "a@{b", "@", "a b", "a:b", "a~1", "a^", "a?",
                                  "a*", "a[b", "a\\b", "tab\tx", "del\x7f", "-x"])
def test_invalid_ref_components(name):
    assert not ci.valid_ref_component(name)


@pytest.mark.parametrize("name", ["areal-coze", "train-1-2-abcd", "x.y", "ü", "a@b", "UPPER_case-1.2"])
def test_valid_ref_components(name):
    assert ci.valid_ref_component(name) and check_ref_format(name)


def test_names_are_unique_across_calls():
    for variables in ({}, gh_env("train")):
        names = {ci.generate_name(variables, random.Random(seed)) for seed in range(300)}
        assert len(names) == 300


def test_a_long_job_name_keeps_the_unique_part():
    long_job = "matrix-train-" + "x" * 120
    gh = {ci.generate_name(gh_env(long_job, "555", attempt), random.Random(seed)) for seed in range(20) for attempt in "12"}
    assert len(gh) == 40 and all(re.search(r"-555-[12]-[a-z0-9]{4}$", n) for n in gh)
    gl = {ci.generate_name(gl_env("y" * 63, str(job_id))) for job_id in range(1000, 1010)}
    assert len(gl) == 10 and all(len(n) <= 60 and re.search(r"-10\d\d$", n) for n in gl)


def test_sanitize():
    assert ci.sanitize("a b/c..d--e") == "a-b-c.d-e"
    assert ci.sanitize("...") == "run"
    assert ci.sanitize("name.lock") == "name"
    assert ci.sanitize("x" * 100) == "x" * 60


# --- roots and experiment refs ----------------------------------------------------------------------


def test_dvc_root_and_subdir(tmp_path, env):
    top = make_repo(tmp_path / "r", env)
    (top / "proj" / ".dvc").mkdir(parents=True)
    deep = top / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    real_top = ci.git_root(str(deep), env)
    assert real_top == os.path.realpath(top)
    assert ci.dvc_root(str(deep), real_top) == os.path.realpath(top / "proj")
    assert ci.subdir(ci.dvc_root(str(deep), real_top), real_top) == "proj"
    (top / ".dvc").mkdir()
    assert ci.dvc_root(str(top / "other"), real_top) == real_top
    assert ci.subdir(real_top, real_top) is None
    (top / "proj" / "a" / ".dvc").mkdir()
    assert ci.subdir(ci.dvc_root(str(deep), real_top), real_top) == "proj/a"


def test_dvc_root_without_dvc_is_the_git_root(tmp_path, env):
    outer = tmp_path / "outer"
    (outer / ".dvc").mkdir(parents=True)  # above the Git root: not this repository's
    top = make_repo(outer / "r", env)
    (top / "x").mkdir()
    real_top = ci.git_root(str(top / "x"), env)
    assert ci.dvc_root(str(top / "x"), real_top) == real_top


def test_dvc_root_outside_git(tmp_path, env):
    plain = tmp_path / "plain" / "x"
    plain.mkdir(parents=True)
    assert ci.git_root(str(plain), env) is None
    assert ci.dvc_root(str(plain), None) == os.path.realpath(plain)
    (tmp_path / "plain" / ".dvc").mkdir()
    assert ci.dvc_root(str(plain), None) == os.path.realpath(tmp_path / "plain")
    assert ci.subdir(str(plain), None) is None
    assert ci.subdir(str(tmp_path), str(plain)) is None  # a root above the Git root is no subdir


def test_experiment_rev(tmp_path, env):
    repo = make_repo(tmp_path / "r", env)
    baseline = head(repo, env)
    assert ci.experiment_rev(str(repo), baseline, "areal-coze", env) is None
    tree = git(repo, env, "rev-parse", "HEAD^{tree}")
    exp_commit = git(repo, env, "commit-tree", tree, "-p", baseline, "-m", "dvc exp")
    git(repo, env, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/areal-coze", exp_commit)
    assert ci.experiment_rev(str(repo), baseline, "areal-coze", env) == exp_commit
    assert ci.experiment_rev(str(repo), baseline, "other", env) is None
    assert ci.experiment_rev(str(repo), NULL_SHA, "areal-coze", env) is None
    assert ci.experiment_rev(str(repo), SHA_A, "areal-coze", env) is None


def test_experiment_rev_peels_an_annotated_tag(tmp_path, env):
    repo = make_repo(tmp_path / "r", env)
    baseline = head(repo, env)
    git(repo, env, "tag", "-a", "-m", "m", "v1")
    git(repo, env, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/tagged", git(repo, env, "rev-parse", "v1"))
    assert ci.experiment_rev(str(repo), baseline, "tagged", env) == baseline


def test_git_helper_returns_none_on_failure(tmp_path, env):
    assert ci.git(["rev-parse", "HEAD"], str(tmp_path), env) is None
    assert ci.git(["--version"], str(tmp_path), env).startswith("git version")
    assert ci.git(["--version"], str(tmp_path / "missing-dir"), env) is None
