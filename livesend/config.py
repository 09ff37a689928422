"""Settings for one `livesend run`: flags, then environment, then defaults; validated up front so a
mistake is one clear line before the command starts, never a traceback halfway through training."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import urljoin, urlsplit

DEFAULT_STUDIO_URL = "https://studio.datachain.ai"
DEFAULT_ENDPOINT_PATH = "api/live"
TOKEN_VARS = ("STUDIO_TOKEN", "DVC_STUDIO_TOKEN")
# Tokens for the PR/MR comment: held in the Config, never passed on to the command (GITHUB_TOKEN too,
# when it is the one used for the comment).
COMMENT_TOKEN_VARS = ("LIVESEND_GITHUB_TOKEN", "LIVESEND_GITLAB_TOKEN")
SECRET_VARS = TOKEN_VARS + COMMENT_TOKEN_VARS


class ConfigError(Exception):
    """A usage or configuration mistake: its message names what to fix."""


@dataclass
class Config:
    command: list
    endpoint: str
    dirs: list
    token: Optional[str] = field(default=None, repr=False)
    token_source: Optional[str] = None
    name: Optional[str] = None
    baseline_sha: Optional[str] = None
    repo_url: Optional[str] = None
    message: Optional[str] = None
    interval: float = 1.0
    flush_timeout: float = 30.0
    cancel_flush_timeout: float = 3.0  # after a forwarded SIGINT/SIGTERM/SIGHUP: CI runners kill soon after
    request_timeout: float = 30.0
    record: Optional[str] = None
    report_json: Optional[str] = None
    dry_run: bool = False
    strict: bool = False
    verbosity: int = 0
    comment: bool = False
    github_token: Optional[str] = field(default=None, repr=False)
    gitlab_token: Optional[str] = field(default=None, repr=False)

    @property
    def secrets(self) -> list:
        return [s for s in (self.token, self.github_token, self.gitlab_token) if s]

    @property
    def endpoint_host(self) -> str:
        return urlsplit(self.endpoint).netloc


def first(*values: Optional[str]) -> Optional[str]:
    for value in values:
        if value:
            return value
    return None


def parse_bool(value: Optional[str], what: str) -> bool:
    if value is None or value.strip() == "":
        return False
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false, not {value!r}")


def parse_seconds(value, what: str, minimum: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number of seconds, not {value!r}") from None
    if math.isnan(seconds) or math.isinf(seconds) or seconds < minimum:
        raise ConfigError(f"{what} must be at least {minimum:g} seconds, not {value!r}")
    return seconds


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_endpoint(flag: Optional[str], env: Mapping[str, str]) -> str:
    """The ingestion URL, joined as dvc-studio-client joins it: a relative endpoint (`api/live`) goes
    onto DVC_STUDIO_URL or the default base; an absolute one is used as it is."""
    value = first(flag, env.get("STUDIO_ENDPOINT"))
    base = first(env.get("DVC_STUDIO_URL"), DEFAULT_STUDIO_URL)
    where = "--endpoint" if flag else "STUDIO_ENDPOINT" if value else "DVC_STUDIO_URL"
    try:
        if value and env.get("DVC_STUDIO_URL") and not urlsplit(value).scheme:
            where += " (joined onto DVC_STUDIO_URL)"
        url = urljoin(base, value or DEFAULT_ENDPOINT_PATH)
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{where} is not a valid URL ({exc}); use e.g. https://studio.datachain.ai/api/live") from None
    if parts.username or parts.password:  # checked first: the messages below quote the URL
        raise ConfigError(f"{where} must not carry credentials in the URL; the token comes from STUDIO_TOKEN")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{where} gives {url!r}, which is not an http(s) URL; use e.g. https://studio.datachain.ai/api/live")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(
            f"{where} gives {url!r}: the token may only travel over https:// (plain http is allowed on loopback hosts only)"
        )
    return url


def build(args, env: Mapping[str, str], needs_command: bool = True) -> Config:
    """Config from parsed arguments (an argparse namespace) and the environment."""
    if needs_command and not args.command:
        raise ConfigError("no command to run: use `livesend run [OPTIONS] -- COMMAND [ARG...]`")
    token, token_source = None, None
    for var in TOKEN_VARS:
        if env.get(var, "").strip():
            token, token_source = env[var].strip(), var
            break
    dirs = args.dir or [d for d in (env.get("LIVESEND_DIR") or "").splitlines() if d.strip()] or ["dvclive"]
    dirs = [d.strip() for d in dirs]
    if not all(dirs):
        raise ConfigError("--dir must name a directory, not an empty string")
    if len({os.path.normpath(d) for d in dirs}) != len(dirs):
        raise ConfigError(f"--dir lists the same directory twice: {', '.join(dirs)}")
    interval = parse_seconds(first(args.interval, env.get("LIVESEND_INTERVAL")) or 1, "--interval/LIVESEND_INTERVAL", 0.05)
    flush = parse_seconds(
        first(args.flush_timeout, env.get("LIVESEND_FLUSH_TIMEOUT")) or 30, "--flush-timeout/LIVESEND_FLUSH_TIMEOUT", 0
    )
    cancel_flush = parse_seconds(
        first(getattr(args, "cancel_flush_timeout", None), env.get("LIVESEND_CANCEL_FLUSH_TIMEOUT")) or 3,
        "--cancel-flush-timeout/LIVESEND_CANCEL_FLUSH_TIMEOUT", 0,
    )
    request_timeout = parse_seconds(
        first(getattr(args, "request_timeout", None), env.get("LIVESEND_REQUEST_TIMEOUT")) or 30,
        "--request-timeout/LIVESEND_REQUEST_TIMEOUT", 0.1,
    )
    strict = bool(args.strict) or parse_bool(env.get("LIVESEND_STRICT"), "LIVESEND_STRICT")
    comment = bool(getattr(args, "comment", None)) or parse_bool(env.get("LIVESEND_COMMENT"), "LIVESEND_COMMENT")
    github_token = first((env.get("LIVESEND_GITHUB_TOKEN") or "").strip(), (env.get("GITHUB_TOKEN") or "").strip() if comment else None)
    name = first(args.name, env.get("LIVESEND_NAME"), env.get("DVC_EXP_NAME"))
    if name is not None:
        from livesend.ci import valid_ref_component

        if not valid_ref_component(name):
            raise ConfigError(
                f"experiment name {name!r} is not a valid Git ref component (no '/', spaces, '..', '~^:?*[\\'); "
                "fix --name/LIVESEND_NAME/DVC_EXP_NAME"
            )
    baseline = first(args.baseline_sha, env.get("LIVESEND_BASELINE_SHA"))
    if baseline is not None:
        from livesend.ci import SHA_RE

        baseline = baseline.strip().lower()
        if not SHA_RE.match(baseline):
            raise ConfigError(f"--baseline-sha/LIVESEND_BASELINE_SHA must be a full 40-character commit SHA, not {baseline!r}")
    endpoint = resolve_endpoint(args.endpoint, env)
    return Config(
        command=list(args.command),
        endpoint=endpoint,
        dirs=dirs,
        token=token,
        token_source=token_source,
        name=name,
        baseline_sha=baseline,
        repo_url=first(args.repo_url),
        message=first(args.message, env.get("LIVESEND_MESSAGE")),
        interval=interval,
        flush_timeout=flush,
        cancel_flush_timeout=cancel_flush,
        request_timeout=request_timeout,
        record=args.record,
        report_json=getattr(args, "report_json", None),
        dry_run=bool(args.dry_run),
        strict=strict,
        verbosity=args.verbosity,
        comment=comment,
        github_token=github_token,
        gitlab_token=(env.get("LIVESEND_GITLAB_TOKEN") or "").strip() or None,
    )


class Redactor(logging.Filter):
    """Replaces every secret in a log record with `***` (defence in depth: no code path logs the token,
    and this makes sure an exception message quoting it would not either)."""

    def __init__(self, secrets: list) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, ()
            if record.exc_info:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
                record.exc_info = None
        return True


def redact(text: str, secrets: list) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
