"""Unit tests of livesend.config: endpoint resolution, flag > environment > default, clear errors, redaction."""

from __future__ import annotations

import io
import logging

import pytest
from dvc_studio_client import post_live_metrics as plm

from livesend.cli import make_parser
from livesend.config import ConfigError, Redactor, build, is_loopback, redact, resolve_endpoint

SHA = "c45d3d9ae43b014f4a6af78076a819168d492562"
TOKEN = "lsd-SECRET-token-7f3a9c"


def args(*flags: str, command=("python", "train.py")):
    """What `livesend run FLAGS -- COMMAND` parses to (as cli.main hands it to `build`)."""
    parsed = make_parser().parse_args(["run", *flags, "--", *command])
    if parsed.command and parsed.command[0] == "--":
        parsed.command = parsed.command[1:]
    return parsed


def config(*flags: str, **env: str):
    return build(args(*flags), env)


# --- endpoint ---------------------------------------------------------------------------------------

JOINS = [
    # (DVC_STUDIO_URL, STUDIO_ENDPOINT, expected) -- protocol reference §1.1
    (None, None, "https://studio.datachain.ai/api/live"),
    ("https://studio.datachain.ai", None, "https://studio.datachain.ai/api/live"),
    ("https://host/studio", None, "https://host/api/live"),  # urljoin drops the last segment
    ("https://host/studio/", None, "https://host/studio/api/live"),
    ("https://host/studio/", "/api/live", "https://host/api/live"),
    ("https://host/studio/", "api/v2/live", "https://host/studio/api/v2/live"),
    (None, "api/live", "https://studio.datachain.ai/api/live"),
    (None, "custom/path", "https://studio.datachain.ai/custom/path"),
    ("https://host/studio/", "https://other/x", "https://other/x"),
    (None, "https://other.example:8443/api/live", "https://other.example:8443/api/live"),
    ("http://127.0.0.1:8000", None, "http://127.0.0.1:8000/api/live"),
    (None, "https:///api/live", "https://studio.datachain.ai/api/live"),  # same scheme, no host: the base's
]


@pytest.mark.parametrize("studio_url, endpoint, expected", JOINS)
def test_resolve_endpoint_joins_like_dvc_studio_client(studio_url, endpoint, expected, monkeypatch):
    env = {k: v for k, v in (("DVC_STUDIO_URL", studio_url), ("STUDIO_ENDPOINT", endpoint)) if v}
    assert resolve_endpoint(None, env) == expected
    assert resolve_endpoint(endpoint, {k: v for k, v in env.items() if k != "STUDIO_ENDPOINT"}) == expected
    # the oracle: the URL dvc-studio-client itself posts to with the same settings
    urls = []
    monkeypatch.setattr(plm.requests, "post", lambda url, **kw: urls.append(url) or type("R", (), {
        "status_code": 200, "content": b""})())
    monkeypatch.delenv("DVC_STUDIO_OFFLINE", raising=False)
    monkeypatch.delenv("STUDIO_ENDPOINT", raising=False)
    monkeypatch.delenv("DVC_STUDIO_URL", raising=False)
    if endpoint:
        monkeypatch.setenv("STUDIO_ENDPOINT", endpoint)
    plm.post_live_metrics("start", SHA, "n", "dvclive", studio_token="t", studio_repo_url="r", studio_url=studio_url)
    assert urls == [expected]


def test_flag_endpoint_wins_over_environment():
    env = {"STUDIO_ENDPOINT": "https://env.example/api/live", "DVC_STUDIO_URL": "https://base.example/"}
    assert resolve_endpoint("https://flag.example/api/live", env) == "https://flag.example/api/live"
    assert resolve_endpoint("x/live", env) == "https://base.example/x/live"
    assert resolve_endpoint(None, env) == "https://env.example/api/live"
    assert resolve_endpoint("", env) == "https://env.example/api/live"  # an empty value counts as unset


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/api/live", "http://127.1.2.3/api/live", "http://[::1]:8000/api/live",
     "http://localhost:8000/api/live", "http://LOCALHOST/api/live", "https://studio.example.com/api/live",
     "https://10.0.0.1/api/live"],
)
def test_allowed_endpoints(url):
    assert resolve_endpoint(url, {}) == url


