#!/usr/bin/env python3
"""Entrypoint of the livesend GitHub container action: a thin supervisor around `livesend run`.

The runner starts it as PID 1 of the action's container, as root, in /github/workspace, with the
inputs in the environment (see action.yml). What it adds to `livesend run`, which does the real work:

- `::add-mask::` for the tokens before anything else is printed;
- `git config --global --add safe.directory` for the workspace (owned by the runner's user, not root);
- `install`, then `livesend run -- bash -e -o pipefail -c RUN`, each in a process group of its own,
  their output (stdout and stderr on one pipe, so in order) inside `::stop-commands::<random>`, so
  a training log cannot issue workflow commands;
- livesend's warnings and errors (from `--report-json`) as annotations, after that block;
- PID 1 duties: the first SIGINT/SIGTERM goes to livesend, which passes it to the command's process
  group and reports the run as cancelled; SIGTERM after 1.5 s and SIGKILL after 2.5 s go to that
  group directly if it still runs; livesend then flushes (3 s at most after a cancel, also when the
  cancel comes while it flushes after a finished command) and sends `done`; it is
  killed 6 s after the first signal if it has not ended, so the step ends within 7 s (the runner
  signals the container 7.5 s after SIGINT and kills it 2.5 s later);
- what was created as root in the workspace is given back to the workspace's owner;
- the step outputs and the exit status (the command's; 3 with `strict`). livesend writes the job
  summary itself; this writes one only when livesend could not (bad input, failed `install`);
- the experiment's name and folder saved as step state, so that the post step (`entrypoint.py post`,
  action.yml runs.post-entrypoint), which the runner runs after the job even when it was cancelled,
  can send the `done` a killed livesend could not (`livesend done`; the runner does not always deliver
  the cancel signal: actions/runner#2128).

livesend runs as a child process, not in this process: then this supervisor can always close the
stop-commands block, write the outputs and give files back, whatever happens to livesend, and keep
the cancellation deadline (killing livesend as a last resort).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

CANCEL_FLUSH_TIMEOUT = "3"  # seconds of flush after a cancel: the step must end within 7.5 s of SIGINT
TERM_AFTER = 1.5  # seconds after the first signal: SIGTERM to the command if it still runs
KILL_AFTER = 2.5  # ... SIGKILL to the command's process group
GIVE_UP_AFTER = 6.0  # ... SIGKILL to livesend itself, so the step ends within 7 s
MAX_ANNOTATIONS = 10  # GitHub shows at most 10 warnings and 10 errors per step
INPUT_PREFIX = "LIVESEND_ACTION_"
STATE_NAME, STATE_WORKDIR = "livesend_name", "livesend_workdir"  # step state for the post step (STATE_*)


# --- workflow commands -------------------------------------------------------------------------------


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def say(line: str) -> None:
    """One line on stdout, flushed: the children write to the same pipe."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def annotate(level: str, message: str, title: str = "livesend") -> None:
    say(f"::{level} title={escape_property(title)}::{escape_data(message)}")


# --- inputs ------------------------------------------------------------------------------------------


def action_input(env: dict, name: str, default: str = "") -> str:
    """An input, from the variable action.yml maps it to (runs.env), else the runner's INPUT_<NAME>
    (upper case, spaces to '_', hyphens kept), else `default`."""
    mapped = INPUT_PREFIX + name.upper().replace("-", "_")
    if mapped in env:
        return env[mapped]
    return env.get("INPUT_" + name.replace(" ", "_").upper(), default)


def parse_bool(value: str, name: str) -> bool:
    text = value.strip().lower()
    if text in ("", "false", "0", "no", "off"):
        return False
    if text in ("true", "1", "yes", "on"):
        return True
    raise ValueError(f"the `{name}` input must be true or false, not {value!r}")


def studio_token(env: dict) -> str:
    """The `studio-token` input, else STUDIO_TOKEN or DVC_STUDIO_TOKEN from the step's `env:`."""
    return (action_input(env, "studio-token").strip() or env.get("STUDIO_TOKEN", "").strip()
            or env.get("DVC_STUDIO_TOKEN", "").strip())


