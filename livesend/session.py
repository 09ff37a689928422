"""One DVCLive directory, watched for the length of the command: watch -> read -> send -> done.

A Session is a thread. It wakes when the directory changes (watchfiles, with a slow safety poll),
sends at most one data event per interval, retries with backoff while the command runs, and once the
command has ended delivers what is left until the flush deadline, then sends `done`.

Counters advance only on HTTP 200: what Studio did not acknowledge is read again from disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from livesend import ci, reader, studio
from livesend.ledger import Ledger, how_to_close
from livesend.reader import Document, Stamp, TsvTail, Warnings
from livesend.transport import Outcome, backoff

log = logging.getLogger("livesend")

SAFETY_POLL = 2.0  # seconds between rescans when no file event arrives
ROUND_TSV_BUDGET = 500_000  # bytes of TSV per request round (bounds memory during a backlog)
ROUND_IMAGE_BUDGET = 24_000_000  # bytes of base64 images per request round
DONE_RESERVE = 0.25  # share of the flush time kept for `done` (at most 3 s)


@dataclass
class Context:
    """What every experiment of the run shares."""

    cwd: str
    repo_url: str
    baseline_sha: str
    dvc_root: str
    git_root: Optional[str]
    tree_root: str
    env: dict
    message: Optional[str] = None
    interval: float = 1.0
    limits: studio.Limits = studio.Limits()
    ledger: Ledger = field(default_factory=lambda: Ledger(None, ""))  # the experiments open in Studio


@dataclass
class Stats:
    name: str
    started: bool = False
    done: bool = False
    experiment_rev: Optional[str] = None
    data_events: int = 0
    data_failed: int = 0
    requests: int = 0
    retries: int = 0
    rows: int = 0
    images: int = 0
    skipped_images: list = field(default_factory=list)
    undelivered: str = ""
    left_open: bool = False  # not marked done but still in the ledger: `livesend done` can close it
    last_metrics: Optional[dict] = None
    last_params: Optional[dict] = None
    step: int = 0


class Experiment:
    """One Studio experiment: a name and what of the directory Studio has acknowledged."""

    def __init__(self, name: str, ident: studio.Identity) -> None:
        self.ident = ident
        self.stats = Stats(name)
        self.tsvs: dict[str, TsvTail] = {}
        self.images: dict[str, Stamp] = {}  # acknowledged (or skipped) image versions
        self.seen_images: dict[str, Stamp] = {}  # the version seen on the previous scan
        self.metrics: Any = None  # acknowledged metrics.json value
        self.params: Any = None
        self.sent_any = False
        self.last_step = 0


class Watcher:
    """Sets `wake` when something under `path` changes, then stops watching until `arm()`: a training
    writes thousands of events a second, and reading them while the session waits out its interval
    was most of livesend's CPU. Polls for the path while it does not exist."""

    def __init__(self, path: str, wake: threading.Event, stop: threading.Event) -> None:
        self.path, self.wake, self.stop = path, wake, stop
        self.armed = threading.Event()
        self.armed.set()
        self.thread = threading.Thread(target=self._run, name=f"livesend-watch-{os.path.basename(path)}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def arm(self) -> None:
        """Watch again (the session calls this before it reads, so a change during the read wakes it)."""
        self.armed.set()

    def _run(self) -> None:
        try:
            import watchfiles
        except ImportError:  # pragma: no cover - a dependency; polling still works without it
            return
        while not self.stop.is_set():
            if not os.path.isdir(self.path):
                if self.stop.wait(0.2):
                    return
                if os.path.isdir(self.path):
                    self.wake.set()
                continue
            self.armed.wait()
            if self.stop.is_set():
                return
            try:
                for _changes in watchfiles.watch(
                    self.path, watch_filter=None, debounce=50, step=50, stop_event=self.stop,
                    rust_timeout=1000, yield_on_timeout=True, raise_interrupt=False, ignore_permission_denied=True,
                ):
                    if _changes:
                        self.armed.clear()  # before waking the session, whose arm() must not be lost
                        self.wake.set()
                        break
                    if not os.path.isdir(self.path):
                        break
            except Exception as exc:  # noqa: BLE001 - e.g. inotify limits: fall back to the safety poll
                log.debug("file watching of %s stopped (%s); polling instead", self.path, exc)
                self.stop.wait(SAFETY_POLL)


class Session(threading.Thread):
    def __init__(self, live_dir: str, name: str, ctx: Context, transport, clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"livesend-{os.path.basename(live_dir)}", daemon=True)
        self.live_dir = os.path.join(ctx.cwd, live_dir)
        self.ctx, self.transport, self.clock = ctx, transport, clock
        self.base_name = name
        self.live_key = os.path.relpath(os.path.realpath(self.live_dir), ctx.dvc_root).replace(os.sep, "/")
        if self.live_key.startswith(".."):  # the directory is outside the DVC root: key it from cwd
            self.live_key = live_dir.replace(os.sep, "/").strip("/")
        self.warnings = Warnings()
        self.experiments: list[Experiment] = []
        self.exp = self._new_experiment()
        self.metrics_doc = Document(os.path.join(self.live_dir, "metrics.json"), self._key("metrics.json"),
                                    reader.parse_json, self.warnings, ctx.tree_root)
        self.params_doc = Document(os.path.join(self.live_dir, "params.yaml"), self._key("params.yaml"),
                                   reader.parse_yaml, self.warnings, ctx.tree_root)
        self.wake = threading.Event()
        self.ended = threading.Event()
        self.stop_watch = threading.Event()
        self.deadline: Optional[float] = None  # the flush's end, for `done` (set when the command has ended)
        self.data_deadline: Optional[float] = None  # ... and for the data before it
        self.hurry = threading.Event()  # the flush was cut short: stop waiting
        self.failures = 0
        self.not_before = 0.0  # monotonic time before which Studio asked not to be called (Retry-After)
        self.crashed = False
        self.watcher = Watcher(self.live_dir, self.wake, self.stop_watch)

    # --- public -----------------------------------------------------------------------------------

    def begin(self) -> None:
        self.watcher.start()
        self.start()

    def finish(self, deadline: float) -> None:
        """The command has ended: deliver what is left until `deadline`, then send `done`."""
        self._set_deadline(deadline)
        self.ended.set()
        self.wake.set()

    def cut(self, deadline: float) -> None:
        """A cancel during the flush: be done by `deadline` instead, if that is sooner."""
        if self.deadline is None or deadline < self.deadline:
            self._set_deadline(deadline)
            self.hurry.set()

    def _set_deadline(self, deadline: float) -> None:
        self.data_deadline = deadline - min(3.0, max(0.0, deadline - self.clock()) * DONE_RESERVE)  # time for `done`
        self.deadline = deadline

    @property
    def stats(self) -> list:
        return [e.stats for e in self.experiments]

    # --- loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
            self._final()
        except Exception:  # noqa: BLE001 - never let a livesend bug touch the command
            self.crashed = True
            log.error("internal error while sending %s; live metrics for it stop here (the command is not affected)",
                      self.live_key, exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            self.stop_watch.set()
            self.watcher.arm()  # lets the watcher see the stop

    def _loop(self) -> None:
        last = -1e9
        while not self.ended.is_set():
            self.wake.wait(SAFETY_POLL)
            self.wake.clear()
            if self.ended.is_set() or self.transport.stopped:
                return
            gap = self.ctx.interval - (self.clock() - last)
            if gap > 0 and self.ended.wait(gap):
                return
            last = self.clock()
            self.watcher.arm()
            outcome = self.sync(final=False)
            if outcome is not None and outcome.kind == "retry":
                if self.ended.wait(self._retry_delay(outcome)):
                    return
                self.wake.set()

    def _final(self) -> None:
        """After the command: deliver until caught up or out of time, keep time for `done`."""
        assert self.deadline is not None and self.data_deadline is not None
        self.failures = 0  # a new phase: the backoff of a long outage must not eat the flush time
        if self.not_before > self.clock():  # Studio asked (Retry-After) to wait
            self._pause(max(0.0, min(self.not_before, self.data_deadline) - self.clock()))
        while not self.transport.stopped:
            outcome = self.sync(final=True)
            if outcome is None or outcome.kind != "retry":
                break
            delay = self._final_delay(outcome, self.data_deadline)
            if delay is None:
                break
            self._pause(delay)
        self._report_undelivered()
        self._close(self.deadline)

    def _pause(self, seconds: float) -> None:
        """Wait between tries of the flush; a cut wakes it (once) to look at the new deadline."""
        if self.hurry.wait(seconds):
            self.hurry.clear()

    def _final_delay(self, outcome: Outcome, deadline: float) -> Optional[float]:
        """Backoff within the flush time: never past the deadline, so there is always a last try;
        None when no try fits (or Studio asked to wait longer than is left)."""
        remaining = deadline - self.clock()
        if remaining <= 0.1 or (outcome.retry_after is not None and outcome.retry_after >= remaining):
            return None
        return min(self._retry_delay(outcome), remaining / 2)

    def _retry_delay(self, outcome: Outcome) -> float:
        self.failures += 1
        delay = backoff(self.failures)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
            self.not_before = self.clock() + outcome.retry_after
        log.debug("retrying %s in %.1f s (%s)", self.exp.stats.name, delay, outcome.detail)
        return delay

    # --- one synchronisation ------------------------------------------------------------------------

    def sync(self, final: bool) -> Optional[Outcome]:
        """Read what changed and send it; None when there was nothing to send or all of it went.
        `final`: in the flush, by its data deadline (read at each use: a cancel may cut it short)."""

        def until() -> Optional[float]:
            return self.data_deadline if final else None

        listing = reader.scan(self.live_dir, self.live_key, self.ctx.tree_root, self.warnings)
        if self._fresh_run(listing):
            self._close(until() or self.clock() + max(5.0, self.ctx.interval * 5))
            self.exp = self._new_experiment()
            self.metrics_doc.value = self.params_doc.value = None
            self.metrics_doc.stamp = self.params_doc.stamp = None
        self.metrics_doc.poll()
        self.params_doc.poll()
        present = listing.has_plots or self.metrics_doc.value is not None or self.params_doc.value is not None
        if not present:
            return None
        exp = self.exp
        if not exp.stats.started:
            self.ctx.ledger.opened(exp.ident)  # before `start`: a kill right after it must leave a trace
            outcome = self._send(self._start_request(), until())
            if outcome.kind in ("retry", "fatal"):
                return outcome
            exp.stats.started = True  # a refused `start` is dropped like any refused request
        first_round = True
        while True:
            requests, more = self._build(listing, final, first_round)
            if not requests:
                return None
            for request in requests:
                outcome = self._send(request, until())
                if outcome.kind in ("ok", "rejected"):
                    self._apply(request.acks, request)
                if not outcome.ok:
                    if request is requests[0] or outcome.kind != "rejected":
                        exp.stats.data_failed += 1
                    if outcome.kind != "rejected":
                        return outcome
            exp.stats.data_events += 1 if first_round else 0
            self.failures = 0
            first_round = False
            if not more or (final and self.clock() >= until()):
                return None
            listing = reader.scan(self.live_dir, self.live_key, self.ctx.tree_root, self.warnings)

    def _send(self, request: studio.Request, deadline: Optional[float]) -> Outcome:
        timeout = self.transport.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - self.clock())
            if timeout <= 0:
                return Outcome("retry", None, "out of time")
        outcome = self.transport.post(request, timeout=timeout)
        self.exp.stats.requests += 1
        if outcome.kind == "retry":
            self.exp.stats.retries += 1
            if self.failures == 0:
                log.warning("Studio did not take a %s request (%s); retrying", request.event, outcome.detail)
        elif outcome.kind == "rejected":
            log.error("%s; dropping this %s request", outcome.detail, request.event)
        return outcome

    def _build(self, listing: reader.Listing, final: bool, first_round: bool):
        """The requests of one round: the metrics POST (first round), then the plots POSTs."""
        exp = self.exp
        entries: list = []
        max_step = None
        more = False
        active = [(k, v) for k, v in listing.tsvs.items()]
        budget = max(32_000, ROUND_TSV_BUDGET // max(1, len(active)))
        for key, (path, st) in active:
            tail = exp.tsvs.get(key)
            if tail is None:
                tail = exp.tsvs[key] = TsvTail(path, key, self.warnings)
            elif tail.is_replaced(st):
                self.warnings.once(("recreated", key), "%s was re-created; sending it again from its first row", key)
                tail.restart()
            if st.st_size <= tail.offset:
                continue
            chunk = tail.read(budget)
            if chunk is None or not chunk.rows:
                continue
            more = more or chunk.more
            if chunk.max_step is not None and (max_step is None or chunk.max_step > max_step):
                max_step = chunk.max_step
            rows = [studio.cast_row(columns, fields) for columns, fields in chunk.rows]
            entries.extend(studio.row_entries(key, rows, chunk.ends, self.ctx.limits.max_entry))
        image_bytes = 0
        for key, (path, st) in listing.images.items():
            stamp = Stamp.of(st)
            if exp.images.get(key) == stamp:
                continue
            b64_size = 4 * ((st.st_size + 2) // 3)
            if b64_size > self.ctx.limits.max_entry:
                log.warning("%s is %.1f MB, over Studio's 10 MB limit for one plot; not sending it", key, st.st_size / 1e6)
                exp.images[key] = stamp
                exp.stats.skipped_images.append(key)
                continue
            if image_bytes + b64_size > ROUND_IMAGE_BUDGET and image_bytes:
                more = True
                continue
            stable = exp.seen_images.get(key) == stamp and time.time() - st.st_mtime > 1.0
            exp.seen_images[key] = stamp
            try:
                b64 = reader.read_image(path, stamp, force=final or stable)
            except OSError as exc:
                self.warnings.once(("read", path), "cannot read %s (%s); skipping it", key, exc.strerror or exc)
                continue
            if b64 is None:
                continue
            image_bytes += len(b64)
            entries.append(studio.image_entry(key, b64, ("image", key, stamp)))
        metrics = self.metrics_doc.value
        params = self.params_doc.value
        docs_new = metrics != exp.metrics or params != exp.params
        if not entries and not docs_new and exp.sent_any:
            return [], False
        if not entries and not docs_new and not first_round:
            return [], False
        step = self._step(metrics, max_step)
        requests = []
        if first_round:
            requests.append(
                studio.metrics_request(
                    exp.ident, step,
                    {self.params_doc.key: params or {}},
                    {self.metrics_doc.key: metrics} if metrics is not None else {},
                    acks=[("docs", metrics, params, step)],
                )
            )
        requests.extend(studio.plots_requests(exp.ident, step, entries, self.ctx.limits))
        return requests, more

    def _step(self, metrics: Any, max_step: Optional[int]) -> int:
        if isinstance(metrics, dict) and isinstance(metrics.get("step"), int) and not isinstance(metrics.get("step"), bool):
            return metrics["step"]
        if max_step is not None:
            return max_step
        return self.exp.last_step

    def _apply(self, acks: list, request: studio.Request) -> None:
        exp = self.exp
        for ack in acks:
            kind = ack[0]
            if kind == "tsv":
                _, key, end, rows = ack
                exp.tsvs[key].ack(end, rows)
            elif kind == "image":
                _, key, stamp = ack
                exp.images[key] = stamp
            elif kind == "docs":
                _, exp.metrics, exp.params, exp.last_step = ack
                exp.stats.last_metrics, exp.stats.last_params, exp.stats.step = exp.metrics, exp.params, exp.last_step
                exp.sent_any = True
        exp.stats.rows += request.rows
        exp.stats.images += request.images

    # --- experiments ------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.live_key}/{name}" if self.live_key not in ("", ".") else name

    def _new_experiment(self) -> Experiment:
        n = len(self.experiments) + 1
        name = self.base_name if n == 1 else f"{self.base_name}-{n}"
        exp = Experiment(name, studio.Identity(self.ctx.repo_url, self.ctx.baseline_sha, name))
        self.experiments.append(exp)
        return exp

    def _start_request(self) -> studio.Request:
        sub = ci.subdir(self.ctx.dvc_root, self.ctx.git_root)
        return studio.start_request(self.exp.ident, self.ctx.message, sub)

    def _fresh_run(self, listing: reader.Listing) -> bool:
        """A fresh DVCLive run in the same directory deleted or truncated every TSV we had read from."""
        consumed = [t for t in self.exp.tsvs.values() if t.rows_acked > 0]
        if not consumed or not self.exp.stats.started:
            return False
        for tail in consumed:
            entry = listing.tsvs.get(tail.key)
            if entry is not None and not tail.is_replaced(entry[1]):
                return False
        log.info("DVCLive started afresh in %s: ending %s, starting a new experiment", self.live_key, self.exp.stats.name)
        return True

    def _close(self, deadline: float) -> None:
        """Send `done` for the current experiment (only if it was started)."""
        exp = self.exp
        if exp.stats.done:
            return
        if not exp.stats.started or self.transport.stopped:
            # Studio never took its start, or will take nothing from this token: `livesend done` could not do better
            self.ctx.ledger.closed(exp.ident.name)
            return
        exp.stats.experiment_rev = ci.experiment_rev(self.ctx.cwd, self.ctx.baseline_sha, exp.stats.name, self.ctx.env)
        request = studio.done_request(exp.ident, exp.stats.experiment_rev)
        while True:
            if self.deadline is not None:
                deadline = min(deadline, self.deadline)  # the flush may have been cut short
            outcome = self._send(request, deadline)
            if outcome.ok:
                exp.stats.done = True
                self.ctx.ledger.closed(exp.ident.name)
                return
            if outcome.kind != "retry":
                self.ctx.ledger.closed(exp.ident.name)  # Studio answered: asking again would not change it
                return
            delay = self._final_delay(outcome, deadline)
            if delay is None:
                ledger = self.ctx.ledger
                log.error("could not send `done` for %s before the flush timeout; Studio will show it as running%s",
                          exp.stats.name, f" ({how_to_close(ledger.run_name)})" if ledger.path else "")
                return
            self._pause(delay)

    def _report_undelivered(self) -> None:
        exp = self.exp
        listing = reader.scan(self.live_dir, self.live_key, self.ctx.tree_root, self.warnings)
        tails = [exp.tsvs.get(key) or TsvTail(path, key, self.warnings) for key, (path, _) in listing.tsvs.items()]
        rows = sum(t.pending_rows() for t in tails)
        images = [k for k, (_, st) in listing.images.items() if exp.images.get(k) != Stamp.of(st)]
        docs = self.metrics_doc.value != exp.metrics or self.params_doc.value != exp.params
        if rows or images or docs:
            parts = []
            if rows:
                parts.append(f"{rows} plot rows")
            if images:
                parts.append(f"{len(images)} images ({', '.join(images[:5])}{', ...' if len(images) > 5 else ''})")
            if docs:
                parts.append("the latest metrics/params")
            exp.stats.undelivered = ", ".join(parts)
            log.error("not delivered to Studio for %s%s: %s", exp.stats.name,
                      "" if exp.stats.started else " (Studio never acknowledged its start)", exp.stats.undelivered)
