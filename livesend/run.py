"""One `livesend run`: identity -> sessions -> the command -> flush and `done` -> report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Mapping

from livesend import ci, report
from livesend.config import Config, ConfigError
from livesend.process import Command, CommandError, child_env
from livesend.session import Context, Session
from livesend.studio import NULL_SHA
from livesend.transport import DryRunTransport, Recorder, Transport

log = logging.getLogger("livesend")


def experiment_names(name: str, dirs: list) -> list:
    if len(dirs) == 1:
        return [name]
    return [f"{name}-{ci.sanitize(os.path.basename(os.path.normpath(d)) or 'dir')}" for d in dirs]


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


def _run(config: Config, env: Mapping[str, str], problems: Problems) -> int:
    cwd = os.getcwd()
    env = dict(env)
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
        repo_url = ""
    baseline, source = ci.detect_baseline(config.baseline_sha, env, cwd)
    if live and baseline == NULL_SHA:
        log.warning("not in a Git repository with commits: the baseline commit is unknown (set --baseline-sha); "
                    "Studio will list this experiment as detached")
    name = config.name or ci.generate_name(env)
    names = experiment_names(name, config.dirs)
    log.debug("experiment %s, baseline %s (%s), repo %s, endpoint %s", name, baseline, source, repo_url, config.endpoint)

    with contextlib.ExitStack() as stack:
        recorder = None
        if config.record:
            try:
                recorder = Recorder(stack.enter_context(open(config.record, "a", encoding="utf-8")))
            except OSError as exc:
                raise ConfigError(f"cannot open --record file {config.record}: {exc.strerror}") from None
        if config.dry_run:
            transport = DryRunTransport(sys.stderr, recorder)
        else:
            transport = Transport(config.endpoint, config.token or "", recorder, config.request_timeout)
        stack.callback(transport.close)
        root = ci.dvc_root(cwd, top)
        ctx = Context(
            cwd=cwd, repo_url=repo_url or "", baseline_sha=baseline, dvc_root=root, git_root=top,
            tree_root=top or os.path.realpath(cwd), env=env, message=config.message, interval=config.interval,
        )
        sessions = [Session(d, n, ctx, transport) for d, n in zip(config.dirs, names)] if live else []
        for session in sessions:
            session.begin()

        command = Command(config.command, child_env(env, config.token, name))
        try:
            status = command.run()
        except CommandError as exc:
            log.error("%s", exc)
            status = exc.status
        deadline = time.monotonic() + config.flush_timeout
        for session in sessions:
            session.finish(deadline)
        for session in sessions:
            session.join(max(0.0, deadline - time.monotonic()) + 2.0)

    experiments = [s for session in sessions for s in session.stats]
    summary = report.build(status, config.endpoint_host, experiments, config.dirs, cwd, env, live, config.dry_run,
                           groups=[session.stats for session in sessions] or None, names=names,
                           cancelled=bool(command.signals), name=name, baseline_sha=baseline,
                           repo_url=repo_url or "", problems=problems.items)
    for line in report.render_text(summary).splitlines():
        log.info("%s", line)
    if env.get("GITHUB_STEP_SUMMARY"):
        report.write_step_summary(summary, env["GITHUB_STEP_SUMMARY"])
    if config.comment:
        from livesend import comment

        comment.post(summary, env, config.github_token, config.gitlab_token)
    if config.report_json:
        write_report_json(config.report_json, summary)
    if config.strict and status == 0 and (not live or summary.delivery_failed or transport_failed(sessions)):
        log.error("--strict: delivery to Studio failed, so livesend exits 3 although the command succeeded")
        return 3
    return status


def transport_failed(sessions: list) -> bool:
    return any(s.crashed or s.transport.stopped or s.is_alive() for s in sessions)