@pytest.mark.parametrize(
    "flag, env, names",
    [
        ("http://studio.example.com/api/live", {}, "--endpoint"),
        (None, {"STUDIO_ENDPOINT": "http://10.0.0.1/api/live"}, "STUDIO_ENDPOINT"),
        (None, {"DVC_STUDIO_URL": "http://studio.example.com"}, "DVC_STUDIO_URL"),
        (None, {"DVC_STUDIO_URL": "http://evil.example/", "STUDIO_ENDPOINT": "api/live"}, "DVC_STUDIO_URL"),
        ("http://localhost.example.com/api/live", {}, "--endpoint"),
        ("http://0.0.0.0:8000/api/live", {}, "--endpoint"),
        ("http://128.0.0.1/api/live", {}, "--endpoint"),
        ("ftp://studio.example.com/api/live", {}, "--endpoint"),
        ("file:///etc/passwd", {}, "--endpoint"),
        ("https://[::1/api/live", {}, "--endpoint"),
        ("https://studio.example.com:port/api/live", {}, "--endpoint"),
        (None, {"DVC_STUDIO_URL": "studio.example.com"}, "DVC_STUDIO_URL"),
    ],
)
def test_bad_endpoints_are_one_line_config_errors(flag, env, names):
    with pytest.raises(ConfigError) as err:
        resolve_endpoint(flag, env)
    message = str(err.value)
    assert names in message and "\n" not in message


@pytest.mark.parametrize(
    "url",
    ["https://user:hunter2-secret@studio.example.com/api/live", "https://hunter2-secret@studio.example.com/api/live",
     "http://user:hunter2-secret@example.com/api/live", "ftp://u:hunter2-secret@x/y", "https://:hunter2-secret@h/api"],
)
def test_credentials_in_the_url_are_refused_without_quoting_them(url):
    with pytest.raises(ConfigError) as err:
        resolve_endpoint(url, {})
    assert "credentials" in str(err.value) and "hunter2-secret" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_endpoint(None, {"DVC_STUDIO_URL": url.rsplit("/", 1)[0] + "/"})
    assert "hunter2-secret" not in str(err.value)


@pytest.mark.parametrize(
    "host, expected",
    [("localhost", True), ("LocalHost", True), ("127.0.0.1", True), ("127.255.255.254", True), ("::1", True),
     ("128.0.0.1", False), ("0.0.0.0", False), ("::", False), ("localhost.example.com", False), ("example.com", False),
     ("", False), (None, False), ("10.0.0.1", False)],
)
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


# --- flag > environment > default -------------------------------------------------------------------


def test_defaults():
    c = config()
    assert c.command == ["python", "train.py"]
    assert c.endpoint == "https://studio.datachain.ai/api/live" and c.endpoint_host == "studio.datachain.ai"
    assert c.dirs == ["dvclive"]
    assert (c.token, c.token_source, c.name, c.baseline_sha, c.repo_url, c.message) == (None,) * 6
    assert (c.interval, c.flush_timeout, c.record, c.dry_run, c.strict, c.verbosity) == (1.0, 30.0, None, False, False, 0)
    assert c.cancel_flush_timeout == 3.0


def test_token_from_studio_token_then_dvc_studio_token():
    assert (config(STUDIO_TOKEN="a", DVC_STUDIO_TOKEN="b").token, config(STUDIO_TOKEN="a").token_source) == ("a", "STUDIO_TOKEN")
    c = config(DVC_STUDIO_TOKEN="b")
    assert (c.token, c.token_source) == ("b", "DVC_STUDIO_TOKEN")
    c = config(STUDIO_TOKEN="  ", DVC_STUDIO_TOKEN=" b\n")
    assert (c.token, c.token_source) == ("b", "DVC_STUDIO_TOKEN")  # blank counts as unset, whitespace trimmed
    assert TOKEN not in repr(config(STUDIO_TOKEN=TOKEN))


