"""Where are we running? GitHub Actions, GitLab CI or a laptop: repository URL, baseline commit,
experiment name, DVC root. Every function takes the environment as a mapping, so all of it can be
tested without a CI system."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
from typing import Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from livesend.studio import NULL_SHA

log = logging.getLogger("livesend")

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def platform(env: Mapping[str, str]) -> str:
    if env.get("GITHUB_ACTIONS") == "true":
        return "github"
    if env.get("GITLAB_CI") == "true":
        return "gitlab"
    return "local"


def git(args: list, cwd: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Output of a git command, or None when git is missing or the command fails."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace").strip()


def first(*values: Optional[str]) -> Optional[str]:
    """The first non-empty value (empty environment variables count as unset)."""
    for value in values:
        if value:
            return value
    return None


# --- repo URL -----------------------------------------------------------------------------------------


def strip_credentials(url: str) -> str:
    """`https://user:secret@host/x` -> `https://host/x` (GitLab CI clones with the job token in the URL;
    over http(s) a user name alone may be a token too). The user of an SSH URL (`ssh://git@host/x`) is no
    secret and stays, as in scp-like remotes (`git@host:org/repo.git`): the URL is sent as DVCLive sends it."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    if not parts.scheme.startswith("http"):
        user = userinfo.split(":", 1)[0]
        host = f"{user}@{host}" if user else host
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def git_remote_url(cwd: str, env: Mapping[str, str]) -> Optional[str]:
    """The URL of the current branch's upstream remote, else of `origin`."""
    remote = None
    branch = git(["symbolic-ref", "--quiet", "--short", "HEAD"], cwd, env)
    if branch:
        remote = git(["config", "--get", f"branch.{branch}.remote"], cwd, env)
    for name in (remote, "origin"):
        if name and name != ".":
            url = git(["remote", "get-url", name], cwd, env)
            if url:
                return url
    return None


def detect_repo_url(flag: Optional[str], env: Mapping[str, str], cwd: str) -> tuple[Optional[str], str]:
    """(repo URL without credentials, where it came from)."""
    candidates = [
        (flag, "--repo-url"),
        (env.get("DVC_STUDIO_REPO_URL"), "DVC_STUDIO_REPO_URL"),
        (env.get("STUDIO_REPO_URL"), "STUDIO_REPO_URL"),
    ]
    kind = platform(env)
    if kind == "github" and env.get("GITHUB_REPOSITORY"):
        server = (env.get("GITHUB_SERVER_URL") or "https://github.com").rstrip("/")
        candidates.append((f"{server}/{env['GITHUB_REPOSITORY']}", "GITHUB_REPOSITORY"))
    if kind == "gitlab":
        candidates.append((env.get("CI_PROJECT_URL"), "CI_PROJECT_URL"))
    for value, source in candidates:
        if value:
            return strip_credentials(value), source
    url = git_remote_url(cwd, env)
    return (strip_credentials(url), "git remote") if url else (None, "")


# --- baseline -----------------------------------------------------------------------------------------


