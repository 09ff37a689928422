"""The report as a pull-request comment (GitHub, PyGithub) or merge-request note (GitLab,
python-gitlab): one per PR/MR and job, found again by a hidden marker and updated in place.

Never fails the run: a missing or read-only token (fork PRs), an unreachable API or any other
error is one warning. PyGithub and python-gitlab are imported only when a comment is posted.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Mapping, Optional

from livesend import ci, report as report_mod
from livesend.config import redact

log = logging.getLogger("livesend")

GITLAB_NOTE_LIMIT = 1_000_000  # characters in a GitLab note
TIMEOUT = 20  # seconds per API request
FOOTER = "\n<sub>Posted by livesend; later runs of this job update this comment.</sub>\n"


def comment_key(env: Mapping[str, str]) -> str:
    """What tells this job's comment from other jobs' on the same PR/MR: LIVESEND_COMMENT_KEY, else
    the workflow and job (GitHub; a matrix needs LIVESEND_COMMENT_KEY) or the job name (GitLab,
    which includes parallel:matrix values)."""
    key = env.get("LIVESEND_COMMENT_KEY")
    if not key:
        if ci.platform(env) == "gitlab":
            key = env.get("CI_JOB_NAME") or "job"
        else:
            key = f"{env.get('GITHUB_WORKFLOW') or 'workflow'}/{env.get('GITHUB_JOB') or 'job'}"
    key = re.sub(r"\s+", " ", key).replace("--", "-").replace(">", ")").strip()
    return key[:200] or "job"


def marker(env: Mapping[str, str]) -> str:
    return f"<!-- livesend:{comment_key(env)} -->"


def annotate(env: Mapping[str, str], message: str) -> None:
    """A warning annotation on GitHub (in addition to the log line)."""
    if env.get("GITHUB_ACTIONS") == "true":
        text = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        print(f"::warning title=livesend comment::{text}", flush=True)


_secrets: list = []  # the tokens of the current post(): never printed


def warn(env: Mapping[str, str], message: str, *args) -> None:
    text = redact(message % args if args else message, _secrets)
    log.warning("--comment: %s", text)
    annotate(env, text)


def body(report: report_mod.Report, env: Mapping[str, str], limit: int) -> str:
    return report_mod.render_markdown(report, limit=limit, measure=len, prefix=marker(env) + "\n", suffix=FOOTER)


def post(report: report_mod.Report, env: Mapping[str, str], github_token: Optional[str] = None,
         gitlab_token: Optional[str] = None) -> Optional[str]:
    """Create or update this job's comment; "created", "updated" or None (skipped or failed)."""
    kind = ci.platform(env)
    _secrets[:] = [t for t in (github_token, gitlab_token) if t]
    try:
        if kind == "github":
            return post_github(report, env, github_token)
        if kind == "gitlab":
            return post_gitlab(report, env, gitlab_token)
    except Exception as exc:  # noqa: BLE001 - a comment must never fail the run
        warn(env, "could not post the report (%s: %s)", type(exc).__name__, exc)
        return None
    log.info("--comment: not running in GitHub Actions or GitLab CI; no comment posted")
    return None


# --- GitHub -----------------------------------------------------------------------------------------


