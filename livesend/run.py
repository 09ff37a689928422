"""One `livesend run`: identity -> sessions -> the command -> flush and `done` -> report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping

from livesend import ci, ledger, report
from livesend.config import Config, ConfigError
from livesend.process import Command, CommandError, child_env, install_handlers, restore_handlers
from livesend.session import Context, Session
from livesend.studio import NULL_SHA
from livesend.transport import open_transport

log = logging.getLogger("livesend")


def experiment_names(name: str, dirs: list) -> list:
    if len(dirs) == 1:
        return [name]
    return [f"{name}-{ci.sanitize(os.path.basename(os.path.normpath(d)) or 'dir')}" for d in dirs]


def flush_seconds(config: Config, cancelled: bool) -> float:
    """How long to deliver the rest and `done` after the command. A cancelled run gets the shorter
    cancel budget: GitHub kills a cancelled step's container 7.5 + 2.5 s after SIGINT, and a person who
    pressed Ctrl-C is waiting."""
    return min(config.flush_timeout, config.cancel_flush_timeout) if cancelled else config.flush_timeout


class LateCancel:
    """SIGINT, SIGTERM and SIGHUP outside the command's lifetime: while livesend flushes after it (a job
    cancelled then). The first cuts the flush to --cancel-flush-timeout; a second one, or one after the
    command was already cancelled (Ctrl-C twice), stops livesend at once. Installed before the command
    starts, so that the command's own handlers give way to these when it ends."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.signals: list = []
        self.sessions: list = []
        self.deadline: float | None = None
        self.already_cancelled = False
        self._previous: dict = {}

    def __enter__(self) -> "LateCancel":
        self._previous = install_handlers(self._handle)
        return self

    def __exit__(self, *exc) -> None:
        restore_handlers(self._previous)

    def flushing(self, sessions: list, deadline: float, already_cancelled: bool) -> None:
        self.sessions, self.deadline, self.already_cancelled = sessions, deadline, already_cancelled
        if self.signals:  # one came between the command's end and now
            self._cut()

    def _handle(self, signum, _frame) -> None:
        self.signals.append(signum)
        if len(self.signals) > 1 or self.already_cancelled:
            raise SystemExit(128 + signum)
        if self.deadline is not None:
            self._cut()

    def _cut(self) -> None:
        deadline = time.monotonic() + self.budget
        if self.deadline is not None and deadline < self.deadline:
            log.warning("cancelled while delivering the rest: %g s left to finish (--cancel-flush-timeout)", self.budget)
            self.deadline = deadline
            for session in self.sessions:
                session.cut(deadline)


class Problems(logging.Handler):
    """Collects warnings and errors (already redacted) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.items: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.items.append({"level": "error" if record.levelno >= logging.ERROR else "warning",
                           "message": record.getMessage()})


def write_report_json(path: str, summary: report.Report) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report.to_json(summary), f, indent=2)
            f.write("\n")
    except OSError as exc:
        log.error("cannot write --report-json file %s: %s", path, exc.strerror)


def run(config: Config, env: Mapping[str, str]) -> int:
    """Run the command with live metrics. `env` is livesend's environment without the token."""
    problems = Problems()
    for handler in log.handlers:
        for f in handler.filters:
            problems.addFilter(f)  # the redactor
    log.addHandler(problems)
    try:
        return _run(config, env, problems)
    finally:
        log.removeHandler(problems)


@dataclass
class Plan:
    """Everything decided before the command starts."""

    name: str
    names: list
    baseline: str
    repo_url: str
    live: bool
    tree_root: str  # the working tree: links that leave it are never read ("": not known)
    sessions: list = field(default_factory=list)


def prepare(config: Config, env: dict, cwd: str, stack: contextlib.ExitStack) -> Plan:
    """Identity, transport and one session per directory. Raises ConfigError for the user's mistakes."""
    top = ci.git_root(cwd, env)
    live = bool(config.token) or config.dry_run
    if not live:
        log.warning(
            "live metrics are off: no Studio token (set the STUDIO_TOKEN secret). This is normal on pull requests "
            "from forks, where CI withholds secrets; the command runs as usual."
        )
    repo_url, _ = ci.detect_repo_url(config.repo_url, env, cwd)
    if live and not repo_url:
        if not config.dry_run:
            raise ConfigError("cannot tell which repository this is: set --repo-url or DVC_STUDIO_REPO_URL "
                              "(or run inside a Git clone with an `origin` remote)")
        log.warning("no repository URL found (set --repo-url); the dry run shows an empty one")
    baseline, source = ci.detect_baseline(config.baseline_sha, env, cwd)
    if live and baseline == NULL_SHA:
        log.warning("not in a Git repository with commits: the baseline commit is unknown (set --baseline-sha); "
                    "Studio will list this experiment as detached")
    name = config.name or ci.generate_name(env)
    plan = Plan(name, experiment_names(name, config.dirs), baseline, repo_url or "", live,
                top or os.path.realpath(cwd))
    log.debug("experiment %s, baseline %s (%s), repo %s, endpoint %s", name, baseline, source, repo_url, config.endpoint)
    if not live:
        return plan
    transport = open_transport(config, stack)
    git_dir = None if config.dry_run else ci.git_dir(cwd, env)
    ctx = Context(
        cwd=cwd, repo_url=plan.repo_url, baseline_sha=baseline, dvc_root=ci.dvc_root(cwd, top), git_root=top,
        tree_root=plan.tree_root, env=env, message=config.message, interval=config.interval,
        ledger=ledger.for_run(git_dir, name),
    )
    plan.sessions = [Session(d, n, ctx, transport) for d, n in zip(config.dirs, plan.names)]
    return plan