def pull_request_head(env: Mapping[str, str]) -> Optional[str]:
    """The PR head SHA from the GitHub event file of a pull_request(_target) event."""
    if not env.get("GITHUB_EVENT_NAME", "").startswith("pull_request"):
        return None
    path = env.get("GITHUB_EVENT_PATH")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            event = json.load(f)
        sha = event["pull_request"]["head"]["sha"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sha.lower() if isinstance(sha, str) and SHA_RE.match(sha.lower()) else None


def detect_baseline(flag: Optional[str], env: Mapping[str, str], cwd: str) -> tuple[str, str]:
    """(baseline SHA, where it came from). Studio knows only pushed commits, so a CI merge commit made
    for testing (GitHub's test merge, GitLab's merged results) is replaced by the branch's head."""
    if flag:
        return flag.lower(), "--baseline-sha"
    head = git(["rev-parse", "--verify", "-q", "HEAD"], cwd, env)
    head = head.lower() if head and SHA_RE.match(head.lower()) else None
    kind = platform(env)
    if kind == "github":
        pr_head = pull_request_head(env)
        if pr_head and (head is None or head == (env.get("GITHUB_SHA") or "").lower()):
            return pr_head, "pull request head"
    if kind == "gitlab":
        source_sha = env.get("CI_MERGE_REQUEST_SOURCE_BRANCH_SHA")
        if (
            env.get("CI_MERGE_REQUEST_EVENT_TYPE") == "merged_result"
            and source_sha
            and SHA_RE.match(source_sha.lower())
            and (head is None or head == (env.get("CI_COMMIT_SHA") or "").lower())
        ):
            return source_sha.lower(), "merge request source branch"
    if head:
        return head, "git HEAD"
    ci_sha = first(env.get("GITHUB_SHA"), env.get("CI_COMMIT_SHA"))
    if ci_sha and SHA_RE.match(ci_sha.lower()):
        return ci_sha.lower(), "GITHUB_SHA" if env.get("GITHUB_SHA") else "CI_COMMIT_SHA"
    return NULL_SHA, "none"


# --- names --------------------------------------------------------------------------------------------

_ADJECTIVES = (
    "amber brave brisk calm clear crisp deft eager early fair fast fine fresh glad grand happy keen "
    "kind lively lucid merry mild neat nimble noble plain proud quick quiet rapid ready sharp shiny "
    "silent sleek smart snowy solid spry stable steady still sunny swift tidy vivid warm wise young zesty"
).split()
_NOUNS = (
    "acorn alder aspen badger basil birch bison cedar comet coral crane dingo eagle ember falcon fern "
    "finch fjord gecko heron ibis koala larch lemur lynx maple marten moss newt orca otter owl panda "
    "pine puffin quail raven robin sable seal sparrow spruce stork swan tapir tern thrush tiger walrus willow yak"
).split()

_REF_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def valid_ref_component(name: str) -> bool:
    """A Git ref component without `/` (what DVC accepts as an experiment name)."""
    if not name or "/" in name or name.startswith((".", "-")) or name.endswith((".", ".lock")):
        return False
    if ".." in name or "@{" in name or name == "@":
        return False
    return not re.search(r"[\x00-\x20\x7f~^:?*\[\\]", name)


def sanitize(text: str, limit: int = 60) -> str:
    cleaned = _REF_BAD.sub("-", text).strip("-.")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    cleaned = cleaned[:limit].strip("-.")
    while cleaned.lower().endswith(".lock"):  # Git refuses a ref component ending in .lock
        cleaned = cleaned[:-5].strip("-.")
    return cleaned or "run"


def _unique_name(prefix: str, *unique: str) -> str:
    """`<prefix>-<unique...>` within 60 characters: a long prefix is cut, never the part that makes it unique."""
    tail = sanitize("-".join(sanitize(u) for u in unique))
    return sanitize(f"{sanitize(prefix, max(1, 59 - len(tail)))}-{tail}")


def stable_name(env: Mapping[str, str]) -> Optional[str]:
    """The name every step of this CI job generates alike (GitLab: job name and id), so that an
    `after_script` finds the run of its `script`; None where names are random."""
    if platform(env) == "gitlab" and env.get("CI_JOB_ID"):
        return _unique_name(env.get("CI_JOB_NAME_SLUG") or env.get("CI_JOB_NAME") or "job", env["CI_JOB_ID"])
    return None


def generate_name(env: Mapping[str, str], rng: Optional[random.Random] = None) -> str:
    """Unique per CI job, even across a matrix; readable on a laptop."""
    rng = rng or random.Random()
    kind = platform(env)
    if kind == "github":
        suffix = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(4))
        return _unique_name(
            env.get("GITHUB_JOB") or "job", env.get("GITHUB_RUN_ID") or "0", env.get("GITHUB_RUN_ATTEMPT") or "1", suffix
        )
    stable = stable_name(env)
    if stable:
        return stable
    suffix = "".join(rng.choice("0123456789abcdef") for _ in range(4))
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{suffix}"


# --- roots and experiment refs ------------------------------------------------------------------------


def git_root(cwd: str, env: Mapping[str, str]) -> Optional[str]:
    root = git(["rev-parse", "--show-toplevel"], cwd, env)
    return os.path.realpath(root) if root else None


def git_dir(cwd: str, env: Mapping[str, str]) -> Optional[str]:
    """The clone's Git directory (`.git`, or where a worktree keeps its own), absolute."""
    return git(["rev-parse", "--absolute-git-dir"], cwd, env)


def dvc_root(cwd: str, top: Optional[str]) -> str:
    """The nearest ancestor of `cwd` holding `.dvc/`, not above the Git root; else the Git root (where
    DVCLive runs `dvc init`); else `cwd`."""
    here = os.path.realpath(cwd)
    while True:
        if os.path.isdir(os.path.join(here, ".dvc")):
            return here
        if top and here == top:
            return top
        parent = os.path.dirname(here)
        if parent == here:
            return top or os.path.realpath(cwd)
        here = parent


def subdir(root: str, top: Optional[str]) -> Optional[str]:
    if not top:
        return None
    rel = os.path.relpath(root, top).replace(os.sep, "/")
    return None if rel in (".", "") or rel.startswith("..") else rel


def experiment_rev(cwd: str, baseline: str, name: str, env: Mapping[str, str]) -> Optional[str]:
    """The commit DVCLive saved for this experiment (`save_dvc_exp=True`), if any."""
    if baseline == NULL_SHA:
        return None
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    sha = git(["rev-parse", "--verify", "-q", ref + "^{commit}"], cwd, env)
    return sha.lower() if sha and SHA_RE.match(sha.lower()) else None