@pytest.mark.parametrize(
    "attr, flags, env, expected",
    [
        ("endpoint", ["--endpoint", "https://flag.example/api/live"], {"STUDIO_ENDPOINT": "https://env.example/x"},
         "https://flag.example/api/live"),
        ("endpoint", [], {"STUDIO_ENDPOINT": "https://env.example/x"}, "https://env.example/x"),
        ("dirs", ["--dir", "a", "--dir", "b/c"], {"LIVESEND_DIR": "x"}, ["a", "b/c"]),
        ("dirs", [], {"LIVESEND_DIR": "x\n\n y/z \n"}, ["x", "y/z"]),
        ("dirs", [], {"LIVESEND_DIR": ""}, ["dvclive"]),
        ("name", ["--name", "flag"], {"LIVESEND_NAME": "env", "DVC_EXP_NAME": "dvc"}, "flag"),
        ("name", [], {"LIVESEND_NAME": "env", "DVC_EXP_NAME": "dvc"}, "env"),
        ("name", [], {"DVC_EXP_NAME": "dvc"}, "dvc"),
        ("name", [], {"LIVESEND_NAME": "", "DVC_EXP_NAME": "dvc"}, "dvc"),
        ("baseline_sha", ["--baseline-sha", SHA], {"LIVESEND_BASELINE_SHA": "1" * 40}, SHA),
        ("baseline_sha", [], {"LIVESEND_BASELINE_SHA": "1" * 40}, "1" * 40),
        ("baseline_sha", ["--baseline-sha", SHA.upper()], {}, SHA),
        ("repo_url", ["--repo-url", "https://github.com/o/r"], {"DVC_STUDIO_REPO_URL": "x"}, "https://github.com/o/r"),
        ("message", ["--message", "flag msg"], {"LIVESEND_MESSAGE": "env msg"}, "flag msg"),
        ("message", [], {"LIVESEND_MESSAGE": "env msg"}, "env msg"),
        ("interval", ["--interval", "2.5"], {"LIVESEND_INTERVAL": "7"}, 2.5),
        ("interval", [], {"LIVESEND_INTERVAL": "7"}, 7.0),
        ("interval", [], {"LIVESEND_INTERVAL": "0.05"}, 0.05),
        ("flush_timeout", ["--flush-timeout", "0"], {"LIVESEND_FLUSH_TIMEOUT": "9"}, 0.0),
        ("flush_timeout", [], {"LIVESEND_FLUSH_TIMEOUT": "9"}, 9.0),
        ("cancel_flush_timeout", ["--cancel-flush-timeout", "0"], {"LIVESEND_CANCEL_FLUSH_TIMEOUT": "9"}, 0.0),
        ("cancel_flush_timeout", [], {"LIVESEND_CANCEL_FLUSH_TIMEOUT": "9"}, 9.0),
        ("strict", ["--strict"], {"LIVESEND_STRICT": "false"}, True),
        ("strict", [], {"LIVESEND_STRICT": "yes"}, True),
        ("strict", [], {"LIVESEND_STRICT": "0"}, False),
        ("strict", [], {"LIVESEND_STRICT": ""}, False),
        ("record", ["--record", "r.jsonl"], {}, "r.jsonl"),
        ("dry_run", ["--dry-run"], {}, True),
        ("verbosity", ["-q"], {}, -1),
        ("verbosity", ["-v"], {}, 1),
    ],
)
def test_flag_then_environment_then_default(attr, flags, env, expected):
    assert getattr(config(*flags, **env), attr) == expected