def _run(config: Config, env: Mapping[str, str], problems: Problems) -> int:
    cwd = os.getcwd()
    env = dict(env)
    with contextlib.ExitStack() as stack:
        try:
            plan = prepare(config, env, cwd, stack)
            for session in plan.sessions:
                session.begin()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a livesend bug must not keep the command from running
            log.error("internal error while preparing live metrics (%s: %s); they are off, the command runs as usual",
                      type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            name = config.name or "run"
            plan = Plan(name, experiment_names(name, config.dirs), NULL_SHA, "", False, "")

        late = stack.enter_context(LateCancel(config.cancel_flush_timeout))
        command = Command(config.command, child_env(env, config.token, plan.name))
        try:
            status = command.run()
        except CommandError as exc:
            log.error("%s", exc)
            status = exc.status
        flush = flush_seconds(config, cancelled=bool(command.signals))
        if command.signals and flush < config.flush_timeout and plan.live:
            log.info("the run was cancelled: delivering the rest for up to %g s (--cancel-flush-timeout)", flush)
        deadline = time.monotonic() + flush
        for session in plan.sessions:
            session.finish(deadline)
        late.flushing(plan.sessions, deadline, already_cancelled=bool(command.signals))
        for session in plan.sessions:
            # a request in flight at the deadline (a stalled Studio) is abandoned with its daemon thread
            while session.is_alive() and time.monotonic() < late.deadline + 0.5:
                session.join(min(0.1, max(0.0, late.deadline + 0.5 - time.monotonic())))
        cancelled = bool(command.signals or late.signals)
    return finish(config, env, cwd, plan, status, cancelled, problems)


def finish(config: Config, env: dict, cwd: str, plan: Plan, status: int, cancelled: bool, problems: Problems) -> int:
    """The end-of-run report everywhere it goes, then the exit status."""
    sessions = plan.sessions
    experiments = [s for session in sessions for s in session.stats]
    book = sessions[0].ctx.ledger if sessions else None
    if book is not None and book.path:
        still_open = {i.name for i in book.open}
        for s in experiments:
            s.left_open = not s.done and s.name in still_open
    summary = guarded("building the end-of-run report", lambda: report.build(
        status, config.endpoint_host, experiments, config.dirs, cwd, env, plan.live, config.dry_run,
        groups=[session.stats for session in sessions] or None, names=plan.names, cancelled=cancelled,
        name=plan.name, baseline_sha=plan.baseline, repo_url=plan.repo_url, problems=problems.items,
        tree_root=plan.tree_root or None,
    ))
    if summary is None:
        return status
    guarded("printing the report", lambda: print_report(summary, ci.platform(env) == "gitlab"))
    if env.get("GITHUB_STEP_SUMMARY"):
        guarded("writing the job summary", lambda: report.write_step_summary(summary, env["GITHUB_STEP_SUMMARY"]))
    if config.comment and config.dry_run:
        log.info("dry run: not posting the report as a comment")
    elif config.comment:
        from livesend import comment

        guarded("posting the report comment", lambda: comment.post(summary, env, config.github_token, config.gitlab_token))
    if config.report_json:
        guarded("writing --report-json", lambda: write_report_json(config.report_json, summary))
    if config.strict and status == 0 and (not plan.live or summary.delivery_failed or transport_failed(sessions)):
        log.error("--strict: delivery to Studio failed, so livesend exits 3 although the command succeeded")
        return 3
    return status


def gitlab_section(edge: str, name: str, header: str = "") -> str:
    """A GitLab log section marker (a collapsible part of the job log)."""
    return f"\033[0Ksection_{edge}:{int(time.time())}:{name}\r\033[0K{header}\n"


def print_report(summary: report.Report, gitlab: bool) -> None:
    """The short text report on stderr; in a GitLab job, as its own log section."""
    if not log.isEnabledFor(logging.INFO):
        return
    sys.stderr.flush()
    if gitlab:
        sys.stderr.write(gitlab_section("start", "livesend_summary", "livesend: summary"))
    for line in report.render_text(summary).splitlines():
        log.info("%s", line)
    if gitlab:
        sys.stderr.write(gitlab_section("end", "livesend_summary"))
    sys.stderr.flush()


def guarded(what: str, action):
    """Run one end-of-run step; a livesend bug there is logged and never changes the exit status."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001
        log.error("internal error while %s (%s: %s); the command's exit status is unaffected", what,
                  type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def transport_failed(sessions: list) -> bool:
    return any(s.crashed or s.transport.stopped or s.is_alive() for s in sessions)
