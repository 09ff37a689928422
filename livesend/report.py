"""The end-of-run report and the reminder to commit the results.

Studio shows live metrics only while an experiment runs; the results last only once they are in Git.
One model (`Report`, made by `build` once the command has ended) is rendered three ways:
- `render_text`: a few lines for the job log;
- `render_markdown`: GitHub-flavoured Markdown for the GitHub job summary and PR/MR comments, cut to
  a size limit (1 MiB for a job summary, 65,536 characters for a GitHub comment);
- `to_json`: the machine-readable report (`--report-json`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml

from livesend import ci, history
from livesend.reader import allowed_root, inside
from livesend.charts import mermaid_line_chart, sparkline
from livesend.ledger import how_to_close

log = logging.getLogger("livesend")

SUMMARY_LIMIT = 1024 * 1024  # bytes per step in $GITHUB_STEP_SUMMARY (GitHub fails the upload above it)
COMMENT_LIMIT = 65536  # characters in a GitHub issue/PR comment
DOC_LIMIT = 16 * 1024 * 1024  # metrics.json / params.yaml larger than this are not read for the report
TEXT_METRICS = 8  # metrics shown in the job log
MAX_CHARTS = 4  # Mermaid charts per DVCLive directory
MAX_FILES = 10  # uncommitted files listed
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 9: "SIGKILL", 15: "SIGTERM"}


@dataclass
class Section:
    """What one DVCLive directory holds at the end of the run."""

    dir: str
    name: str  # the Studio experiment of this directory (the last one, after fresh DVCLive runs)
    metrics: list = field(default_factory=list)  # [(flattened name, value)] from metrics.json, "step" aside
    params: list = field(default_factory=list)  # [(flattened name, value)] from params.yaml
    series: dict = field(default_factory=dict)  # flattened name -> history.Series (plots/metrics/*.tsv)
    step: Optional[int] = None
    unread_series: int = 0  # TSVs beyond history.MAX_SERIES

    def rows(self) -> list:
        """[(name, final value, Series or None)]: metrics.json order, then metrics only plotted."""
        out = []
        for name, value in self.metrics:
            out.append((name, value, self.series.get(name)))
        known = {name for name, _ in self.metrics}
        for name, series in self.series.items():
            if name not in known:
                out.append((name, series.last, series))
        return out


@dataclass
class Report:
    status: int
    endpoint_host: str
    experiments: list  # session.Stats
    dirs: list
    live: bool = True
    dry_run: bool = False
    uncommitted: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    name: str = ""
    baseline_sha: str = ""
    repo_url: str = ""
    problems: list = field(default_factory=list)  # {"level": "warning"|"error", "message": ...}
    cancelled: bool = False  # livesend got SIGINT/SIGTERM/SIGHUP (CI cancelled the job)
    sections: list = field(default_factory=list)
    job_url: str = ""

    @property
    def delivery_failed(self) -> bool:
        return any(s.data_failed or s.undelivered or (s.started and not s.done) for s in self.experiments)

    @property
    def outcome(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "succeeded" if self.status == 0 else "failed"

    @property
    def studio_url(self) -> str:
        host = self.endpoint_host.rsplit(":", 1)[0].strip("[]")
        scheme = "http" if host in ("localhost", "127.0.0.1", "::1") else "https"
        return f"{scheme}://{self.endpoint_host}" if self.endpoint_host else ""

    @property
    def sent(self) -> bool:
        return any(s.started for s in self.experiments)


# --- building -----------------------------------------------------------------------------------------


def uncommitted_files(cwd: str, paths: list, env: dict) -> list:
    """DVCLive files that `git status --porcelain` shows as not committed."""
    out = ci.git(["status", "--porcelain", "--untracked-files=all", "--", *paths], cwd, env)
    if not out:
        return []
    return [line[3:] for line in out.splitlines() if len(line) > 3]


def commit_commands(experiments: list, dirs: list, name: str = "") -> list:
    saved = [s for s in experiments if s.experiment_rev]
    if saved:
        return [f"dvc exp push origin {shlex.quote(s.name)}" for s in saved]
    name = experiments[0].name if experiments else (name or "training")
    paths = " ".join(shlex.quote(d) for d in [*dirs, "dvc.yaml"])
    return [f"git add {paths} && git commit -m {shlex.quote('Results of ' + name)} && git push"]


def flatten(value: Any, prefix: str = "") -> list:
    """[(name, leaf)] with nested mapping keys joined by "/" (DVCLive's `train/loss`)."""
    if isinstance(value, dict) and value:
        out = []
        for key, inner in value.items():
            out.extend(flatten(inner, f"{prefix}{key}/"))
        return out
    return [(prefix[:-1], value)] if prefix else []


def _load(path: str, parse: Callable[[str], Any]) -> Any:
    try:
        if os.path.getsize(path) > DOC_LIMIT:
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(f.read())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def read_section(live_dir: str, cwd: str, name: str, stats: Optional[list], tree_root: str) -> Section:
    path = os.path.join(cwd, live_dir)
    allowed = allowed_root(path, tree_root)  # what the sender may read: a file linked out of it never is

    def load(file: str, parse: Callable[[str], Any]) -> Any:
        full = os.path.join(path, file)
        return _load(full, parse) if allowed and inside(os.path.realpath(full), allowed) else None

    metrics = load("metrics.json", json.loads)
    params = load("params.yaml", yaml.safe_load)
    series, unread = history.plotted_metrics(path, tree_root) if allowed else ({}, 0)
    section = Section(dir=live_dir, name=stats[-1].name if stats else name, series=series, unread_series=unread)
    if isinstance(metrics, dict):
        step = metrics.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            section.step = step
        section.metrics = [(k, v) for k, v in flatten(metrics) if k != "step"]
    section.params = flatten(params) if isinstance(params, dict) else []
    if section.step is None:
        steps = [s.last_step for s in series.values() if s.last_step is not None]
        if steps:
            section.step = max(steps)
        elif stats and stats[-1].started:
            section.step = stats[-1].step
    return section


def job_url(env: Mapping[str, str]) -> str:
    kind = ci.platform(env)
    if kind == "github" and env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        server = (env.get("GITHUB_SERVER_URL") or "https://github.com").rstrip("/")
        url = f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
        attempt = env.get("GITHUB_RUN_ATTEMPT")
        return f"{url}/attempts/{attempt}" if attempt and attempt != "1" else url
    if kind == "gitlab":
        return env.get("CI_JOB_URL") or ""
    return ""


def build(status: int, endpoint_host: str, experiments: list, dirs: list, cwd: str, env: dict,
          live: bool = True, dry_run: bool = False, groups: Optional[list] = None, names: Optional[list] = None,
          tree_root: Optional[str] = None, **identity) -> Report:
    """The report of a finished run. `groups`: the Stats of each directory (in `dirs` order);
    `names`: the experiment name of each directory (when nothing was sent); `tree_root`: the working
    tree the sender kept to (found again when not given)."""
    sections = []
    tree_root = tree_root or ci.git_root(cwd, env) or os.path.realpath(cwd)
    for i, live_dir in enumerate(dirs):
        stats = groups[i] if groups and i < len(groups) else None
        name = names[i] if names and i < len(names) else identity.get("name", "")
        if stats is None and len(dirs) == 1:
            stats = experiments or None
        sections.append(read_section(live_dir, cwd, name, stats, tree_root))
    return Report(
        **identity,
        status=status,
        endpoint_host=endpoint_host,
        experiments=experiments,
        dirs=dirs,
        live=live,
        dry_run=dry_run,
        uncommitted=uncommitted_files(cwd, [*dirs, "dvc.yaml"], env),
        commands=commit_commands(experiments, dirs, identity.get("name", "")),
        sections=sections,
        job_url=job_url(env),
    )


# --- words and numbers ------------------------------------------------------------------------------


def status_text(status: int, cancelled: bool = False) -> str:
    if cancelled:
        if status > 128:
            signum = status - 128
            return f"was cancelled (killed by signal {signum}{', ' + SIGNALS[signum] if signum in SIGNALS else ''})"
        return f"was cancelled (it exited with status {status})"
    if status == 0:
        return "succeeded"
    if status > 128:
        return f"was killed by signal {status - 128}"
    return f"failed with exit status {status}"


def fmt(value: Any, width: int = 60) -> str:
    """A final metric or param value as text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), default=str, allow_nan=True)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _spark(series: Optional[history.Series]) -> str:
    return sparkline(series.values) if series is not None else ""


def _reminder_head(report: Report) -> list:
    lines = []
    if report.live and report.sent:
        lines.append("Studio keeps live metrics only while the experiment runs: commit the results to keep them.")
    else:
        lines.append("Commit the DVCLive results to keep them.")
    if report.outcome != "succeeded":
        what = "was cancelled" if report.outcome == "cancelled" else "failed"
        lines.append(f"The command {what}: the results of such a run are worth keeping too "
                     "(or delete the experiment in Studio).")
    return lines


def file_groups(files: list, dirs: list, limit: int = MAX_FILES) -> list:
    """The uncommitted files to name: all of them when few, else one `dir/ (N files)` per DVCLive
    directory (paths as `git status` prints them, from the repository root) and the rest by name."""
    if len(files) <= limit:
        return list(files)
    out, counted = [], {}
    tails = [d.strip("/").replace(os.sep, "/") + "/" for d in dirs]
    for path in files:
        owner = next((t for t in tails if path.startswith(t) or f"/{t}" in f"/{path}"), None)
        if owner is None:
            out.append(path)
        else:
            top = path[: path.find(owner) + len(owner)] if not path.startswith(owner) else owner
            counted[top] = counted.get(top, 0) + 1
    return out[:limit] + [f"{top} ({n} files)" for top, n in counted.items()] + (
        [f"{len(out) - limit} more"] if len(out) > limit else [])


def _has_reminder(report: Report) -> bool:
    return report.sent or bool(report.uncommitted)


# --- plain text (the job log) -----------------------------------------------------------------------


def render_text(report: Report) -> str:
    lines = [f"the command {status_text(report.status, report.cancelled)}."]
    if not report.experiments or not report.sent:
        lines.append("no DVCLive output was sent to Studio" + ("" if report.live else " (live metrics were off)") + ".")
    for s in report.experiments:
        if not s.started and not s.undelivered:
            continue
        where = "printed (dry run)" if report.dry_run else f"sent to {report.endpoint_host}"
        state = "done" if s.done else "NOT marked done" + (f" ({how_to_close(report.name)})" if s.left_open else "")
        lines.append(
            f"experiment {s.name}: {s.data_events} data events {where}, {s.data_failed} failed; "
            f"{s.rows} plot rows, {s.images} images delivered; {s.retries} retries; {state}."
        )
        if s.undelivered:
            lines.append(f"  not delivered: {s.undelivered}")
        if s.skipped_images:
            lines.append(f"  skipped (over 10 MB): {', '.join(s.skipped_images)}")
    for section in report.sections:
        rows = section.rows()
        if not rows:
            continue
        at = f" at step {section.step}" if section.step is not None else ""
        lines.append(f"results in {section.dir}{at}:")
        shown = rows[:TEXT_METRICS]
        width = min(40, max(len(name) for name, _, _ in shown))
        for name, value, series in shown:
            lines.append(f"  {name:<{width}}  {fmt(value, 24):>12}  {_spark(series)}".rstrip())
        if len(rows) > len(shown):
            lines.append(f"  ... and {len(rows) - len(shown)} more metrics ({section.dir}/metrics.json has them all)")
    if _has_reminder(report):
        lines.extend(_reminder_head(report))
        if report.uncommitted:
            lines.append(f"  not committed yet: {', '.join(file_groups(report.uncommitted, report.dirs))}")
        for command in report.commands:
            lines.append(f"  {command}")
    return "\n".join(lines)


# --- Markdown (job summary, PR/MR comment) ------------------------------------------------------------


def code(text: str) -> str:
    """Inline code that is safe in a GFM table cell."""
    text = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`" if text else ""


def cell(text: str) -> str:
    """Plain text that is safe in a GFM table cell (no HTML, no pipes)."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def value_cell(value: Any) -> str:
    """Numbers as they are, text as inline code."""
    if value is None or isinstance(value, (bool, int, float)):
        return cell(fmt(value))
    return code(fmt(value))


HEADINGS = {"succeeded": "✅ Training succeeded", "failed": "❌ Training failed", "cancelled": "⏹️ Training cancelled"}


@dataclass
class _Plan:
    metrics: Optional[int] = None  # metric rows per directory (None: all)
    params: Optional[int] = None
    charts: int = MAX_CHARTS
    problems: Optional[int] = None
    files: int = MAX_FILES


def _markdown(report: Report, plan: _Plan) -> str:
    out: list = [f"### {HEADINGS[report.outcome]}: {code(report.name)}", ""]
    out += ["| | |", "|:--|:--|"]
    out.append(f"| Command | {cell(status_text(report.status, report.cancelled))} |")
    if report.baseline_sha:
        out.append(f"| Baseline commit | {code(report.baseline_sha[:12])} |")
    steps = [s.step for s in report.sections if s.step is not None]
    if steps:
        out.append(f"| Last step | {max(steps)} |")
    if report.live and report.sent and not report.dry_run:
        out.append(f"| Studio | [{cell(report.endpoint_host)}]({report.studio_url}) (live while the command ran) |")
    elif not report.live:
        out.append("| Studio | live metrics were off (no token) |")
    if report.job_url:
        out.append(f"| Job | [{cell(report.job_url.split('://', 1)[-1])}]({report.job_url}) |")
    out.append("")

    if _has_reminder(report):
        out += ["#### Keep the results", ""]
        out += [" ".join(_reminder_head(report)), ""]
        if report.uncommitted:
            files = ", ".join(code(f) for f in file_groups(report.uncommitted, report.dirs, plan.files))
            out += [f"Not committed yet: {files}.", ""]
        out += ["```sh", *report.commands, "```", ""]

    multi = len(report.sections) > 1
    for section in report.sections:
        out += _section(section, plan, multi)

    delivery = _delivery(report)
    if delivery:
        out += ["#### Delivery to Studio", "", *delivery, ""]
    problems = report.problems if plan.problems is None else report.problems[: plan.problems]
    if problems:
        out += [f"<details><summary>{len(report.problems)} warnings and errors</summary>", ""]
        out += [f"- {p['level']}: {cell(p['message'])}" for p in problems]
        if len(problems) < len(report.problems):
            out.append(f"- … and {len(report.problems) - len(problems)} more (see the job log)")
        out += ["", "</details>", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _section(section: Section, plan: _Plan, multi: bool) -> list:
    rows = section.rows()
    out: list = []
    title = f"{code(section.dir)} ({code(section.name)})" if multi else ""
    if multi:
        out += [f"#### {title}", ""]
    if rows:
        shown = rows if plan.metrics is None else rows[: plan.metrics]
        at = f" at step {section.step}" if section.step is not None and multi else ""
        out += [f"#### Metrics{at}" if not multi else f"Metrics{at}:", ""]
        if shown:
            out += ["| Metric | Value | Trend |", "|:--|--:|:--|"]
            for name, value, series in shown:
                spark = _spark(series)
                out.append(f"| {code(name)} | {value_cell(value)} | {code(spark) if spark else ''} |")
        if len(shown) < len(rows):
            out += ["", f"… and {len(rows) - len(shown)} more metrics: see {code(section.dir + '/metrics.json')}."]
        if section.unread_series:
            out += ["", f"{section.unread_series} more plotted metrics were not read."]
        out.append("")
    elif not multi:
        out += ["#### Metrics", "", "No metrics were logged.", ""]
    else:
        out += ["No metrics were logged.", ""]
    if section.params:
        shown = section.params if plan.params is None else section.params[: plan.params]
        table = ["| Param | Value |", "|:--|:--|", *(f"| {code(n)} | {value_cell(v)} |" for n, v in shown)]
        if len(shown) < len(section.params):
            table += ["", f"… and {len(section.params) - len(shown)} more: see {code(section.dir + '/params.yaml')}."]
        if len(section.params) > 12:
            out += [f"<details><summary>Params ({len(section.params)})</summary>", "", *table, "", "</details>", ""]
        else:
            out += ["#### Params" if not multi else "Params:", "", *table, ""]
    charts = []
    for name, _, series in rows:
        if len(charts) >= plan.charts:
            break
        if series is not None:
            chart = mermaid_line_chart(name, series.steps, series.values)
            if chart:
                charts.append(chart)
    if charts:
        out += ["#### Charts" if not multi else "Charts:", "", *(c + "\n" for c in charts)]
    return out


def _delivery(report: Report) -> list:
    out = []
    for s in report.experiments:
        if not s.started and not s.undelivered:
            continue
        where = "printed (dry run)" if report.dry_run else f"sent to {cell(report.endpoint_host)}"
        state = "marked done" if s.done else \
            f"**not marked done** (Studio shows it as running{'; ' + how_to_close(report.name) if s.left_open else ''})"
        out.append(f"- {code(s.name)}: {s.data_events} data events {where}, {s.data_failed} failed; "
                   f"{s.rows} plot rows and {s.images} images delivered; {s.retries} retries; {state}.")
        if s.undelivered:
            out.append(f"  Not delivered: {cell(s.undelivered)}.")
        if s.skipped_images:
            out.append(f"  Skipped (over 10 MB): {', '.join(code(i) for i in s.skipped_images)}.")
    return out


def _plans(charts: int) -> list:
    plans = [_Plan(charts=charts), _Plan(charts=min(charts, 1)), _Plan(charts=0, params=50, problems=20)]
    for rows in (500, 200, 100, 50, 20, 10, 0):
        plans.append(_Plan(metrics=rows, params=min(rows, 20), charts=0, problems=5, files=5))
    return plans


def measure_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


CUT_NOTE = "\n\n*(The report was cut here to fit the size limit.)*\n"


def render_markdown(report: Report, limit: Optional[int] = None, measure: Callable[[str], int] = measure_bytes,
                    charts: int = MAX_CHARTS, prefix: str = "", suffix: str = "") -> str:
    """The report as GitHub-flavoured Markdown, at most `limit` (as `measure` counts) with `prefix`
    and `suffix` (a comment's marker and footer). Cut gracefully: first the charts, then long
    param lists and warnings, then metric rows (saying how many are left out); the status, the
    reminder and its commands come first and stay."""
    text = prefix + _markdown(report, _Plan(charts=charts)) + suffix
    if limit is None or measure(text) <= limit:
        return text
    for plan in _plans(charts)[1:]:
        text = prefix + _markdown(report, plan) + suffix
        if measure(text) <= limit:
            return text
    # Last resort: cut at a line boundary (only reached with limits far below any real one).
    budget = limit - measure(prefix) - measure(suffix) - measure(CUT_NOTE) - 8
    body, kept = _markdown(report, _plans(charts)[-1]), []
    used = 0
    for line in body.splitlines(keepends=True):
        if used + measure(line) > budget:
            break
        kept.append(line)
        used += measure(line)
    cut = "".join(kept)
    if cut.count("```") % 2:
        cut += "```\n"
    return prefix + cut + CUT_NOTE + suffix


def write_step_summary(report: Report, path: str) -> Optional[int]:
    """Append the Markdown report to $GITHUB_STEP_SUMMARY within what is left of its 1 MiB; the
    bytes written, or None when it could not be written."""
    try:
        used = os.path.getsize(path)
    except OSError:
        used = 0
    budget = SUMMARY_LIMIT - used - 1024
    if budget < 2048:
        log.warning("the job summary file is nearly full (%d bytes): no report added to it", used)
        return None
    text = render_markdown(report, limit=budget)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if used else "") + text)
    except OSError as exc:
        log.warning("cannot write the job summary %s: %s", path, exc.strerror or exc)
        return None
    return measure_bytes(text)


