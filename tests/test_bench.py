"""The benchmark keeps working: `python -m bench --quick` runs every section for real (real DVCLive
trainings, real livesend, the real loopback Studio) and reports each of them. Timings are not asserted:
CI machines are shared and noisy; docs/performance.md holds the numbers of a full run.

Also the byte identity of the batch row encoding that the backlog path uses."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, clean_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livesend import studio

SECTIONS = ["## Machine", "## 1. Training overhead", "## 2. Freshness", "## 3. Scaling", "## 4. Idle cost",
            "## 5. Baseline: DVCLive's own no-Studio path", "## Targets (issue 6)"]


def test_quick_bench_runs_every_section(tmp_path):
    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert text.strip() == result.stdout.strip()  # the same report on stdout and in the file
    for heading in SECTIONS:
        assert heading in text, heading
    assert "Command: `python -m bench --quick --out" in text
    assert "dvclive 3.49.1" in text and "cores" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    # every row logged arrived, with DVCLive's own posting and with livesend
    for row in raw["overhead"].values():
        for variant in ("dvclive", "livesend"):
            assert all(run["rows"] == 100 * raw["overhead_params"]["metrics"] for run in row[variant]), variant
    for variant in ("dvclive", "livesend"):
        assert sum(len(run["latencies"]) for run in raw["freshness"][variant]) == 40
    assert all(size["delivered"] for size in raw["scaling"])
    assert raw["idle"]["window_inside_sleep"]
    # livesend's CPU while the training ran was read from /proc by the training itself, in every livesend run
    for row in raw["overhead"].values():
        assert all(0 <= run["timing"]["parent_cpu"] <= run["cpu"] for run in row["livesend"])
    assert len(raw["baseline"]["as-is"]) == len(raw["baseline"]["lean"]) == 1
    targets = text.split("## Targets (issue 6)", 1)[1]
    for what in ("overhead <= 1%", "while the training ran", "freshness p95", "CPU per update", "backlog in under 60 s", "peak RSS", "idle CPU"):
        assert what in targets, what


ROW = st.tuples(st.integers(-(10**12), 10**12),
                st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8),
                          st.sampled_from(["nan", "inf", "-inf", "1e-05", "0"])))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ROW, max_size=30), st.integers(20, 400))
def test_row_entries_are_tsv_entries_byte_for_byte(cells, max_entry):
    header = ["step", "v"]
    fields = [[str(step), value] for step, value in cells]
    fields = [f for f in fields if len(studio.row_json(header, f)) + 2 <= max_entry]  # one row fits an entry
    ends = list(range(1, len(fields) + 1))
    one_by_one = list(studio.tsv_entries("k", [studio.row_json(header, f) for f in fields], ends, max_entry))
    batched = list(studio.row_entries("k", [studio.cast_row(header, f) for f in fields], ends, max_entry))
    assert [(e.key, e.json, e.size, e.ack, e.rows) for e in batched] == \
        [(e.key, e.json, e.size, e.ack, e.rows) for e in one_by_one]
