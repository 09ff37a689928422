"""The experiments a run has opened in Studio and not yet closed with `done`.

Kept in a small JSON file in the Git directory, `<git dir>/livesend/open/<run name>.json`, so that
`livesend done` can close them from another process: a GitLab job's `after_script` after the job was
cancelled and livesend killed with it, or a person whose laptop run was killed. The Git directory is
never committed, never in CI artifacts, and shared by every step of a CI job that works in the clone.

The file holds what Studio identifies an experiment by (repository URL without credentials, baseline
commit, name), never a token. An experiment is entered before its `start` is sent (a kill right after
Studio took it must not leave an experiment nobody can close) and leaves when Studio has taken its
`done`; the file goes with the last one. Writing it is best effort: a read-only Git directory costs this
record, never the run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Optional

from livesend.studio import Identity

log = logging.getLogger("livesend")

VERSION = 1


def ledger_path(git_dir: str, run_name: str) -> str:
    return os.path.join(git_dir, "livesend", "open", f"{run_name}.json")


def how_to_close(run_name: str) -> str:
    """What to tell the user about an experiment this run's ledger still lists."""
    return f"`livesend done --name {run_name}` marks it done later"


def encode(run_name: str, open_experiments: list) -> str:
    return json.dumps({
        "version": VERSION,
        "run": run_name,
        "open": [{"name": i.name, "repo_url": i.repo_url, "baseline_sha": i.baseline_sha} for i in open_experiments],
    }, indent=1) + "\n"


def decode(text: str) -> list:
    """The open experiments of a ledger file; ValueError when it is not one."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("open"), list):
        raise ValueError("not a livesend ledger (version 1)")
    found = []
    for item in doc["open"]:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("name", "repo_url", "baseline_sha")):
            raise ValueError("an entry lacks name, repo_url or baseline_sha")
        found.append(Identity(item["repo_url"], item["baseline_sha"], item["name"]))
    return found


def for_run(git_dir: Optional[str], run_name: str) -> "Ledger":
    """The ledger a run writes: none outside a Git clone; what an earlier run of the same name left open is kept."""
    if not git_dir:
        return Ledger(None, run_name)
    path = ledger_path(git_dir, run_name)
    try:
        return Ledger.load(path, run_name)
    except (OSError, ValueError):  # unreadable or not ours: start afresh
        return Ledger(path, run_name)


class Ledger:
    """One run's open experiments, written through to its file (thread-safe: one session per directory)."""

    def __init__(self, path: Optional[str], run_name: str, open_experiments: Optional[list] = None) -> None:
        self.path = path
        self.run_name = run_name
        self._open: dict = {i.name: i for i in open_experiments or []}
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def load(cls, path: str, run_name: str) -> "Ledger":
        """The ledger at `path` (empty when there is none); ValueError for a file that is not one."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return cls(path, run_name)
        return cls(path, run_name, decode(text))

    @property
    def open(self) -> list:
        with self._lock:
            return list(self._open.values())

    def opened(self, ident: Identity) -> None:
        with self._lock:
            self._open[ident.name] = ident
            self._write()

    def closed(self, name: str) -> None:
        with self._lock:
            if self._open.pop(name, None) is not None:
                self._write()

    def _write(self) -> None:
        if self.path is None or self._failed:
            return
        try:
            if not self._open:
                try:
                    os.unlink(self.path)
                    folder = os.path.dirname(self.path)
                    os.rmdir(folder)  # livesend/open and livesend/ go too when they are empty
                    os.rmdir(os.path.dirname(folder))
                except OSError:
                    pass
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(encode(self.run_name, list(self._open.values())))
            os.replace(tmp, self.path)
        except OSError as exc:
            self._failed = True
            log.debug("cannot keep the list of open experiments in %s (%s); `livesend done` will not find them",
                      self.path, exc.strerror or exc)