# --- JSON -------------------------------------------------------------------------------------------


def _safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return fmt(value)
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    return value


def to_json(report: Report) -> dict:
    """The machine-readable report (`livesend run --report-json FILE`), for CI integrations."""
    return {
        "status": report.status,
        "outcome": report.outcome,
        "cancelled": report.cancelled,
        "name": report.name,
        "baseline_sha": report.baseline_sha,
        "repo_url": report.repo_url,
        "endpoint_host": report.endpoint_host,
        "live": report.live,
        "dry_run": report.dry_run,
        "delivery_failed": report.delivery_failed,
        "events_sent": sum(s.data_events for s in report.experiments),
        "job_url": report.job_url,
        "experiments": [
            {
                "name": s.name, "started": s.started, "done": s.done, "experiment_rev": s.experiment_rev,
                "data_events": s.data_events, "data_failed": s.data_failed, "requests": s.requests,
                "retries": s.retries, "rows": s.rows, "images": s.images, "skipped_images": s.skipped_images,
                "undelivered": s.undelivered, "step": s.step, "metrics": _safe(s.last_metrics),
                "params": _safe(s.last_params),
            }
            for s in report.experiments
        ],
        "results": [
            {
                "dir": section.dir,
                "name": section.name,
                "step": section.step,
                "metrics": {name: _safe(value) for name, value, _ in section.rows()},
                "params": {name: _safe(value) for name, value in section.params},
                "plots": {
                    name: {"rows": s.rows, "last_step": s.last_step, "last": _safe(s.last), "sparkline": _spark(s)}
                    for name, s in section.series.items()
                },
            }
            for section in report.sections
        ],
        "uncommitted": report.uncommitted,
        "commands": report.commands,
        "problems": report.problems,
    }