@pytest.mark.parametrize(
    "flags, env, names",
    [
        (["--interval", "abc"], {}, "--interval"),
        (["--interval", "0"], {}, "--interval"),
        ([], {"LIVESEND_INTERVAL": "-1"}, "LIVESEND_INTERVAL"),
        ([], {"LIVESEND_INTERVAL": "nan"}, "LIVESEND_INTERVAL"),
        ([], {"LIVESEND_INTERVAL": "inf"}, "LIVESEND_INTERVAL"),
        (["--flush-timeout", "-1"], {}, "--flush-timeout"),
        ([], {"LIVESEND_FLUSH_TIMEOUT": "soon"}, "LIVESEND_FLUSH_TIMEOUT"),
        (["--cancel-flush-timeout", "-2"], {}, "--cancel-flush-timeout"),
        ([], {"LIVESEND_STRICT": "maybe"}, "LIVESEND_STRICT"),
        (["--name", "a/b"], {}, "--name"),
        ([], {"LIVESEND_NAME": "has space"}, "LIVESEND_NAME"),
        ([], {"DVC_EXP_NAME": "x..y"}, "DVC_EXP_NAME"),
        (["--name", "-dash"], {}, "--name"),
        (["--name", "x.lock"], {}, "--name"),
        (["--baseline-sha", "abc123"], {}, "--baseline-sha"),
        ([], {"LIVESEND_BASELINE_SHA": "g" * 40}, "LIVESEND_BASELINE_SHA"),
        (["--dir", "a", "--dir", "a"], {}, "--dir"),
        (["--dir", "a", "--dir", "./a/"], {}, "--dir"),
        (["--dir", ""], {}, "--dir"),
        (["--endpoint", "http://example.com/api/live"], {}, "--endpoint"),
        (["--bogus"], {}, "--help"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_setting(flags, env, names):
    with pytest.raises(ConfigError) as err:
        config(*flags, **env)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_no_command_is_an_error():
    with pytest.raises(ConfigError, match="no command"):
        build(args(command=()), {})


def test_the_command_is_kept_verbatim():
    assert build(args("--dry-run", command=("python", "-c", "print(1)", "--name", "x")), {}).command == [
        "python", "-c", "print(1)", "--name", "x"]


# --- redaction --------------------------------------------------------------------------------------


@pytest.fixture
def logged():
    stream = io.StringIO()
    logger = logging.getLogger("livesend.test_config")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("livesend: %(message)s"))
    handler.addFilter(Redactor([TOKEN, "", None, "ab"]))
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_redactor_removes_the_token_from_messages_and_arguments(logged):
    logger, stream = logged
    logger.warning("token is %s", TOKEN)
    logger.warning(f"header Authorization: token {TOKEN}; again {TOKEN}")
    logger.warning("%s and %d", {"t": TOKEN}, 3)
    text = stream.getvalue()
    assert TOKEN not in text and text.count("***") == 4 and "and 3" in text


def test_redactor_removes_the_token_from_exception_text(logged):
    logger, stream = logged
    try:
        raise RuntimeError(f"server said: bad token {TOKEN}")
    except RuntimeError:
        logger.exception("failed")
    text = stream.getvalue()
    assert TOKEN not in text and "RuntimeError: server said: bad token ***" in text and "Traceback" in text


def test_short_secrets_are_not_redacted_everywhere(logged):
    logger, stream = logged
    logger.warning("about ab")  # a 2-character "secret" would blank out ordinary words
    assert "about ab" in stream.getvalue()


def test_redact():
    assert redact(f"a {TOKEN} b {TOKEN}", [TOKEN]) == "a *** b ***"
    assert redact("plain", ["", TOKEN]) == "plain"


@pytest.mark.parametrize(
    "flush, cancel, cancelled, expected",
    [(30, 3, False, 30), (30, 3, True, 3), (2, 3, True, 2), (0, 3, True, 0), (30, 0, True, 0), (30, 0, False, 30)],
)
def test_a_cancelled_run_flushes_for_the_shorter_of_the_two_timeouts(flush, cancel, cancelled, expected):
    from livesend.run import flush_seconds

    c = config("--flush-timeout", str(flush), "--cancel-flush-timeout", str(cancel))
    assert flush_seconds(c, cancelled) == expected
