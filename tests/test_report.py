"""The end-of-run report: golden text and Markdown for typical, nested, NaN, empty, failed, cancelled and
300-metric runs (within the job summary and comment limits); the bounded TSV history reader; the
charts; and `livesend run` writing $GITHUB_STEP_SUMMARY end to end.

Regenerate the golden files after an intended change of the output:
    LIVESEND_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py
and review `git diff tests/golden/`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import EXAMPLES, clean_env, git, run_livesend

from livesend import charts, history, report
from livesend.comment import FOOTER
from livesend.session import Stats

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("LIVESEND_UPDATE_GOLDEN") == "1"
BASELINE = "4f1c2d3e4a5b6c7d8e9f00112233445566778899"
HOST = "studio.example.com"
GITHUB_ENV = {
    "GITHUB_ACTIONS": "true", "GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "acme/models",
    "GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "2",
}


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with LIVESEND_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs (LIVESEND_UPDATE_GOLDEN=1 regenerates it)"


def write_tsv(path: Path, name: str, rows: list, timestamp: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (["timestamp"] if timestamp else []) + ["step", name]
    lines = ["\t".join(header)]
    for step, value in rows:
        lines.append("\t".join(([str(1700000000000 + step)] if timestamp else []) + [str(step), repr(value)]))
    path.write_text("\n".join(lines) + "\n")


def write_dvclive(repo: Path, metrics: dict | None, params: dict | None, series: dict, live_dir: str = "dvclive",
                  timestamp: bool = False) -> None:
    """A DVCLive directory as DVCLive writes it: metrics.json, params.yaml, plots/metrics/<name>.tsv."""
    root = repo / live_dir
    root.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        (root / "metrics.json").write_text(json.dumps(metrics, indent=4))  # NaN stays NaN, as DVCLive writes it
    if params is not None:
        import yaml

        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name, rows in series.items():
        write_tsv(root / "plots" / "metrics" / f"{name}.tsv", name.rsplit("/", 1)[-1], rows, timestamp)
    (repo / "dvc.yaml").write_text(f"metrics:\n- {live_dir}/metrics.json\n")


def stats(name: str = "amber-owl-1a2b", **kw) -> Stats:
    values = dict(started=True, done=True, data_events=12, data_failed=0, requests=14, retries=1, rows=120, images=6,
                  step=29)
    values.update(kw)
    return Stats(name, **values)


def curve(n: int, start: float, end: float, wobble: float = 0.0) -> list:
    return [(i, round(end + (start - end) * math.exp(-4 * i / max(1, n - 1)) + wobble * math.sin(i), 6)) for i in range(n)]


def typical_series(n: int = 30) -> dict:
    return {
        "train/loss": curve(n, 0.69, 0.21, 0.01),
        "train/acc": curve(n, 0.5, 0.93),
        "val/loss": curve(n, 0.7, 0.26, 0.02),
        "val/acc": curve(n, 0.5, 0.9),
    }


def final(series: dict) -> dict:
    out: dict = {}
    for name, rows in series.items():
        node = out
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = rows[-1][1]
    return out


def build(repo: Path, status: int = 0, experiments=None, live: bool = True, env: dict | None = None, **kw):
    return report.build(status, HOST, experiments if experiments is not None else [stats()], ["dvclive"], str(repo),
                        clean_env(**(env or {})), live, name="amber-owl-1a2b", baseline_sha=BASELINE,
                        repo_url="https://github.com/acme/models", problems=kw.pop("problems", []), **kw)


def check_all(case: str, summary: report.Report) -> None:
    golden(f"{case}.txt", report.render_text(summary) + "\n")
    golden(f"{case}.md", report.render_markdown(summary, limit=report.SUMMARY_LIMIT))


# --- golden cases -------------------------------------------------------------------------------------


def test_typical_run(repo):
    series = typical_series()
    write_dvclive(repo, {**final(series), "step": 29}, {"lr": 0.5, "epochs": 30, "optimizer": "adam"}, series,
                  timestamp=True)
    summary = build(repo, env=GITHUB_ENV)
    check_all("typical", summary)
    text = report.render_text(summary)
    assert "the command succeeded." in text
    assert "Studio keeps live metrics only while the experiment runs" in text
    assert "git add dvclive dvc.yaml && git commit -m 'Results of amber-owl-1a2b' && git push" in text
    md = report.render_markdown(summary)
    assert md.count("```mermaid") == 4 and "xychart-beta" in md
    assert "| `train/loss` | 0.21" in md
    assert "https://github.com/acme/models/actions/runs/4242/attempts/2" in md
    data = report.to_json(summary)
    assert data["results"][0]["metrics"]["train/loss"] == series["train/loss"][-1][1]
    assert data["results"][0]["plots"]["val/acc"]["rows"] == 30
    assert data["outcome"] == "succeeded"


def test_nested_metrics_are_flattened(repo):
    series = {
        "train/head/loss": curve(20, 2.0, 0.4),
        "train/backbone/layer1/grad_norm": curve(20, 5.0, 1.0, 0.3),
        "eval/top1": curve(20, 0.1, 0.7),
    }
    metrics = {**final(series), "step": 19, "best": {"eval": {"top1": 0.71, "epoch": 17}}}
    params = {"model": {"backbone": {"name": "resnet18", "widths": [64, 128, 256]}, "dropout": 0.1},
              "data": {"augment": True, "path": "s3://bucket/data | weird <name>"}}
    write_dvclive(repo, metrics, params, series)
    summary = build(repo, experiments=[stats(step=19)])
    check_all("nested", summary)
    md = report.render_markdown(summary)
    assert "| `train/backbone/layer1/grad_norm` |" in md and "| `best/eval/epoch` | 17 |" in md
    assert "| `model/backbone/widths` | `[64,128,256]` |" in md
    assert "| `data/path` | `s3://bucket/data \\| weird <name>` |" in md  # in a code span: shown as text, table intact


def test_nan_values(repo):
    loss = [(i, v) for i, v in curve(12, 1.0, 0.3)]
    loss[5] = (5, float("nan"))
    loss[6] = (6, float("inf"))
    series = {"loss": loss, "diverged": [(i, float("nan")) for i in range(12)]}
    write_dvclive(repo, {"loss": float("nan"), "diverged": float("nan"), "ratio": float("-inf"), "step": 11}, None, series)
    summary = build(repo, experiments=[stats(step=11)])
    check_all("nan", summary)
    md = report.render_markdown(summary)
    assert "| `loss` | NaN |" in md and "| `ratio` | -inf |" in md
    assert md.count("```mermaid") == 1  # "diverged" has nothing to draw
    json.dumps(report.to_json(summary), allow_nan=False)  # strict JSON


def test_no_metrics_at_all(repo):
    summary = build(repo, experiments=[], live=False)
    check_all("empty", summary)
    assert "No metrics were logged." in report.render_markdown(summary)


def test_failed_command_still_reminds(repo):
    series = typical_series(8)
    write_dvclive(repo, {**final(series), "step": 7}, {"lr": 3.0}, series)
    problems = [{"level": "error", "message": "not delivered to Studio for amber-owl-1a2b: 3 plot rows"}]
    summary = build(repo, status=3, experiments=[stats(step=7, done=False, undelivered="3 plot rows")], problems=problems)
    check_all("failed", summary)
    text = report.render_text(summary)
    assert "failed with exit status 3" in text and "worth keeping too" in text and "git add dvclive" in text
    assert "### ❌ Training failed" in report.render_markdown(summary)


def test_cancelled_command_says_so(repo):
    series = typical_series(5)
    write_dvclive(repo, final(series), None, series)
    summary = build(repo, status=143, cancelled=True, experiments=[stats(step=4, experiment_rev="ab" * 20)])
    check_all("cancelled", summary)
    text = report.render_text(summary)
    assert "was cancelled (killed by signal 15, SIGTERM)" in text and "dvc exp push origin amber-owl-1a2b" in text


def test_an_experiment_left_open_says_how_to_close_it_later(repo):
    series = typical_series(5)
    write_dvclive(repo, final(series), None, series)
    summary = build(repo, status=143, cancelled=True, experiments=[stats(step=4, done=False, left_open=True)])
    hint = "`livesend done --name amber-owl-1a2b` marks it done later"
    assert f"; NOT marked done ({hint})." in report.render_text(summary)
    assert f"; **not marked done** (Studio shows it as running; {hint})." in report.render_markdown(summary)
    summary.experiments[0].left_open = False  # closed otherwise (token rejected): no promise it cannot keep
    assert "livesend done" not in report.render_text(summary) + report.render_markdown(summary)


def many_metrics(repo: Path, n: int = 300, steps: int = 200) -> report.Report:
    series = {f"layers/block_{i:03d}/{kind}": curve(steps, 1.0 + i % 7, 0.1 * (i % 5) + 0.05, 0.05)
              for i, kind in ((i, ("grad_norm", "weight_norm", "update_ratio")[i % 3]) for i in range(n))}
    params = {f"layer_{i:03d}": {"width": 64 * (1 + i % 4), "activation": "gelu"} for i in range(n // 2)}
    write_dvclive(repo, {**final(series), "step": steps - 1}, params, series)
    return build(repo, experiments=[stats(step=steps - 1)])


def test_300_metrics_fit_the_summary_and_comment_limits(repo):
    summary = many_metrics(repo)
    check_all("300-metrics", summary)
    md = report.render_markdown(summary, limit=report.SUMMARY_LIMIT)
    assert report.measure_bytes(md) <= report.SUMMARY_LIMIT
    assert md.count("| `layers/block_") == 300  # all of them fit in the job summary
    comment = report.render_markdown(summary, limit=report.COMMENT_LIMIT, measure=len,
                                     prefix="<!-- livesend:ci/train -->\n", suffix=FOOTER)
    golden("300-metrics.comment.md", comment)
    assert len(comment) <= report.COMMENT_LIMIT
    assert comment.startswith("<!-- livesend:ci/train -->\n") and comment.endswith(FOOTER)
    text = report.render_text(summary)
    assert len(text.splitlines()) < 20 and "... and 292 more metrics" in text  # the log stays short


def test_truncation_drops_detail_before_the_reminder(repo):
    summary = many_metrics(repo)
    full = report.render_markdown(summary)
    for limit in (30_000, 20_000, 5_000, 1_500):
        cut = report.render_markdown(summary, limit=limit, measure=len, prefix="<!-- m -->\n", suffix=FOOTER)
        assert len(cut) <= limit < len(full)
        assert cut.startswith("<!-- m -->\n### ✅ Training succeeded") and cut.endswith(FOOTER)
        assert "git add dvclive dvc.yaml && git commit" in cut  # the reminder always stays
        assert cut.count("```") % 2 == 0  # no open code fence
    cut = report.render_markdown(summary, limit=20_000, measure=len)
    assert "more metrics: see `dvclive/metrics.json`" in cut and "```mermaid" not in cut
    golden("300-metrics.cut-20000.md", cut)
    tiny = report.render_markdown(summary, limit=600, measure=len)
    assert len(tiny) <= 600 and "cut here to fit the size limit" in tiny


def test_step_summary_appends_within_what_is_left(repo, tmp_path):
    summary = many_metrics(repo, n=30, steps=20)
    path = tmp_path / "summary.md"
    path.write_text("# Earlier step output\n")
    written = report.write_step_summary(summary, str(path))
    content = path.read_text()
    assert content.startswith("# Earlier step output\n\n### ✅ Training succeeded")
    assert written == len(content.encode()) - len("# Earlier step output\n\n".encode())
    path.write_bytes(b"x" * (report.SUMMARY_LIMIT - 10_000))  # nearly full: the report shrinks to fit
    report.write_step_summary(summary, str(path))
    assert path.stat().st_size <= report.SUMMARY_LIMIT


# --- history: bounded reads ---------------------------------------------------------------------------


def test_history_streams_and_decimates(tmp_path):
    path = tmp_path / "loss.tsv"
    rows = [(i, 1.0 / (i + 1)) for i in range(100_003)]
    write_tsv(path, "loss", rows)
    assert path.stat().st_size < history.STREAM_LIMIT  # read whole, one line at a time
    with path.open("a") as f:
        f.write("100003\t0.5")  # torn last line: not read
    s = history.read_series(str(path), "loss")
    assert s.rows == 100_003 and s.sampled
    assert len(s.values) <= 2 * history.MAX_POINTS + 1
    assert s.steps[0] == 0 and s.steps[-1] == 100_002 and s.last == rows[-1][1]
    assert s.steps == sorted(s.steps)


def test_history_samples_a_large_file_by_seeking_with_bounded_memory(tmp_path):
    path = tmp_path / "big.tsv"
    n = 400_000
    with path.open("w") as f:
        f.write("timestamp\tstep\tacc\n")
        for i in range(n):
            f.write(f"{1700000000000 + i}\t{i}\t{i / n:.6f}\n")
    assert path.stat().st_size > history.STREAM_LIMIT  # ~12 MB: sampled, not read whole
    tracemalloc.start()
    s = history.read_series(str(path), "acc")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert s.sampled and len(s.values) <= history.MAX_POINTS + 1
    assert s.last_step == n - 1 and s.last == pytest.approx((n - 1) / n, abs=1e-6)
    assert abs(s.rows - n) / n < 0.01
    assert s.steps == sorted(s.steps) and s.steps[0] == 0


def test_history_of_a_sparse_1_gib_tsv_is_quick_and_small(tmp_path):
    """Mostly a hole of NUL bytes without a newline: no sample may scan on through it."""
    path = tmp_path / "huge.tsv"
    with path.open("wb") as f:
        f.write(b"step\tloss\n" + b"".join(b"%d\t%f\n" % (i, 1 / (i + 1)) for i in range(1000)))
        f.seek(1 << 30)
        f.write(b"\n999999\t0.5\n")
    tracemalloc.start()
    started = time.monotonic()
    s = history.read_series(str(path), "loss")
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 5 and peak < 2_000_000, (elapsed, peak)
    assert s.sampled and s.last_step == 999999 and s.last == 0.5 and s.steps[0] == 0


def test_history_skips_overlong_lines_and_odd_rows(tmp_path):
    path = tmp_path / "odd.tsv"
    path.write_text("step\tloss\n0\t1.0\n1\t" + "9" * (history.MAX_LINE + 10) + "\n2\toops\n3\t0.5\nnot-a-row\n4\t0.25\n")
    s = history.read_series(str(path), "loss")
    assert s.steps == [0, 2, 3, 4] and s.values == [1.0, None, 0.5, 0.25]
    assert history.read_series(str(tmp_path / "missing.tsv"), "x") is None
    (tmp_path / "empty.tsv").write_text("")
    assert history.read_series(str(tmp_path / "empty.tsv"), "x") is None


def test_history_finds_nested_plots(tmp_path):
    for name in ("b/loss", "a/z/acc", "c"):
        write_tsv(tmp_path / "plots" / "metrics" / f"{name}.tsv", name.rsplit("/", 1)[-1], [(0, 1.0), (1, 2.0)])
    (tmp_path / "plots" / "metrics" / "notes.txt").write_text("x")
    found, unread = history.plotted_metrics(str(tmp_path), str(tmp_path))
    assert list(found) == ["a/z/acc", "b/loss", "c"] and unread == 0
    found, unread = history.plotted_metrics(str(tmp_path), str(tmp_path), max_series=2)
    assert len(found) == 2 and unread == 1


# --- charts -------------------------------------------------------------------------------------------


def test_sparkline():
    assert charts.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert charts.sparkline([3, 3, 3]) == "▄▄▄"
    assert charts.sparkline([1, None, 2]) == "▁ █"
    assert charts.sparkline([None, None]) == ""
    assert len(charts.sparkline(list(range(1000)))) == charts.SPARK_WIDTH


def test_mermaid_numbers_have_no_exponent():
    for value, text in ((1e-7, "0.0000001"), (1.5e20, "150000000000000000000"), (-0.000123456789, "-0.000123457"),
                        (0.0, "0"), (2.0, "2"), (1e-15, "0")):
        assert charts.plain_number(value) == text
    chart = charts.mermaid_line_chart('say "hi"', [0, 10, 20], [1e-7, None, 3e-7])
    assert chart.splitlines()[:4] == ["```mermaid", "xychart-beta", "    title \"say 'hi'\"", '    x-axis "step" 0 --> 20']
    assert "e-" not in chart
    assert charts.mermaid_line_chart("x", [0], [1.0]) is None


# --- end to end ---------------------------------------------------------------------------------------


def test_livesend_run_writes_the_github_step_summary(studio, repo, tmp_path):
    path = tmp_path / "step_summary"
    path.write_text("earlier\n")
    result = run_livesend(repo, studio.url, [sys.executable, str(EXAMPLES / "train.py"), "--epochs", "6"],
                          "--name", "summary-run", env={"GITHUB_STEP_SUMMARY": str(path)})
    assert result.returncode == 0, result.stderr
    content = path.read_text()
    assert content.startswith("earlier\n\n### ✅ Training succeeded: `summary-run`")
    head = git(repo, "rev-parse", "HEAD")
    assert f"| Baseline commit | `{head[:12]}` |" in content
    assert "| `train/loss` |" in content and "| `best_val_acc` | " in content and "```mermaid" in content
    assert "git add dvclive dvc.yaml && git commit -m 'Results of summary-run' && git push" in content
    assert "summary-run: 1" in content or "`summary-run`: " in content  # delivery stats
    assert "results in dvclive at step 5:" in result.stderr  # and the short version in the log
