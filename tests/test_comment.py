"""PR/MR comments: PyGithub and python-gitlab against a real loopback HTTP server serving the REST
endpoints they call (list comments/notes with pagination, create, update; 401/403 for bad or
read-only tokens). First run creates, a rerun updates the same comment, other jobs' comments stay,
a read-only token warns and never fails the run; and `livesend run --comment` end to end."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import EXAMPLES, TOKEN, run_livesend

from livesend import comment, report
from livesend.session import Stats

WRITE, READ = "ghs_write-token-5e6f7a8b", "ghs_read-only-token-1a2b3c"


class Forge:
    """GitHub (under /gh) and GitLab (under /gl/api/v4) comment endpoints on 127.0.0.1."""

    def __init__(self) -> None:
        self.comments: dict = {}  # ("o/r", number) -> [comment]
        self.notes: dict = {}  # (project, iid) -> [note]
        self.requests: list = []  # (method, path, token)
        self.next_id = 1000
        self.lock = threading.Lock()
        forge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, data, headers: dict | None = None) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                payload = json.loads(raw) if raw else {}
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                auth = self.headers.get("Authorization") or ""
                token = self.headers.get("PRIVATE-TOKEN") or auth.split(" ", 1)[-1]
                with forge.lock:
                    forge.requests.append((self.command, parts.path, token))
                    status, data, headers = forge.route(self.command, parts.path, query, payload, token)
                self._send(status, data, headers)

            do_GET = do_POST = do_PATCH = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Forge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- routing ------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict, payload: dict, token: str):
        if token not in (WRITE, READ):
            return 401, {"message": "Bad credentials" if path.startswith("/gh") else "401 Unauthorized"}, {}
        writing = method in ("POST", "PATCH", "PUT")
        if writing and token == READ:
            if path.startswith("/gh"):
                return 403, {"message": "Resource not accessible by integration",
                             "documentation_url": "https://docs.github.com/rest"}, {}
            return 403, {"message": "403 Forbidden"}, {}
        m = re.fullmatch(r"/gh/repos/([^/]+/[^/]+)/issues/(\d+)/comments", path)
        if m:
            items = self.comments.setdefault((m[1], int(m[2])), [])
            if method == "GET":
                return self.page(items, query, path)
            item = self.github_comment(m[1], int(m[2]), payload["body"])
            items.append(item)
            return 201, item, {}
        m = re.fullmatch(r"/gh/repos/([^/]+/[^/]+)/issues/comments/(\d+)", path)
        if m and method == "PATCH":
            for items in self.comments.values():
                for item in items:
                    if item["id"] == int(m[2]):
                        item["body"] = payload["body"]
                        item["updated_at"] = "2026-01-02T00:00:00Z"
                        return 200, item, {}
            return 404, {"message": "Not Found"}, {}
        m = re.fullmatch(r"/gl/api/v4/projects/([^/]+)/merge_requests/(\d+)/notes(?:/(\d+))?", path)
        if m:
            items = self.notes.setdefault((m[1], int(m[2])), [])
            if method == "GET" and not m[3]:
                return self.page(items, query, path)
            if method == "POST" and not m[3]:
                item = self.gitlab_note(payload["body"])
                items.append(item)
                return 201, item, {}
            if method == "PUT" and m[3]:
                for item in items:
                    if item["id"] == int(m[3]):
                        item["body"] = payload["body"]
                        return 200, item, {}
                return 404, {"message": "404 Not found"}, {}
        return 404, {"message": "Not Found"}, {}

    def page(self, items: list, query: dict, path: str):
        per_page, page = int(query.get("per_page", 30)), int(query.get("page", 1))
        chunk = items[(page - 1) * per_page: page * per_page]
        headers = {}
        if page * per_page < len(items):
            headers["Link"] = f'<{self.url}{path}?per_page={per_page}&page={page + 1}>; rel="next"'
            headers["X-Next-Page"] = str(page + 1)
        return 200, chunk, headers

    def github_comment(self, repo: str, number: int, body: str) -> dict:
        self.next_id += 1
        return {
            "id": self.next_id, "node_id": f"IC_{self.next_id}", "body": body,
            "url": f"{self.url}/gh/repos/{repo}/issues/comments/{self.next_id}",
            "html_url": f"https://github.example/{repo}/pull/{number}#issuecomment-{self.next_id}",
            "user": {"login": "github-actions[bot]", "id": 41898282, "type": "Bot"},
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        }

    def gitlab_note(self, body: str, system: bool = False) -> dict:
        self.next_id += 1
        return {"id": self.next_id, "body": body, "system": system, "noteable_type": "MergeRequest",
                "author": {"id": 7, "username": "project_42_bot"}, "created_at": "2026-01-01T00:00:00Z"}

    def writes(self) -> list:
        return [(m, p) for m, p, _ in self.requests if m != "GET"]


@pytest.fixture
def forge():
    with Forge() as server:
        yield server


@pytest.fixture
def logs(caplog):
    logger = logging.getLogger("livesend")
    attach = not logger.propagate  # after cli.setup_logging in this process, records stop at "livesend"
    if attach:
        logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def sample_report(status: int = 0, loss: float = 0.25) -> report.Report:
    section = report.Section(dir="dvclive", name="train-7-1-abcd", metrics=[("loss", loss)], step=9)
    return report.Report(status=status, endpoint_host="studio.example.com", experiments=[Stats("train-7-1-abcd", started=True, done=True)],
                         dirs=["dvclive"], name="train-7-1-abcd", baseline_sha="ab" * 20, sections=[section],
                         commands=["git add dvclive dvc.yaml && git commit -m 'Results of train-7-1-abcd' && git push"])


def github_env(forge: Forge, tmp_path: Path, event: str = "pull_request", **extra) -> dict:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"pull_request": {"number": 17, "head": {"sha": "cd" * 20}}}))
    env = {"GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": event, "GITHUB_EVENT_PATH": str(path),
           "GITHUB_REPOSITORY": "acme/models", "GITHUB_API_URL": f"{forge.url}/gh", "GITHUB_WORKFLOW": "ci",
           "GITHUB_JOB": "train"}
    env.update(extra)
    return env


def gitlab_env(forge: Forge, **extra) -> dict:
    env = {"GITLAB_CI": "true", "CI_SERVER_URL": f"{forge.url}/gl", "CI_PROJECT_ID": "42",
           "CI_MERGE_REQUEST_IID": "5", "CI_JOB_NAME": "train: [gpu]"}
    env.update(extra)
    return env


# --- GitHub -------------------------------------------------------------------------------------------


def test_github_creates_once_then_updates_in_place(forge, tmp_path, logs):
    others = forge.comments.setdefault(("acme/models", 17), [])
    for i in range(130):  # the marker is found past the first page
        others.append(forge.github_comment("acme/models", 17, f"review comment {i}"))
    others.append(forge.github_comment("acme/models", 17, "<!-- livesend:ci/evaluate -->\nanother job's report"))
    env = github_env(forge, tmp_path)

    assert comment.post(sample_report(loss=0.5), env, github_token=WRITE) == "created"
    mine = [c for c in others if "<!-- livesend:ci/train -->" in c["body"]]
    assert len(mine) == 1 and "| `loss` | 0.5 |" in mine[0]["body"]
    assert forge.writes() == [("POST", "/gh/repos/acme/models/issues/17/comments")]
    assert "created the report comment on pull request #17" in logs.text

    forge.requests.clear()
    assert comment.post(sample_report(status=1, loss=0.125), env, github_token=WRITE) == "updated"
    assert len(others) == 132
    mine_now = [c for c in others if "<!-- livesend:ci/train -->" in c["body"]]
    assert [c["id"] for c in mine_now] == [mine[0]["id"]]
    body = mine_now[0]["body"]
    assert "| `loss` | 0.125 |" in body and "### ❌ Training failed" in body and body.endswith(comment.FOOTER)
    assert forge.writes() == [("PATCH", f"/gh/repos/acme/models/issues/comments/{mine[0]['id']}")]
    assert others[130]["body"] == "<!-- livesend:ci/evaluate -->\nanother job's report"  # untouched
    assert all(token == WRITE for _, _, token in forge.requests)


def test_github_comment_key_separates_matrix_legs(forge, tmp_path):
    for leg in ("cpu", "gpu", "cpu"):
        comment.post(sample_report(), github_env(forge, tmp_path, LIVESEND_COMMENT_KEY=f"train-{leg}"), github_token=WRITE)
    bodies = [c["body"] for c in forge.comments[("acme/models", 17)]]
    assert len(bodies) == 2
    assert bodies[0].startswith("<!-- livesend:train-cpu -->") and bodies[1].startswith("<!-- livesend:train-gpu -->")


def test_github_read_only_token_warns_and_does_not_fail(forge, tmp_path, logs, capsys):
    assert comment.post(sample_report(), github_env(forge, tmp_path), github_token=READ) is None
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0] and "forks" in warnings[0]
    assert "Resource not accessible by integration" in warnings[0]
    out = capsys.readouterr().out
    assert out.startswith("::warning title=livesend comment::") and READ not in out
    assert forge.writes() == [("POST", "/gh/repos/acme/models/issues/17/comments")]
    assert forge.comments[("acme/models", 17)] == []


def test_github_bad_token_unreachable_api_no_token_and_push_events(forge, tmp_path, logs):
    assert comment.post(sample_report(), github_env(forge, tmp_path), github_token="wrong-token-123") is None
    assert "HTTP 401" in logs.text and "wrong-token-123" not in logs.text
    logs.clear()
    assert comment.post(sample_report(), github_env(forge, tmp_path), github_token=None) is None
    assert "no GitHub token" in logs.text
    logs.clear()
    dead = github_env(forge, tmp_path, GITHUB_API_URL="http://127.0.0.1:9/gh")  # discard port: refused
    assert comment.post(sample_report(), dead, github_token=WRITE) is None
    assert "could not post the report" in logs.text
    forge.requests.clear()
    logs.clear()
    assert comment.post(sample_report(), github_env(forge, tmp_path, event="push"), github_token=WRITE) is None
    assert forge.requests == [] and "not for a pull request" in logs.text


# --- GitLab -------------------------------------------------------------------------------------------


def test_gitlab_creates_once_then_updates_in_place(forge, logs):
    notes = forge.notes.setdefault(("42", 5), [])
    for i in range(120):
        notes.append(forge.gitlab_note(f"discussion {i}"))
    notes.append(forge.gitlab_note("<!-- livesend:train: [gpu] --> mentioned in a system note", system=True))
    env = gitlab_env(forge)

    assert comment.post(sample_report(loss=0.5), env, gitlab_token=WRITE) == "created"
    mine = [n for n in notes if n["body"].startswith("<!-- livesend:train: [gpu] -->\n")]
    assert len(mine) == 1 and "| `loss` | 0.5 |" in mine[0]["body"]
    assert forge.writes() == [("POST", "/gl/api/v4/projects/42/merge_requests/5/notes")]

    forge.requests.clear()
    assert comment.post(sample_report(loss=0.125), env, gitlab_token=WRITE) == "updated"
    assert len(notes) == 122 and "| `loss` | 0.125 |" in mine[0]["body"]
    assert forge.writes() == [("PUT", f"/gl/api/v4/projects/42/merge_requests/5/notes/{mine[0]['id']}")]
    assert "updated the report note on merge request !5" in logs.text


def test_gitlab_read_only_token_warns_and_does_not_fail(forge, logs):
    assert comment.post(sample_report(), gitlab_env(forge), gitlab_token=READ) is None
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0] and "api scope" in warnings[0]
    assert forge.notes[("42", 5)] == []


def test_gitlab_without_token_says_the_job_token_cannot_write_notes(forge, logs):
    assert comment.post(sample_report(), gitlab_env(forge), gitlab_token=None) is None
    assert "LIVESEND_GITLAB_TOKEN" in logs.text and "CI_JOB_TOKEN" in logs.text and "cannot write" in logs.text
    assert forge.requests == []
    logs.clear()
    assert comment.post(sample_report(), gitlab_env(forge, CI_MERGE_REQUEST_IID=""), gitlab_token=WRITE) is None
    assert "not a merge request pipeline" in logs.text and forge.requests == []


# --- end to end ---------------------------------------------------------------------------------------


def environ_of(path: Path) -> dict:
    return dict(item.split(b"=", 1) for item in path.read_bytes().split(b"\0") if b"=" in item)


DUMP_ENV = (
    "import pathlib, runpy, sys\n"
    "pathlib.Path('environ').write_bytes(open('/proc/self/environ', 'rb').read())\n"
    f"sys.argv = ['train.py', '--epochs', '4']\nrunpy.run_path({str(EXAMPLES / 'train.py')!r}, run_name='__main__')\n"
)


def test_livesend_run_comments_on_the_pull_request(studio, repo, forge, tmp_path):
    (repo / "env.py").write_text(DUMP_ENV)
    env = github_env(forge, tmp_path, GITHUB_TOKEN=WRITE, GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"))
    for run in (1, 2):
        result = run_livesend(repo, studio.url, [sys.executable, "env.py"], "--comment", "--name", f"pr-run-{run}", env=env)
        assert result.returncode == 0, result.stderr
        assert f"{'created' if run == 1 else 'updated'} the report comment on pull request #17" in result.stderr
        for text in (result.stdout, result.stderr, (tmp_path / "summary.md").read_text()):
            assert WRITE not in text and TOKEN not in text
        variables = environ_of(repo / "environ")
        assert b"GITHUB_TOKEN" not in variables and WRITE.encode() not in (repo / "environ").read_bytes()
    bodies = [c["body"] for c in forge.comments[("acme/models", 17)]]
    assert len(bodies) == 1 and "`pr-run-2`" in bodies[0] and "```mermaid" in bodies[0]
    assert (tmp_path / "summary.md").read_text().count("### ✅ Training succeeded") == 2


def test_livesend_run_gitlab_note_token_never_reaches_the_command(studio, repo, forge):
    (repo / "env.py").write_text(DUMP_ENV)
    env = gitlab_env(forge, LIVESEND_COMMENT="true", LIVESEND_GITLAB_TOKEN=WRITE, ALSO_HOLDS_IT=f"x{WRITE}")
    result = run_livesend(repo, studio.url, [sys.executable, "env.py"], env=env)
    assert result.returncode == 0, result.stderr
    assert "created the report note on merge request !5" in result.stderr
    raw = (repo / "environ").read_bytes()
    assert WRITE.encode() not in raw
    variables = environ_of(repo / "environ")
    assert b"LIVESEND_GITLAB_TOKEN" not in variables and b"ALSO_HOLDS_IT" not in variables
    assert WRITE not in result.stdout + result.stderr
    assert len(forge.notes[("42", 5)]) == 1
