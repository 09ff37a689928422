"""`livesend run [OPTIONS] -- COMMAND [ARG...]`: arguments and environment -> a Config -> a run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from livesend import __version__
from livesend.config import SECRET_VARS, ConfigError, Redactor, build

log = logging.getLogger("livesend")

USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not a usage dump
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="livesend",
        description="Stream a training command's DVCLive metrics, params and plots to Iterative Studio, live.",
    )
    parser.add_argument("--version", action="version", version=f"livesend {__version__}")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=Parser)
    run = commands.add_parser(
        "run",
        help="run a command and send its DVCLive output to Studio while it runs",
        description="Run COMMAND (no shell) and send its DVCLive output to Studio while it runs. "
        "The Studio token is read from STUDIO_TOKEN (else DVC_STUDIO_TOKEN) only.",
        usage="livesend run [OPTIONS] -- COMMAND [ARG...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    run.add_argument("--endpoint", metavar="URL", help="ingestion endpoint [env STUDIO_ENDPOINT; default "
                     "https://studio.datachain.ai/api/live; a relative path is joined onto DVC_STUDIO_URL]")
    run.add_argument("--dir", metavar="PATH", action="append",
                     help="DVCLive output directory, repeatable [env LIVESEND_DIR, one per line; default dvclive]")
    run.add_argument("--name", metavar="NAME", help="experiment name [env LIVESEND_NAME, DVC_EXP_NAME; default generated]")
    run.add_argument("--baseline-sha", metavar="SHA", help="commit the experiment starts from [env LIVESEND_BASELINE_SHA; default detected]")
    run.add_argument("--repo-url", metavar="URL", help="repository URL as Studio knows it [env DVC_STUDIO_REPO_URL, STUDIO_REPO_URL; default detected]")
    run.add_argument("--message", metavar="TEXT", help="message shown in Studio, cut to 72 chars [env LIVESEND_MESSAGE]")
    run.add_argument("--interval", metavar="SECONDS", help="at most one data event per interval [env LIVESEND_INTERVAL; default 1]")
    run.add_argument("--flush-timeout", metavar="SECONDS",
                     help="time to deliver the rest and `done` after the command ends [env LIVESEND_FLUSH_TIMEOUT; default 30]")
    run.add_argument("--cancel-flush-timeout", metavar="SECONDS",
                     help="the same when livesend was signalled (a cancelled job, Ctrl-C): the shorter of the two applies "
                          "[env LIVESEND_CANCEL_FLUSH_TIMEOUT; default 3]")
    add_request_options(run)
    run.add_argument("--report-json", metavar="FILE", help="write the end-of-run report as JSON (for CI integrations)")
    run.add_argument("--comment", action="store_true", default=None,
                     help="post the report on the pull request (GitHub) or merge request (GitLab), one comment per "
                     "job, updated in place [env LIVESEND_COMMENT; token LIVESEND_GITHUB_TOKEN or GITHUB_TOKEN, LIVESEND_GITLAB_TOKEN]")
    run.add_argument("--dry-run", action="store_true", help="send nothing, need no token: print each payload")
    run.add_argument("--strict", action="store_true", default=None,
                     help="exit 3 when the command succeeded but delivery to Studio failed [env LIVESEND_STRICT]")
    add_verbosity(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    done = commands.add_parser(
        "done",
        help="mark in Studio the experiments a killed run left open",
        description="Send `done` for the experiments a run of this clone opened in Studio and did not close "
        "(it was killed: a cancelled GitLab job, an OOM kill). The run keeps the list in the Git directory; "
        "this reads it, closes what is open and removes it. The GitLab template runs it in after_script and the "
        "GitHub action in its post step. The Studio token is read from STUDIO_TOKEN (else DVC_STUDIO_TOKEN) only.",
        usage="livesend done [OPTIONS]",
        epilog="exit status: 0 when nothing is left open; 1 when an experiment could not be marked done; "
        "2 for a usage or configuration error.",
    )
    done.add_argument("--name", metavar="NAME", help="the run's experiment name, as `livesend run` printed it "
                      "[env LIVESEND_NAME, DVC_EXP_NAME; in GitLab CI the job's own run]")
    done.add_argument("--endpoint", metavar="URL", help="ingestion endpoint [env STUDIO_ENDPOINT; as for `livesend run`]")
    done.add_argument("--flush-timeout", metavar="SECONDS",
                      help="how long to keep trying [env LIVESEND_FLUSH_TIMEOUT; default 30]")
    add_request_options(done)
    done.add_argument("--dry-run", action="store_true", help="send nothing, need no token: print each payload")
    add_verbosity(done)
    done.set_defaults(command=[], dir=None, baseline_sha=None, repo_url=None, message=None, interval=None, strict=None)
    return parser


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """Options of every subcommand that talks to Studio."""
    parser.add_argument("--request-timeout", metavar="SECONDS",
                        help="how long to wait for Studio to answer one request [env LIVESEND_REQUEST_TIMEOUT; default 30]")
    parser.add_argument("--record", metavar="FILE", help="append one JSON line per request made (never the token)")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                        help="warnings and errors only")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, help="more log lines")


EPILOG = """\
exit status: the command's own; 128+N when it was killed by signal N; 2 for a usage or configuration
error (before the command starts); 126/127 when it cannot be executed / is not found; 3 with --strict
when the command succeeded but delivery to Studio failed.

example:
  STUDIO_TOKEN=... livesend run -- python train.py
  livesend run --dry-run -- python examples/train.py
"""


class GitHubFormatter(logging.Formatter):
    """In a GitHub Actions step, warnings and errors become annotations (shown on the run's page)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno < logging.WARNING:
            return text
        level = "error" if record.levelno >= logging.ERROR else "warning"
        escaped = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        return f"::{level} title=livesend::{escaped}"


def annotations_wanted(env) -> bool:
    """GitHub Actions, unless turned off (the container action annotates after its stop-commands block)."""
    return env.get("GITHUB_ACTIONS") == "true" and env.get("LIVESEND_ANNOTATIONS", "").lower() not in ("0", "false", "no")


def setup_logging(verbosity: int, secrets: list) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = GitHubFormatter if annotations_wanted(os.environ) else logging.Formatter
    handler.setFormatter(formatter("livesend: %(message)s"))
    handler.addFilter(Redactor(secrets))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity])


def main(argv: Optional[list] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    try:
        args = parser.parse_args(args_list)
        if args.subcommand not in ("run", "done"):
            parser.print_help(sys.stderr)
            return USAGE_ERROR
        if args.command and args.command[0] == "--":
            args.command = args.command[1:]
        config = build(args, os.environ, needs_command=args.subcommand == "run")
    except ConfigError as exc:
        print(f"livesend: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    # From here on the token lives only in the Config: not in our environment, so no child process
    # (git, the command) can inherit it.
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and not any(s in v for s in config.secrets)}
    for key in set(os.environ) - set(env):
        del os.environ[key]
    setup_logging(config.verbosity, config.secrets)
    if args.subcommand == "done":
        from livesend.done import close_open as run
    else:
        from livesend.run import run

    try:
        return run(config, env)
    except ConfigError as exc:
        log.error("error: %s", exc)
        return USAGE_ERROR
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C during the flush
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
