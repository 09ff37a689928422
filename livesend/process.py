"""The wrapped command: its environment, its signals, its exit status.

The command inherits stdin, stdout and stderr, so its output reaches the log unchanged. Signals:
- in CI (no terminal), the command gets a process group of its own and SIGINT, SIGTERM and SIGHUP
  sent to livesend are forwarded to that whole group (children of the command included);
- at a terminal, the command stays in the foreground group so that Ctrl-C and reading stdin work as
  usual; the terminal already delivers SIGINT/SIGHUP to it, so only SIGTERM is forwarded.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Mapping, Optional

from livesend.config import SECRET_VARS

log = logging.getLogger("livesend")

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class CommandError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def child_env(env: Mapping[str, str], token: Optional[str], exp_name: str) -> dict:
    """livesend's environment minus every variable holding the token, plus DVC_STUDIO_OFFLINE (so
    DVCLive inside never posts twice) and DVC_EXP_NAME (so a saved experiment carries our name)."""
    out = {}
    for key, value in env.items():
        if key in SECRET_VARS or (token and token in value):
            continue
        out[key] = value
    out["DVC_STUDIO_OFFLINE"] = "true"
    out["DVC_EXP_NAME"] = exp_name
    return out


def install_handlers(handler) -> dict:
    """`handler` for every FORWARDED signal; returns the handlers it replaced, for restore_handlers."""
    previous = {}
    for signum in FORWARDED:
        try:
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):  # not the main thread, or not allowed here
            pass
    return previous


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        try:
            signal.signal(signum, handler)
        except (ValueError, OSError, TypeError):
            pass


def exit_status(returncode: int) -> int:
    """The shell's convention: 128+N for a command killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _at_terminal() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


class Command:
    def __init__(self, argv: list, env: Mapping[str, str]) -> None:
        self.argv = argv
        self.env = dict(env)
        self.proc: Optional[subprocess.Popen] = None
        self.own_group = not _at_terminal()
        self.signals: list = []
        self._previous: dict = {}

    def run(self) -> int:
        """Start the command, forward signals while it runs, return its exit status."""
        self._install()
        try:
            try:
                self.proc = subprocess.Popen(self.argv, env=self.env, **self._group_kwargs())
            except FileNotFoundError:
                raise CommandError(127, f"command not found: {self.argv[0]}") from None
            except PermissionError:
                raise CommandError(126, f"permission denied: cannot execute {self.argv[0]}") from None
            except OSError as exc:
                raise CommandError(126, f"cannot execute {self.argv[0]}: {exc.strerror or exc}") from None
            for signum in self.signals:
                self._forward(signum)
            return exit_status(self.proc.wait())
        finally:
            self._restore()

    def _group_kwargs(self) -> dict:
        if not self.own_group:
            return {}
        if sys.version_info >= (3, 11):
            return {"process_group": 0}
        return {"preexec_fn": os.setpgrp}  # pragma: no cover - Python < 3.11

    def _install(self) -> None:
        self._previous = install_handlers(self._handle)

    def _restore(self) -> None:
        restore_handlers(self._previous)

    def _handle(self, signum, _frame) -> None:
        self.signals.append(signum)
        if self.proc is not None:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        if not self.own_group and signum != signal.SIGTERM:
            return  # the terminal sent it to the whole foreground group already
        try:
            if self.own_group:
                os.killpg(self.proc.pid, signum)
            else:
                self.proc.send_signal(signum)
        except ProcessLookupError:
            pass
        except OSError as exc:  # pragma: no cover
            print(f"livesend: could not forward signal {signum}: {exc}", file=sys.stderr)
