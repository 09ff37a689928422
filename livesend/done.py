"""`livesend done`: send `done` for the experiments a run left open in Studio.

A run that is killed (a GitLab job cancelled on an executor that sends no SIGTERM, an OOM kill, a laptop
that lost power) never sends `done`, and Studio shows its experiments as running for good. The run keeps
a ledger of what it opened (livesend/ledger.py); this command, run afterwards in the same clone (the
GitLab template's `after_script` does it when the job was cancelled), closes what is still in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from livesend import ci, ledger, studio
from livesend.config import Config, ConfigError
from livesend.transport import Outcome, backoff, open_transport

log = logging.getLogger("livesend")


def deliver(transport, request: studio.Request, deadline: float) -> Outcome:
    """POST `request`, retrying what can be retried (with backoff, honouring Retry-After) until `deadline`."""
    failures = 0
    while True:
        outcome = transport.post(request, timeout=min(transport.timeout, max(0.5, deadline - time.monotonic())))
        if outcome.kind != "retry":
            return outcome
        failures += 1
        delay = max(backoff(failures), outcome.retry_after or 0.0)
        if time.monotonic() + delay >= deadline:
            return outcome
        log.debug("retrying `done` in %.1f s (%s)", delay, outcome.detail)
        time.sleep(delay)


def close_open(config: Config, env: dict) -> int:
    """0 when nothing is left open (or all of it was closed), 1 when something could not be closed."""
    cwd = os.getcwd()
    name = config.name or ci.stable_name(env)
    if not name:
        raise ConfigError("which run? set --name (or LIVESEND_NAME) to the experiment name `livesend run` printed; "
                          "only GitLab CI names a job's run alike in every step")
    git_dir = ci.git_dir(cwd, env)
    if not git_dir:
        log.info("not in a Git clone: no run kept a list of open experiments here; nothing to do")
        return 0
    path = ledger.ledger_path(git_dir, name)
    try:
        book = ledger.Ledger.load(path, name)
    except (OSError, ValueError) as exc:
        log.error("cannot read %s (%s); delete it and close the experiment in Studio by hand", path,
                  getattr(exc, "strerror", None) or exc)
        return 1
    pending = book.open
    if not pending:
        log.info("nothing left open in Studio by run %s", name)
        return 0
    names = ", ".join(i.name for i in pending)
    if not config.token and not config.dry_run:
        log.error("cannot mark %s done: no Studio token (set STUDIO_TOKEN)", names)
        return 1
    if config.dry_run:
        book = ledger.Ledger(None, name, pending)  # a dry run sends nothing, so it closes nothing either
    with contextlib.ExitStack() as stack:
        transport = open_transport(config, stack, say_fatal=False)  # said below, once per experiment
        deadline = time.monotonic() + config.flush_timeout
        failed = 0
        for ident in pending:
            outcome = deliver(transport, studio.done_request(ident), deadline)
            if outcome.ok:
                book.closed(ident.name)
                log.info("%s experiment %s done in Studio", "dry run: would mark" if config.dry_run else "marked",
                         ident.name)
                continue
            failed += 1
            if outcome.kind == "rejected":
                book.closed(ident.name)  # Studio answered: asking again would not change it
            log.error("could not mark experiment %s done (%s)%s", ident.name, outcome.detail,
                      f"; `livesend done --name {name}` tries again" if outcome.kind == "retry" else "")
    return 1 if failed else 0