def secret_values(env: dict) -> list:
    """What must be masked: the Studio token and the GitHub token (for `comment`)."""
    return [v for v in (studio_token(env), action_input(env, "github-token").strip()) if v]


class Inputs:
    def __init__(self, env: dict) -> None:
        self.run = action_input(env, "run").strip()
        self.install = action_input(env, "install").strip()
        self.token = studio_token(env)
        self.endpoint = action_input(env, "studio-endpoint").strip()
        self.dirs = [d.strip() for d in action_input(env, "dvclive-dir", "dvclive").splitlines() if d.strip()]
        self.working_directory = action_input(env, "working-directory", ".").strip() or "."
        self.name = action_input(env, "name").strip()
        self.baseline_sha = action_input(env, "baseline-sha").strip()
        self.repo_url = action_input(env, "repo-url").strip()
        self.message = action_input(env, "message").strip()
        self.interval = action_input(env, "interval").strip()
        self.flush_timeout = action_input(env, "flush-timeout").strip()
        self.strict = parse_bool(action_input(env, "strict", "false"), "strict")
        self.dry_run = parse_bool(action_input(env, "dry-run", "false"), "dry-run")
        self.comment = parse_bool(action_input(env, "comment", "false"), "comment")
        self.github_token = action_input(env, "github-token").strip()

    def livesend_args(self, report_json: str, debug: bool) -> list:
        # a finished run flushes for `flush-timeout` (livesend's 30 s by default); a cancelled one for 3 s at most
        args = ["run", "--report-json", report_json, "--cancel-flush-timeout", CANCEL_FLUSH_TIMEOUT]
        for flag, value in (("--flush-timeout", self.flush_timeout), ("--endpoint", self.endpoint), ("--name", self.name),
                            ("--baseline-sha", self.baseline_sha),
                            ("--repo-url", self.repo_url), ("--message", self.message), ("--interval", self.interval)):
            if value:
                args += [flag, value]
        for d in self.dirs:
            args += ["--dir", d]
        if self.strict:
            args.append("--strict")
        if self.dry_run:
            args.append("--dry-run")
        if self.comment:
            args.append("--comment")
        if debug:
            args.append("--verbose")
        return args + ["--", "bash", "-e", "-o", "pipefail", "-c", self.run]


SECRET_VARS = ("STUDIO_TOKEN", "DVC_STUDIO_TOKEN", "LIVESEND_GITHUB_TOKEN", "LIVESEND_GITLAB_TOKEN")


def child_environment(env: dict, secret: list) -> dict:
    """The environment of `install` and of livesend: no input variables, nothing holding a token of
    `secret` (the Studio token; the GitHub token only when livesend uses it for `comment`, as
    livesend itself does: a GITHUB_TOKEN the workflow gives the step on purpose stays)."""
    out = {}
    for key, value in env.items():
        if key.startswith(("INPUT_", INPUT_PREFIX)) or key in SECRET_VARS:
            continue
        if any(s and s in value for s in secret):
            continue
        out[key] = value
    return out


# --- git ---------------------------------------------------------------------------------------------


def git_top(path: str, stop: str) -> Optional[str]:
    """The nearest directory at or above `path` (not above `stop`) holding `.git`."""
    here = os.path.realpath(path)
    stop = os.path.realpath(stop)
    while True:
        if os.path.exists(os.path.join(here, ".git")):
            return here
        if here == stop or os.path.dirname(here) == here:
            return None
        here = os.path.dirname(here)


