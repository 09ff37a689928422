"""Soak: a long real DVCLive run (200,000 steps x 10 metrics by default) under livesend. livesend's
memory stays under 100 MB and flat, its file descriptors do not grow, and no row is lost.

LIVESEND_SOAK_STEPS changes the length (e.g. 2000 for a quick local check)."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import harness
import psutil
import pytest

STEPS = int(os.environ.get("LIVESEND_SOAK_STEPS", "200000"))

PRODUCER = """
import sys
from dvclive import Live
steps = int(sys.argv[1])
with Live(save_dvc_exp=False) as live:
    for i in range(steps):
        live.step = i  # log every metric of a step, then the summary now and then, as a training loop does
        for m in range(10):
            live.log_metric(f"train/m{m}", i * 0.001 + m)
        if i % 1000 == 999:
            live.make_summary()
"""


@pytest.mark.timeout(900)
def test_soak_memory_flat_no_fd_growth_nothing_lost(studio, repo):
    (repo / "soak.py").write_text(PRODUCER)
    proc = harness.start(repo, studio.url, [sys.executable, "soak.py", str(STEPS)], "--interval", "1",
                         "--flush-timeout", "120")
    samples: list = []  # (seconds since start, rss, fds)
    watched = psutil.Process(proc.pid)
    begun = time.monotonic()

    def sample() -> None:
        while proc.poll() is None:
            try:
                samples.append((time.monotonic() - begun, watched.memory_info().rss, watched.num_fds()))
            except psutil.Error:
                return
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outcome = harness.finish(proc, repo, timeout=900)
    sampler.join()
    accounting = harness.check(outcome, studio, flush_timeout=120)
    assert accounting["rows"] == STEPS * 10

    assert len(samples) >= 8, samples
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    peak = max(rss) / 2**20
    settled = rss[len(rss) // 4 :]  # after start-up and the first batches
    growth = (max(settled[len(settled) // 2 :]) - max(settled[: len(settled) // 2])) / 2**20
    print(f"soak: {STEPS} steps x 10 metrics in {samples[-1][0]:.0f} s; livesend peak RSS {peak:.1f} MB, "
          f"growth {growth:+.1f} MB, fds {min(fds)}..{max(fds)}, requests {len(outcome.record)}")
    assert peak < 100, f"peak RSS {peak:.1f} MB"
    assert growth < 5, f"RSS grew {growth:.1f} MB in the second half of the run"
    # No growth: the watcher re-opens its inotify descriptors between wake-ups, so single samples jump by
    # a few; a leak would make the typical count climb. Compare the medians of the first and the last
    # third of the run (not start-up, not clean-up), and bound every sample.
    running = fds[len(fds) // 4 : len(fds) - max(2, len(fds) // 10)]
    first, last = running[: len(running) // 3], running[-(len(running) // 3) :]
    assert statistics.median(last) <= statistics.median(first) + 1, fds
    assert max(running) <= 16, fds
