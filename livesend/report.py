"""The end-of-run summary and the reminder to commit the results.

Studio shows live metrics only while an experiment runs; the results last only once they are in Git.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from livesend import ci


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

    @property
    def delivery_failed(self) -> bool:
        return any(s.data_failed or s.undelivered or (s.started and not s.done) for s in self.experiments)


def uncommitted_files(cwd: str, paths: list, env: dict) -> list:
    """DVCLive files that `git status --porcelain` shows as not committed."""
    out = ci.git(["status", "--porcelain", "--untracked-files=all", "--", *paths], cwd, env)
    if not out:
        return []
    return [line[3:] for line in out.splitlines() if len(line) > 3]


def commit_commands(experiments: list, dirs: list) -> list:
    saved = [s for s in experiments if s.experiment_rev]
    if saved:
        return [f"dvc exp push origin {shlex.quote(s.name)}" for s in saved]
    name = experiments[0].name if experiments else "training"
    paths = " ".join(shlex.quote(d) for d in [*dirs, "dvc.yaml"])
    return [f"git add {paths} && git commit -m {shlex.quote('Results of ' + name)} && git push"]


def build(status: int, endpoint_host: str, experiments: list, dirs: list, cwd: str, env: dict,
          live: bool = True, dry_run: bool = False, **identity) -> Report:
    return Report(
        **identity,
        status=status,
        endpoint_host=endpoint_host,
        experiments=experiments,
        dirs=dirs,
        live=live,
        dry_run=dry_run,
        uncommitted=uncommitted_files(cwd, [*dirs, "dvc.yaml"], env),
        commands=commit_commands(experiments, dirs),
    )


def status_text(status: int) -> str:
    if status == 0:
        return "succeeded"
    if status > 128:
        return f"was killed by signal {status - 128}"
    return f"failed with exit status {status}"


def render_text(report: Report) -> str:
    lines = [f"the command {status_text(report.status)}."]
    if not report.experiments or not any(s.started for s in report.experiments):
        lines.append("no DVCLive output was sent to Studio" + ("" if report.live else " (live metrics were off)") + ".")
    for s in report.experiments:
        if not s.started and not s.undelivered:
            continue
        where = "printed (dry run)" if report.dry_run else f"sent to {report.endpoint_host}"
        state = "done" if s.done else "NOT marked done"
        lines.append(
            f"experiment {s.name}: {s.data_events} data events {where}, {s.data_failed} failed; "
            f"{s.rows} plot rows, {s.images} images delivered; {s.retries} retries; {state}."
        )
        if s.undelivered:
            lines.append(f"  not delivered: {s.undelivered}")
        if s.skipped_images:
            lines.append(f"  skipped (over 10 MB): {', '.join(s.skipped_images)}")
    if any(s.started for s in report.experiments) or report.uncommitted:
        lines.append("Studio keeps live metrics only while the experiment runs: commit the results to keep them.")
        if report.uncommitted:
            shown = ", ".join(report.uncommitted[:10]) + (", ..." if len(report.uncommitted) > 10 else "")
            lines.append(f"  not committed yet: {shown}")
        for command in report.commands:
            lines.append(f"  {command}")
    return "\n".join(lines)


def to_json(report: Report) -> dict:
    """The machine-readable report (`livesend run --report-json FILE`), for CI integrations."""
    return {
        "status": report.status,
        "name": report.name,
        "baseline_sha": report.baseline_sha,
        "repo_url": report.repo_url,
        "endpoint_host": report.endpoint_host,
        "live": report.live,
        "dry_run": report.dry_run,
        "delivery_failed": report.delivery_failed,
        "events_sent": sum(s.data_events for s in report.experiments),
        "experiments": [
            {
                "name": s.name, "started": s.started, "done": s.done, "experiment_rev": s.experiment_rev,
                "data_events": s.data_events, "data_failed": s.data_failed, "requests": s.requests,
                "retries": s.retries, "rows": s.rows, "images": s.images, "skipped_images": s.skipped_images,
                "undelivered": s.undelivered, "step": s.step, "metrics": s.last_metrics, "params": s.last_params,
            }
            for s in report.experiments
        ],
        "uncommitted": report.uncommitted,
        "commands": report.commands,
        "problems": report.problems,
    }