def trust_directories(workspace: str, workdir: str, env: dict) -> None:
    """`git config --global --add safe.directory` for the workspace and the checkout holding `workdir`,
    each if not yet trusted (HOME is a volume shared by the job's container steps, so this is done at run
    time and only once)."""
    paths = [os.path.realpath(p) for p in (workspace, git_top(workdir, workspace) or workspace)]
    try:
        have = subprocess.run(["git", "config", "--global", "--get-all", "safe.directory"], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20).stdout.split("\n")
        for path in dict.fromkeys(paths):
            if path not in have:
                subprocess.run(["git", "config", "--global", "--add", "safe.directory", path], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        annotate("warning", f"could not mark the workspace as a safe Git directory ({exc}); "
                            "Git commands in the container may fail with 'dubious ownership'")


# --- file ownership ----------------------------------------------------------------------------------


def give_back(root: str) -> int:
    """Files and directories under `root` that this container created (owned by our uid) are given
    to `root`'s owner, so that later steps on the runner (another uid) can change and commit them."""
    try:
        owner = os.stat(root)
    except OSError:
        return 0
    me = os.geteuid()
    if owner.st_uid == me:
        return 0
    count = 0
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
                if st.st_uid == me:
                    os.lchown(path, owner.st_uid, owner.st_gid)
                    count += 1
            except OSError:
                pass
    return count


# --- children and signals ----------------------------------------------------------------------------


def children_groups(pid: int) -> list:
    """Process groups led by direct children of `pid` (the command livesend started leads its own)."""
    groups = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return groups
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
        except (OSError, ValueError):
            continue
        if int(fields[1]) == pid and int(fields[2]) == int(entry):
            groups.append(int(entry))
    return groups


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Supervisor:
    """Forwards SIGINT/SIGTERM to the running command's process group, escalates, keeps the deadline."""

    def __init__(self) -> None:
        self.first_signal: Optional[float] = None
        self.received: list = []
        self.pending: list = []
        self.escalated: set = set()
        self.killed_livesend = False
        self.via: Optional[int] = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.first_signal is None:
            self.first_signal = time.monotonic()
        self.received.append(signum)
        self.pending.append(signum)

    @property
    def cancelled(self) -> bool:
        return self.first_signal is not None

    def run(self, argv: list, cwd: str, env: dict, command_is_child: bool) -> int:
        """Run `argv` in a process group of its own, stdout and stderr both on our stdout.
        `command_is_child`: the command is `argv`'s child (livesend), not `argv` itself (install)."""
        sys.stdout.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                process_group=0)
        command = None if command_is_child else proc.pid
        self.via = proc.pid if command_is_child else None
        while True:
            try:
                return proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            if command is None and command_is_child:
                found = children_groups(proc.pid)
                command = found[0] if found else None
            self._tick(proc, command)

    def _tick(self, proc: subprocess.Popen, command: Optional[int]) -> None:
        if self.first_signal is None:
            return
        alive = command is not None and group_alive(command)
        # The signal goes to livesend, which passes it on to the command and reports the run as cancelled,
        # or, when the command has already ended, cuts its flush to 3 s; not before the command started
        # (livesend's handlers are not in place yet). `install` has no livesend: its group gets the signal
        # while it runs.
        while self.pending and command is not None and (self.via is not None or alive):
            signum = self.pending.pop(0)
            if self.via is not None:
                try:
                    os.kill(self.via, signum)
                except OSError:
                    pass
            else:
                self._kill(command, signum)
        elapsed = time.monotonic() - self.first_signal
        if alive and elapsed >= TERM_AFTER and "term" not in self.escalated:
            self.escalated.add("term")
            self._kill(command, signal.SIGTERM)
        if alive and elapsed >= KILL_AFTER and "kill" not in self.escalated:
            self.escalated.add("kill")
            self._kill(command, signal.SIGKILL)
        if elapsed >= GIVE_UP_AFTER and not self.killed_livesend and proc.poll() is None:
            self.killed_livesend = True
            self._kill(proc.pid, signal.SIGKILL)

    @staticmethod
    def _kill(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except OSError:
            pass


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


# --- report, summary, outputs ------------------------------------------------------------------------


def read_report(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fallback_summary(status: int, cancelled: bool, what: str) -> str:
    """The job summary when livesend wrote none (it did not run, or did not finish)."""
    outcome = "cancelled" if cancelled else ("failed" if status else "succeeded")
    return f"### livesend: the step {outcome} (exit status {status})\n\n{what}\n"


def append(path: Optional[str], text: str) -> None:
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        annotate("warning", f"could not write {path}: {exc.strerror}")


def outputs(status: int, report: Optional[dict]) -> str:
    report = report or {}
    values = {
        "exit-code": str(status),
        "experiment-name": report.get("name") or "",
        "baseline-sha": report.get("baseline_sha") or "",
        "events-sent": str(report.get("events_sent", 0)) if report else "",
    }
    return "".join(f"{key}={value}\n" for key, value in values.items() if "\n" not in value)


def annotate_problems(report: Optional[dict]) -> None:
    seen = set()
    counts = {"warning": 0, "error": 0}
    problems = list((report or {}).get("problems") or [])
    for exp in (report or {}).get("experiments") or []:
        if exp.get("started") and not exp.get("done") and not any("`done`" in str(p.get("message")) for p in problems):
            problems.append({"level": "error", "message": f"Studio was not told that experiment {exp.get('name')} "
                                                          "ended (`done` was not delivered): it may show it as running"})
    for problem in problems:
        level = "error" if problem.get("level") == "error" else "warning"
        message = str(problem.get("message", "")).strip()
        if not message or (level, message) in seen or counts[level] >= MAX_ANNOTATIONS:
            continue
        seen.add((level, message))
        counts[level] += 1
        annotate(level, message)


# --- main --------------------------------------------------------------------------------------------


def validate(args: list, env: dict) -> Optional[str]:
    """livesend's own checks of its options (the same code `livesend run` runs), before anything runs."""
    from livesend.cli import make_parser
    from livesend.config import ConfigError, build

    try:
        build(make_parser().parse_args(args), env)
    except ConfigError as exc:
        return str(exc)
    except SystemExit:
        return "invalid livesend options"
    return None


def mask(env: dict) -> None:
    """`::add-mask::` for every secret value: before anything else is printed."""
    for value in secret_values(env):
        for line in value.splitlines():
            say(f"::add-mask::{escape_data(line)}")


def main() -> int:
    env = dict(os.environ)
    supervisor = Supervisor()
    mask(env)
    workspace = env.get("GITHUB_WORKSPACE") or os.getcwd()
    try:
        inputs = Inputs(env)
        if not inputs.run:
            raise ValueError("the `run` input is required: the training command, e.g. `python train.py`")
        workdir = os.path.normpath(os.path.join(workspace, inputs.working_directory))
        if not os.path.isdir(workdir):
            raise ValueError(f"the working-directory {inputs.working_directory!r} does not exist in the workspace")
    except ValueError as exc:
        annotate("error", str(exc))
        return finish(2, None, supervisor, workspace, env, f"Nothing ran: {exc}.")
    if not inputs.name:  # named here, as livesend would name it, so that the post step knows the name
        from livesend.ci import generate_name

        inputs.name = generate_name(env)

    base_env = child_environment(env, [inputs.token] + ([inputs.github_token] if inputs.comment else []))
    trust_directories(workspace, workdir, base_env)
    report_dir = tempfile.mkdtemp(prefix="livesend-action-")
    report_path = os.path.join(report_dir, "report.json")
    args = inputs.livesend_args(report_path, env.get("RUNNER_DEBUG") == "1")
    livesend_env = dict(base_env, LIVESEND_ANNOTATIONS="false")  # inert inside the block: annotated after it
    if inputs.token:
        livesend_env["STUDIO_TOKEN"] = inputs.token
    if inputs.comment and inputs.github_token:
        livesend_env["LIVESEND_GITHUB_TOKEN"] = inputs.github_token
    problem = validate(args, livesend_env)
    if problem:
        annotate("error", problem)
        return finish(2, None, supervisor, workspace, env, f"Nothing ran: {problem}.")

    if inputs.install:
        say(f"::group::install: {escape_data(inputs.install.splitlines()[0])}")
        end = stop_commands()
        status = exit_status(supervisor.run(["bash", "-e", "-o", "pipefail", "-c", inputs.install], workdir,
                                            base_env, command_is_child=False))
        say(f"::{end}::")
        say("::endgroup::")
        if status == 0 and supervisor.cancelled:
            status = 128 + supervisor.received[0]
        if status != 0:
            what = "was cancelled" if supervisor.cancelled else f"failed with exit status {status}"
            annotate("error", f"the install command {what}; the training did not run")
            return finish(status, None, supervisor, workspace, env,
                          f"The `install` command {what}, so the training did not run.")

    if not inputs.dry_run:
        append(env.get("GITHUB_STATE"), f"{STATE_NAME}={inputs.name}\n{STATE_WORKDIR}={workdir}\n")
    end = stop_commands()
    status = exit_status(supervisor.run([sys.executable, "-m", "livesend", *args], workdir, livesend_env,
                                        command_is_child=True))
    say(f"::{end}::")
    report = read_report(report_path)
    shutil.rmtree(report_dir, ignore_errors=True)
    annotate_problems(report)
    what = ""
    if supervisor.killed_livesend:
        what = ("livesend did not finish within the cancellation grace period and was stopped: Studio may "
                "show the experiment as still running.")
        annotate("error", what)
    elif report is None:
        what = f"livesend ended without a report (exit status {status}): see the step's log."
        annotate("error", what)
    return finish(status, report, supervisor, workspace, env, what)


def post() -> int:
    """The post step: `livesend done` when the run left an experiment open in Studio (livesend was
    killed: a cancel signal the runner never delivered, the OOM killer; or Studio did not take `done`
    in time). Silent when there is nothing to do; never fails the job."""
    env = dict(os.environ)
    mask(env)
    name, workdir = env.get(f"STATE_{STATE_NAME}", ""), env.get(f"STATE_{STATE_WORKDIR}", "")
    if not name or not os.path.isdir(workdir):
        return 0  # the main step never got to run livesend
    from livesend import ci, ledger

    try:
        inputs = Inputs(env)
    except ValueError:  # the main step said so already
        return 0
    base_env = child_environment(env, [inputs.token])
    workspace = env.get("GITHUB_WORKSPACE") or os.getcwd()
    trust_directories(workspace, workdir, base_env)
    git_dir = ci.git_dir(workdir, base_env)
    if not git_dir or not os.path.exists(ledger.ledger_path(git_dir, name)):
        return 0
    args = ["done", "--name", name]
    for flag, value in (("--endpoint", inputs.endpoint), ("--flush-timeout", inputs.flush_timeout)):
        if value:
            args += [flag, value]
    livesend_env = dict(base_env, STUDIO_TOKEN=inputs.token) if inputs.token else base_env
    try:
        subprocess.run([sys.executable, "-m", "livesend", *args], cwd=workdir, env=livesend_env,
                       stdin=subprocess.DEVNULL, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        annotate("warning", f"could not run `livesend done` for {name} ({exc})")
    if env.get("GITHUB_ACTIONS") == "true":
        give_back(workspace)
    return 0


def stop_commands() -> str:
    token = secrets.token_hex(16)
    say(f"::stop-commands::{token}")
    return token


def finish(status: int, report: Optional[dict], supervisor: Supervisor, workspace: str, env: dict, what: str) -> int:
    """Outputs, a summary if livesend wrote none, the workspace given back; the step's exit status."""
    if report is None:
        append(env.get("GITHUB_STEP_SUMMARY"), fallback_summary(status, supervisor.cancelled, what))
    append(env.get("GITHUB_OUTPUT"), outputs(status, report))
    if env.get("GITHUB_ACTIONS") == "true":
        give_back(workspace)
        home = env.get("HOME")
        if home and os.path.isdir(home) and os.path.realpath(home) != "/":
            give_back(home)
    return status


if __name__ == "__main__":
    sys.exit(post() if sys.argv[1:] == ["post"] else main())