def pull_request_number(env: Mapping[str, str]) -> Optional[int]:
    if not (env.get("GITHUB_EVENT_NAME") or "").startswith("pull_request") or not env.get("GITHUB_EVENT_PATH"):
        return None
    try:
        with open(env["GITHUB_EVENT_PATH"], encoding="utf-8") as f:
            number = json.load(f)["pull_request"]["number"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def post_github(report: report_mod.Report, env: Mapping[str, str], token: Optional[str]) -> Optional[str]:
    number = pull_request_number(env)
    if number is None:
        log.info("--comment: this run is not for a pull request (event %s); the report is in the job summary",
                 env.get("GITHUB_EVENT_NAME") or "unknown")
        return None
    repository = env.get("GITHUB_REPOSITORY")
    if not repository:
        warn(env, "GITHUB_REPOSITORY is not set; no comment posted")
        return None
    if not token:
        warn(env, "no GitHub token (set the github-token input, LIVESEND_GITHUB_TOKEN or GITHUB_TOKEN, with "
             "pull-requests: write); no comment posted")
        return None

    from github import Auth, Github, GithubException, GithubRetry

    api = (env.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
    gh = Github(
        auth=Auth.Token(token), base_url=api, timeout=TIMEOUT, per_page=100, lazy=True,
        retry=GithubRetry(total=2, backoff_factor=0.5, secondary_rate_wait=10),
        seconds_between_requests=None, seconds_between_writes=None,
    )
    text = body(report, env, report_mod.COMMENT_LIMIT)
    mark = marker(env)
    try:
        issue = gh.get_repo(repository).get_issue(number)
        existing = next((c for c in issue.get_comments() if mark in (c.body or "")), None)
        if existing is not None:
            existing.edit(text)
            outcome, url = "updated", existing.html_url
        else:
            created = issue.create_comment(text)
            outcome, url = "created", created.html_url
    except GithubException as exc:
        message = exc.data.get("message") if isinstance(exc.data, dict) else None
        if exc.status == 403:
            warn(env, "the GitHub token may not comment on pull request #%d (HTTP 403%s). Pull requests from forks "
                 "get a read-only token; elsewhere give the job `permissions: pull-requests: write`. The report "
                 "is in the job summary", number, f": {message}" if message else "")
        elif exc.status in (401, 404):
            warn(env, "GitHub refused the token or cannot find pull request #%d in %s (HTTP %d); no comment posted",
                 number, repository, exc.status)
        else:
            warn(env, "GitHub answered HTTP %s%s; no comment posted", exc.status, f" ({message})" if message else "")
        return None
    finally:
        gh.close()
    log.info("--comment: %s the report comment on pull request #%d: %s", outcome, number, url)
    return outcome


# --- GitLab -----------------------------------------------------------------------------------------


def post_gitlab(report: report_mod.Report, env: Mapping[str, str], token: Optional[str]) -> Optional[str]:
    iid = env.get("CI_MERGE_REQUEST_IID")
    if not iid or not iid.isdigit():
        log.info("--comment: this pipeline is not a merge request pipeline; no merge request note posted")
        return None
    if not token:
        warn(env, "set LIVESEND_GITLAB_TOKEN (a masked CI/CD variable holding a project, group or personal access "
             "token with the api scope) to post the report on the merge request: the job token (CI_JOB_TOKEN) "
             "cannot write merge request notes")
        return None
    server, project_id = env.get("CI_SERVER_URL"), env.get("CI_PROJECT_ID")
    if not server or not project_id:
        warn(env, "CI_SERVER_URL or CI_PROJECT_ID is not set; no merge request note posted")
        return None

    import gitlab

    gl = gitlab.Gitlab(server, private_token=token, timeout=TIMEOUT, retry_transient_errors=True)
    text = body(report, env, GITLAB_NOTE_LIMIT)
    mark = marker(env)
    try:
        mr = gl.projects.get(project_id, lazy=True).mergerequests.get(int(iid), lazy=True)
        existing = None
        for note in mr.notes.list(iterator=True, per_page=100, max_retries=3):
            if not getattr(note, "system", False) and mark in (getattr(note, "body", "") or ""):
                existing = note
                break
        if existing is not None:
            mr.notes.update(existing.id, {"body": text}, max_retries=3)
            outcome = "updated"
        else:
            mr.notes.create({"body": text}, max_retries=3)
            outcome = "created"
    except gitlab.exceptions.GitlabError as exc:
        code = exc.response_code
        if code in (401, 403):
            warn(env, "GitLab refused to let the token write a note on merge request !%s (HTTP %s): "
                 "LIVESEND_GITLAB_TOKEN needs the api scope and a role that may comment", iid, code)
        else:
            warn(env, "GitLab answered %s%s; no merge request note posted",
                 f"HTTP {code}" if code else "with an error", f" ({exc.error_message})" if exc.error_message else "")
        return None
    finally:
        gl.session.close()
    log.info("--comment: %s the report note on merge request !%s", outcome, iid)
    return outcome
