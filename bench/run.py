"""livesend's benchmark, side by side with DVCLive's own Studio posting, in one run, on this machine,
against one loopback Studio server (tests/studio_server.py: checks the token, validates every body with
dvc-studio-client's schema).

    python -m bench            # the full benchmark (see docs/performance.md for how long it takes)
    python -m bench --quick    # small N: checks that every section works, in well under a minute

Sections:
  1. training overhead: the same real DVCLive loop (N steps x M metrics, fixed CPU work per step) with no
     Studio, with DVCLive's own posting, and wrapped by livesend (DVCLive's posting off); interleaved
     rounds (A B C, A B C, ...), medians, ratios to "no Studio";
  2. freshness: the wall clock logged as a metric, against its arrival time at the server;
  3. scaling: resumed runs whose TSVs already hold 1k ... 1M rows: the backlog's delivery time, peak RSS and
     requests per second, then livesend's CPU per update and bytes per request with that history;
  4. idle cost: livesend's CPU while the command sleeps with nothing changing;
  5. baseline: what DVCLive's own no-Studio path costs (it queues the whole parsed history to a thread at
     every step), against the same loop without that queue: why "no Studio" is no floor at large N.

The report goes to stdout and to bench/results/bench-<time>.md (raw numbers beside it as .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil
import resource

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "bench" / "workload.py"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))

from studio_server import StudioServer  # noqa: E402

TOKEN = "bench-token-5e1c"
REPO_URL = "https://example.com/bench/repo.git"
VARIANTS = ("none", "dvclive", "livesend")
LABEL = {"none": "no Studio", "dvclive": "DVCLive's own posting", "livesend": "livesend"}
SECTIONS = ("overhead", "freshness", "scaling", "idle", "baseline")


# --- the server ----------------------------------------------------------------------------------------


@dataclass
class Hit:
    """What the bench keeps of one request (not the body: a 1M-row backlog would fill the bench's memory)."""

    time: float
    status: int
    type: str
    name: str
    size: int  # Content-Length
    rows: int  # plot rows in the body
    docs: bool  # carries metrics/params: the first POST of a data event
    latencies: list = field(default_factory=list)  # arrival - logged, for each row of the clock metric `t`


class BenchServer(StudioServer):
    """The tests' loopback Studio, unchanged (auth, schema, answers), recording a Hit per request."""

    def __init__(self) -> None:
        super().__init__(token=TOKEN)
        self.hits: list[Hit] = []
        self.rows: dict[str, int] = {}  # accepted plot rows per experiment name

    def _record(self, entry) -> None:
        body = entry.body or {}
        rows, latencies = 0, []
        for key, value in (body.get("plots") or {}).items():
            data = value.get("data") or []
            rows += len(data)
            if key.endswith("/t.tsv"):
                latencies.extend(entry.time - row["t"] for row in data if isinstance(row.get("t"), float))
        hit = Hit(entry.time, entry.status, body.get("type", "?"), body.get("name", "?"),
                  int(entry.headers.get("Content-Length") or 0), rows, "metrics" in body or "params" in body, latencies)
        with self.cond:
            self.hits.append(hit)
            if entry.error:
                self.invalid.append(entry)
            if entry.status == 200:
                self.rows[hit.name] = self.rows.get(hit.name, 0) + rows
            self.cond.notify_all()

    def of(self, name: str, since: int = 0) -> list:
        with self.lock:
            return [h for h in self.hits[since:] if h.name == name and h.status == 200]

    @property
    def base(self) -> str:
        return self.url.rsplit("/api/live", 1)[0]


# --- processes -----------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "GITLAB_", "CI_", "STUDIO_", "DVC_", "LIVESEND_", "RUNNER_")) and k != "CI"}
    env.update({"PYTHONUNBUFFERED": "1", "GIT_TERMINAL_PROMPT": "0"})
    env.update(extra)
    return env


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "b@example.com"], ["config", "user.name", "b"],
                 ["remote", "add", "origin", REPO_URL], ["commit", "-q", "--allow-empty", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return path


class Sampler(threading.Thread):
    """Follows one process: its own CPU seconds (user + system, psutil) and its peak RSS (VmHWM)."""

    def __init__(self, pid: int, every: float = 1.0) -> None:  # VmHWM is a high-water mark: few samples do
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.every = every
        self.stopped = threading.Event()
        self.cpu = 0.0
        self.peak_rss = 0
        self.sample()
        self.start()

    def sample(self) -> float:
        try:
            times = self.proc.cpu_times()
            self.cpu = times.user + times.system
            self.peak_rss = max(self.peak_rss, _vm_hwm(self.proc.pid) or self.proc.memory_info().rss)
        except psutil.Error:
            pass
        return self.cpu

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that ended, and their descendants
    return usage.ru_utime + usage.ru_stime


def _vm_hwm(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Run:
    variant: str
    name: str
    wall: float  # the whole command, as the CI job sees it
    timing: dict  # measured inside the training process
    returncode: int
    cpu: float = 0.0  # CPU seconds of the whole command: the training, and livesend when it wraps it
    server_cpu: float = 0.0  # CPU seconds of the bench process meanwhile: the loopback Studio, mostly
    load: float = 0.0  # the 1-minute load average when the run ended (other work on the machine shows here)
    livesend_cpu: Optional[float] = None  # livesend's own: the command's CPU minus the training's
    livesend_peak_rss: Optional[int] = None
    requests: int = 0
    rows: int = 0
    latencies: list = field(default_factory=list)


class Bench:
    def __init__(self, server: BenchServer, work: Path, interval: float) -> None:
        self.server, self.work, self.interval = server, work, interval
        self.repos = {v: make_repo(work / v) for v in VARIANTS}
        self.count = 0

    def command(self, variant: str, name: str, workload: list, interval: Optional[float] = None) -> tuple:
        """argv and environment of one run of `workload` in one of the three ways."""
        argv = [sys.executable, str(WORKLOAD), *workload]
        if variant == "none":
            return argv, clean_env(DVC_STUDIO_OFFLINE="true")
        if variant == "dvclive":
            return argv, clean_env(DVC_STUDIO_TOKEN=TOKEN, DVC_STUDIO_URL=self.server.base,
                                   DVC_STUDIO_REPO_URL=REPO_URL, DVC_EXP_NAME=name)
        wrapped = [sys.executable, "-m", "livesend", "run", "--interval", str(interval or self.interval),
                   "--name", name, "--repo-url", REPO_URL, "--", *argv]
        # this checkout's livesend, whatever an editable install elsewhere on the machine points to
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return wrapped, clean_env(STUDIO_TOKEN=TOKEN, STUDIO_ENDPOINT=self.server.url, PYTHONPATH=path)

    def name(self, variant: str, what: str) -> str:
        self.count += 1
        return f"bench-{what}-{variant}-{self.count}"

    def start(self, variant: str, what: str, workload: list, repo: Optional[Path] = None,
              interval: Optional[float] = None, fresh: bool = True):
        name = self.name(variant, what)
        repo = repo or self.repos[variant]
        if fresh:
            shutil.rmtree(repo / "dvclive", ignore_errors=True)
        timing = repo / f".timing-{name}.json"
        argv, env = self.command(variant, name, [*workload, "--timing", str(timing)], interval)
        log = open(repo / f".log-{name}.txt", "w")
        self.children_cpu = _children_cpu()  # runs are one at a time: the difference is this command's
        self.own_cpu = _own_cpu()
        began = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid) if variant == "livesend" else None
        return name, proc, sampler, began, timing, log

    def finish(self, variant: str, started, timeout: float = 7200) -> Run:
        name, proc, sampler, began, timing, log = started
        try:
            proc.wait(timeout)
        finally:
            proc.kill()
            log.close()
        wall = time.perf_counter() - began
        run = Run(variant, name, wall, json.loads(timing.read_text()) if timing.exists() else {}, proc.returncode)
        run.cpu = _children_cpu() - self.children_cpu
        run.server_cpu = _own_cpu() - self.own_cpu
        run.load = os.getloadavg()[0]
        if proc.returncode != 0:
            raise SystemExit(f"bench: {name} exited {proc.returncode}; see {log.name}")
        if sampler:
            sampler.stop()
            run.livesend_cpu, run.livesend_peak_rss = sampler.cpu, sampler.peak_rss
            if "cpu" in run.timing:  # exact, unlike the sampler, which misses livesend's last moments
                run.livesend_cpu = run.cpu - run.timing["cpu"]
        hits = self.server.of(name)
        run.requests = len(hits)
        run.rows = sum(h.rows for h in hits)
        run.latencies = [lat for h in hits for lat in h.latencies]
        return run

    def run(self, variant: str, what: str, workload: list, **kwargs) -> Run:
        return self.finish(variant, self.start(variant, what, workload, **kwargs))


# --- the sections --------------------------------------------------------------------------------------


def overhead(bench: Bench, steps: list, metrics: int, work: int, repeats: int, long_repeats: int,
             rotate: bool) -> dict:
    out = {}
    for n in steps:
        rounds = long_repeats if n >= 20_000 else repeats
        runs: dict = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3] if rotate else VARIANTS  # ABC BCA CAB: no seat is favoured
            for variant in order:
                extra = ["--parent-cpu"] if variant == "livesend" else []  # livesend's CPU while the loop ran
                run = bench.run(variant, f"n{n}", ["train", "--steps", str(n), "--metrics", str(metrics),
                                                   "--work", str(work), *extra])
                runs[variant].append(run)
                say(f"  N={n} round {r + 1}/{rounds} {LABEL[variant]:22} training {run.timing['total']:8.2f} s"
                    f"  command {run.wall:8.2f} s  requests {run.requests:6}  rows {run.rows}  load {run.load:.2f}")
        out[n] = runs
    return out


def baseline(bench: Bench, steps: int, metrics: int, work: int, rounds: int) -> dict:
    """DVCLive with Studio off, as it is and without its idle queue (workload.py `--lean`), interleaved."""
    runs: dict = {"as-is": [], "lean": []}
    for r in range(rounds):
        for way in (("as-is", "lean") if r % 2 == 0 else ("lean", "as-is")):
            run = bench.run("none", "base", ["train", "--steps", str(steps), "--metrics", str(metrics),
                                             "--work", str(work), *(["--lean"] if way == "lean" else [])])
            runs[way].append(run)
            say(f"  N={steps} round {r + 1}/{rounds} {way:6} training {run.timing['total']:8.2f} s  cpu {run.cpu:8.2f} s")
    return runs


def freshness(bench: Bench, steps: int, metrics: int, work: int, rounds: int) -> dict:
    runs: dict = {"dvclive": [], "livesend": []}
    for _ in range(rounds):
        for variant in runs:
            run = bench.run(variant, "fresh", ["train", "--steps", str(steps), "--metrics", str(metrics),
                                               "--work", str(work), "--clock"])
            runs[variant].append(run)
            say(f"  {LABEL[variant]:22} {len(run.latencies)} clock rows arrived, "
                f"p95 {percentile(run.latencies, 95):.3f} s")
    return runs


def write_history(live: Path, rows: int, metrics: int) -> None:
    """What DVCLive leaves behind after rows/metrics steps of `log_metric` + `next_step` (a resumed run)."""
    per = rows // metrics
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    for m in range(metrics):
        with open(live / "plots" / "metrics" / "train" / f"m{m}.tsv", "w") as f:
            f.write(f"step\tm{m}\n")
            for start in range(0, per, 100_000):
                f.write("".join(f"{s}\t{s * 0.001 + m}\n" for s in range(start, min(per, start + 100_000))))
    summary = {"train": {f"m{m}": (per - 1) * 0.001 + m for m in range(metrics)}, "step": per - 1}
    (live / "metrics.json").write_text(json.dumps(summary, indent=4) + "\n")
    (live / "params.yaml").write_text(f"steps: {per}\nmetrics: {metrics}\n")


def scaling(bench: Bench, sizes: list, metrics: int, updates: int, period: float, interval: float) -> list:
    out = []
    for size in sizes:
        repo = bench.repos["livesend"]
        shutil.rmtree(repo / "dvclive", ignore_errors=True)
        write_history(repo / "dvclive", size, metrics)
        go = repo / ".go"
        go.unlink(missing_ok=True)
        started = bench.start("livesend", f"h{size}", ["resume", "--metrics", str(metrics), "--updates",
                                                        str(updates), "--period", str(period), "--go", str(go)],
                              interval=interval, fresh=False)
        name, proc, sampler, began, _, _ = started
        began_wall = time.time() - (time.perf_counter() - began)
        ok = bench.server.wait_for(lambda s: s.rows.get(name, 0) >= size or proc.poll() is not None, timeout=600)
        backlog_hits = bench.server.of(name)
        backlog_cpu, backlog_rss = sampler.sample(), sampler.peak_rss
        last = max((h.time for h in backlog_hits if h.rows), default=time.time())
        mark = len(bench.server.hits)
        go.write_text("go")
        total = size + updates * metrics
        bench.server.wait_for(lambda s: s.rows.get(name, 0) >= total or proc.poll() is not None, timeout=600)
        phase_cpu = sampler.sample() - backlog_cpu
        phase_hits = bench.server.of(name, mark)
        run = bench.finish("livesend", started)
        data = [h for h in phase_hits if h.type == "data"]
        events = sum(1 for h in data if h.docs)
        result = {
            "rows": size, "delivered": ok and run.rows >= total,
            "backlog_s": last - began_wall,
            "first_request_s": min((h.time for h in backlog_hits), default=last) - began_wall,
            "backlog_requests": sum(1 for h in backlog_hits if h.type == "data"),
            "backlog_cpu_s": backlog_cpu, "peak_rss": backlog_rss, "peak_rss_run": run.livesend_peak_rss,
            "updates": events, "cpu_per_update_ms": 1000 * phase_cpu / events if events else None,
            "bytes_per_request": statistics.mean(h.size for h in data) if data else None,
            "bytes_metrics_post": statistics.mean([h.size for h in data if h.docs] or [0]),
            "bytes_plots_post": statistics.mean([h.size for h in data if not h.docs] or [0]),
        }
        sending = result["backlog_s"] - result["first_request_s"]  # from the first request to the last row
        result["backlog_rps"] = result["backlog_requests"] / sending if sending > 0 else None
        result["backlog_rows_per_s"] = size / sending if sending > 0 else None
        out.append(result)
        say(f"  {size:>9} rows of history: backlog {result['backlog_s']:.2f} s, {result['backlog_requests']} requests, "
            f"peak RSS {backlog_rss / 2**20:.1f} MB; {events} updates at "
            f"{fmt(result['cpu_per_update_ms'], '.2f')} ms CPU each")
    return out


def idle(bench: Bench, seconds: float) -> dict:
    repo = bench.repos["livesend"]
    ready = repo / ".ready"
    ready.unlink(missing_ok=True)
    started = bench.start("livesend", "idle", ["idle", "--sleep", str(seconds + 8), "--ready", str(ready)])
    name, proc, sampler, _, _, _ = started
    bench.server.wait_for(lambda s: s.rows.get(name, 0) >= 3 or proc.poll() is not None, timeout=60)
    bench.server.wait_for(lambda s: ready.exists() or proc.poll() is not None, timeout=60)
    # the 3 rows and the last metrics.json are delivered: from here nothing changes until the sleep ends
    bench.server.wait_for(lambda s: any(h.docs and h.time > float(ready.read_text()) for h in s.of(name))
                          or proc.poll() is not None, timeout=10)
    t0, cpu0 = time.perf_counter(), sampler.sample()
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    t1, cpu1 = time.perf_counter(), sampler.sample()
    still_running = proc.poll() is None
    run = bench.finish("livesend", started)
    return {"seconds": t1 - t0, "cpu_s": cpu1 - cpu0, "percent": 100 * (cpu1 - cpu0) / (t1 - t0),
            "window_inside_sleep": still_running, "requests": run.requests}


# --- statistics and the report -------------------------------------------------------------------------


def percentile(values: list, p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from importlib.metadata import version

    import livesend

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
        "dvclive": version("dvclive"), "dvc_studio_client": version("dvc-studio-client"),
        "livesend": f"{livesend.__version__} ({commit or 'no git'})", "load": os.getloadavg(),
    }


def ratio_rows(over: dict) -> list:
    rows = []
    for n, runs in over.items():
        def median(key, variant):
            return statistics.median(key(r) for r in runs[variant])

        med = {v: median(lambda r: r.timing["total"], v) for v in VARIANTS}
        cpu = {v: median(lambda r: r.cpu, v) for v in VARIANTS}
        wall = {v: median(lambda r: r.wall, v) for v in VARIANTS}
        base = [r.timing["total"] for r in runs["none"]]
        rows.append({
            "n": n, "rounds": len(base), "seconds": med, "ratio": {v: med[v] / med["none"] for v in VARIANTS},
            "paired": {v: statistics.median(r.timing["total"] / b.timing["total"] for r, b in zip(runs[v], runs["none"]))
                       for v in VARIANTS},
            "noise": (max(base) - min(base)) / med["none"] if len(base) > 1 else None,
            "load": max(r.load for v in VARIANTS for r in runs[v]),
            "cpu": cpu, "cpu_ratio": {v: cpu[v] / cpu["none"] for v in VARIANTS},
            "wall": wall, "wall_ratio": {v: wall[v] / wall["none"] for v in VARIANTS},
            "requests": {v: median(lambda r: r.requests, v) for v in VARIANTS},
            "rows": {v: min(r.rows for r in runs[v]) for v in VARIANTS},
            "livesend_cpu": median(lambda r: r.livesend_cpu or 0.0, "livesend"),
            "livesend_cpu_during": median(lambda r: r.timing.get("parent_cpu", float("nan")), "livesend"),
            "server_cpu": {v: median(lambda r: r.server_cpu, v) for v in VARIANTS},
        })
    return rows


def overhead_report(results: dict, args) -> list:
    o = results["overhead_params"]
    table = ratio_rows(results["overhead"])
    lines = [
        "## 1. Training overhead", "",
        f"The same real DVCLive loop: N steps x {o['metrics']} metrics (`log_metric` each, then `next_step()`), "
        f"{o['work']:,} multiply-adds of Python per step as the fixed work, run three ways: no Studio; DVCLive's own "
        f"posting; livesend (`--interval {args.interval:g}`) wrapping it, DVCLive's posting off. Interleaved rounds, "
        "medians. Ratio = median / median of no Studio; paired = median over rounds of the ratio within one round.", "",
        "**Training time**: measured inside the training process, from `Live()` to the end of `end()` (with "
        "DVCLive's own posting, `end()` waits for its queue and sends `done`). Noise = (max - min) / median of the "
        "no-Studio runs; load = the highest 1-minute load average at the end of a run (2 = both cores busy).", "",
        "| N | rounds | no Studio (s) | DVCLive's own (s) | ratio | paired | livesend (s) | ratio | paired | noise | "
        "load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        s, r, p = row["seconds"], row["ratio"], row["paired"]
        lines.append(f"| {row['n']:,} | {row['rounds']} | {s['none']:.2f} | {s['dvclive']:.2f} | {pct(r['dvclive'])} | "
                     f"{pct(p['dvclive'])} | {s['livesend']:.2f} | {pct(r['livesend'])} | {pct(p['livesend'])} | "
                     f"{fmt(row['noise'], '.1%')} | {row['load']:.1f} |")
    lines += [
        "", "**CPU time** (user + system, from the kernel's accounting of the finished command; hardly moved by "
        "other load): the training process (every thread: DVCLive's posting thread is in it), plus livesend's own "
        "process when it wraps the command. This is what the Studio posting takes from the machine: on a machine "
        "with no spare core it is what the training would lose. livesend's own CPU is given whole (with its start-up "
        "before the command and its report after it) and while the training ran (read from the kernel by the training "
        "process at its start and end), each as a share of the no-Studio training time. Server = CPU of the bench process meanwhile, nearly all of it the loopback "
        "Studio answering (a real Studio is elsewhere; on this 2-core machine it competes with the training). "
        "Command time = the whole command as the CI job sees it (livesend: also its start-up and its flush after "
        "the command).", "",
        "| N | no Studio CPU (s) | DVCLive's own CPU (s) | ratio | livesend + training CPU (s) | ratio | "
        "livesend alone (s) | livesend alone / training time | livesend while training (s) | "
        "livesend while training / training time | server: DVCLive (s) | server: livesend (s) | "
        "command: DVCLive | command: livesend |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        c, cr, w, sv = row["cpu"], row["cpu_ratio"], row["wall_ratio"], row["server_cpu"]
        lines.append(f"| {row['n']:,} | {c['none']:.2f} | {c['dvclive']:.2f} | {pct(cr['dvclive'])} | "
                     f"{c['livesend']:.2f} | {pct(cr['livesend'])} | {row['livesend_cpu']:.2f} | "
                     f"{row['livesend_cpu'] / row['seconds']['none']:.2%} | {row['livesend_cpu_during']:.2f} | "
                     f"{row['livesend_cpu_during'] / row['seconds']['none']:.2%} | {sv['dvclive']:.2f} | {sv['livesend']:.2f} | "
                     f"{pct(w['dvclive'])} | {pct(w['livesend'])} |")
    lines += ["", "Requests made and plot rows delivered (every row of every run must arrive):", "",
              "| N | DVCLive's own: requests | rows | livesend: requests | rows | rows logged |",
              "|---|---|---|---|---|---|"]
    for row in table:
        q, rw = row["requests"], row["rows"]
        lines.append(f"| {row['n']:,} | {q['dvclive']:.0f} | {rw['dvclive']:,} | {q['livesend']:.0f} | "
                     f"{rw['livesend']:,} | {row['n'] * o['metrics']:,} |")
    lines.append("")
    return lines


def pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def report(results: dict, args, command: str, seconds: float, load_end: tuple) -> str:
    m = results["machine"]
    lines = [
        "# livesend benchmark", "",
        f"Command: `{command}` (took {seconds / 60:.1f} min)", "",
        "## Machine", "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_gb']:.1f} GiB; {m['os']}",
        f"- Python {m['python']}; dvclive {m['dvclive']}; dvc-studio-client {m['dvc_studio_client']}; "
        f"livesend {m['livesend']}",
        f"- load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in m['load'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in load_end)}"
        + (" - **the machine was loaded** (other processes competing for its cores): expect noise"
           if max(m["load"][0], load_end[0]) > 0.7 * (m["cores"] or 1) else ""),
        "",
    ]
    if "overhead" in results:
        lines += overhead_report(results, args)
    if "freshness" in results:
        f = results["freshness_params"]
        lines += [
            "## 2. Freshness", "",
            f"{f['steps']} steps x ({f['metrics']} metrics + the wall clock `t`), {f['work']:,} multiply-adds per step, "
            f"{f['rounds']} round(s) each. Latency = arrival at the server - the value of `t` (the time it was logged).", "",
            "| sender | clock rows arrived | p50 (s) | p95 (s) | max (s) |", "|---|---|---|---|---|",
        ]
        for variant, runs in results["freshness"].items():
            lat = [x for r in runs for x in r.latencies]
            logged = f["steps"] * len(runs)
            label = LABEL[variant] + (f" (`--interval {args.interval:g}`)" if variant == "livesend" else "")
            lines.append(f"| {label} | {len(lat)} of {logged} | {percentile(lat, 50):.3f} | "
                         f"{percentile(lat, 95):.3f} | {max(lat, default=float('nan')):.3f} |")
        lines.append("")
    if "scaling" in results:
        s = results["scaling_params"]
        lines += [
            "## 3. Scaling", "",
            f"Resumed runs: the TSVs ({s['metrics']} metrics) already hold the history when livesend starts "
            f"(`Live(resume=True)`). livesend delivers the backlog, then the run appends one row per metric every "
            f"{s['period']:g} s, {s['updates']} times, with livesend at `--interval {s['interval']:g}` (a shorter "
            "interval than the default only to have more updates to average over; the cost of one update does not "
            "depend on it). Peak RSS is the kernel's high-water mark (VmHWM) of the livesend process; CPU is "
            "psutil's user + system time of the livesend process (not the command).", "",
            "Backlog time runs from livesend's start to the arrival of the last row; the first request goes out "
            "after livesend's start-up and its first look at the directory (which, when nothing changes in it, is "
            "the 2 s safety poll); requests/s and rows/s are over the time from the first request to the last row.", "",
            "| history (rows) | backlog delivered in (s) | first request at (s) | requests | requests/s | rows/s | "
            "peak RSS (MB) | updates | CPU per update (ms) | bytes/request | metrics POST (B) | plots POST (B) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["scaling"]:
            lines.append(
                f"| {r['rows']:,} | {r['backlog_s']:.2f} | {r['first_request_s']:.2f} | {r['backlog_requests']} | {fmt(r['backlog_rps'], '.1f')} | "
                f"{fmt(r['backlog_rows_per_s'], ',.0f')} | {r['peak_rss'] / 2**20:.1f} | {r['updates']} | "
                f"{fmt(r['cpu_per_update_ms'])} | {fmt(r['bytes_per_request'], ',.0f')} | "
                f"{r['bytes_metrics_post']:,.0f} | {r['bytes_plots_post']:,.0f} |"
                + ("" if r["delivered"] else " **not all rows delivered** |"))
        lines.append("")
    if "idle" in results:
        i = results["idle"]
        lines += [
            "## 4. Idle cost", "",
            f"livesend while the command sleeps with nothing changing (after its output was delivered): "
            f"{i['cpu_s']:.3f} s of CPU in {i['seconds']:.1f} s = **{i['percent']:.3f}% of one core**"
            + ("" if i["window_inside_sleep"] else " (the window was not entirely inside the sleep)"), "",
        ]
    if "baseline" in results:
        b = results["baseline_params"]
        runs = results["baseline"]
        med = {w: statistics.median(r.timing["total"] for r in runs[w]) for w in runs}
        cpu = {w: statistics.median(r.cpu for r in runs[w]) for w in runs}
        lines += [
            "## 5. Baseline: DVCLive's own no-Studio path", "",
            f"With Studio off, DVCLive still parses every TSV at every `next_step()` and queues the whole parsed "
            f"history to a thread that drops it (dvclive {results['machine']['dvclive']}: `Live.post_data_to_studio`). "
            f"With its posting on it queues only the rows not yet sent. The same loop ({b['steps']:,} steps x "
            f"{b['metrics']} metrics, {b['work']:,} multiply-adds per step, no Studio), as it is and with that queue "
            f"left out (the parse kept), {b['rounds']} interleaved round(s):", "",
            "| DVCLive, no Studio | training time (s) | CPU (s) |", "|---|---|---|",
            f"| as it is (the overhead section's baseline; livesend's training runs this path) | {med['as-is']:.2f} | {cpu['as-is']:.2f} |",
            f"| without the idle queue | {med['lean']:.2f} | {cpu['lean']:.2f} |",
            f"| the queue's cost | {pct(med['as-is'] / med['lean'])} | {pct(cpu['as-is'] / cpu['lean'])} |", "",
        ]
    lines += ["## Targets (issue 6)", "", "| target | result | met |", "|---|---|---|"]
    lines += [f"| {t} | {r} | {'yes' if ok else '**no**'} |" for t, r, ok in targets(results, args)]
    lines.append("")
    return "\n".join(lines)


def targets(results: dict, args) -> list:
    out = []
    if "overhead" in results:
        for row in ratio_rows(results["overhead"]):
            n, ls, dv = row["n"], row["ratio"]["livesend"], row["ratio"]["dvclive"]
            share = row["livesend_cpu_during"] / row["seconds"]["none"]
            whole = row["livesend_cpu"] / row["seconds"]["none"]
            out.append((f"N={n:,}: livesend overhead <= 1% (training time)",
                        f"{pct(ls)} (paired {pct(row['paired']['livesend'])}; noise {fmt(row['noise'], '.0%')})",
                        ls <= 1.01))
            out.append((f"N={n:,}: livesend overhead <= 1% (CPU: livesend's while the training ran / training time)",
                        f"{share:.2%} (with its start-up and report: {whole:.2%})", share <= 0.01))
            if n >= 1000:
                cls, cdv = row["cpu_ratio"]["livesend"], row["cpu_ratio"]["dvclive"]
                out.append((f"N={n:,}: livesend below DVCLive's own (training time; CPU)",
                            f"{pct(ls)} vs {pct(dv)}; {pct(cls)} vs {pct(cdv)}", ls < dv and cls < cdv))
    if "freshness" in results:
        lat = [x for r in results["freshness"]["livesend"] for x in r.latencies]
        p95 = percentile(lat, 95)
        out.append((f"freshness p95 <= interval + 0.5 s = {args.interval + 0.5:g} s", f"{p95:.3f} s",
                    p95 <= args.interval + 0.5))
    if "scaling" in results:
        rows = results["scaling"]
        first, last = rows[0], rows[-1]
        if first["cpu_per_update_ms"] and last["cpu_per_update_ms"]:
            k = last["cpu_per_update_ms"] / first["cpu_per_update_ms"]
            out.append((f"CPU per update at {last['rows']:,} rows within 2x of {first['rows']:,}",
                        f"{last['cpu_per_update_ms']:.2f} vs {first['cpu_per_update_ms']:.2f} ms ({k:.2f}x)", k <= 2))
        out.append((f"{last['rows']:,}-row backlog in under 60 s", f"{last['backlog_s']:.1f} s",
                    last["backlog_s"] < 60 and last["delivered"]))
        out.append((f"{last['rows']:,}-row backlog: peak RSS under 100 MB", f"{last['peak_rss'] / 2**20:.1f} MB",
                    last["peak_rss"] < 100 * 2**20))
    if "idle" in results:
        out.append(("idle CPU under 0.5% of one core", f"{results['idle']['percent']:.3f}%",
                    results["idle"]["percent"] < 0.5))
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N everywhere: checks that it works (CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--steps", help="N for the overhead section (default 1000,5000,20000)")
    parser.add_argument("--metrics", type=int, default=2, help="M metrics per step (default 2: DVCLive re-reads every TSV at every step, so the no-Studio loop itself is quadratic in N; see docs/performance.md)")
    parser.add_argument("--work", type=int, default=20_000, help="CPU work per step: multiply-adds (default 20000)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per N (default 3)")
    parser.add_argument("--long-repeats", type=int, help="rounds for N >= 20000 (default 1: each run takes minutes)")
    parser.add_argument("--order", choices=("fixed", "rotate"), default="fixed",
                        help="fixed: A B C, A B C, ...; rotate: A B C, B C A, C A B, ... (default fixed)")
    parser.add_argument("--interval", type=float, default=1.0, help="livesend's --interval (default 1, its default)")
    parser.add_argument("--sizes", help="history sizes in rows for the scaling section (default 1000,...,1000000)")
    parser.add_argument("--idle-seconds", type=float, help="length of the idle window (default 30)")
    parser.add_argument("--out", help="Markdown report file (default bench/results/bench-<time>.md)")
    args = parser.parse_args(argv)
    q = args.quick
    steps = [int(x) for x in (args.steps or ("100" if q else "1000,5000,20000")).split(",")]
    repeats = args.repeats or (1 if q else 3)
    long_repeats = args.long_repeats or 1
    sizes = [int(x) for x in (args.sizes or ("1000,10000" if q else "1000,10000,100000,1000000")).split(",")]
    idle_seconds = args.idle_seconds or (2.0 if q else 30.0)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    began = time.perf_counter()
    results: dict = {"machine": machine()}
    with BenchServer() as server, tempfile.TemporaryDirectory(prefix="livesend-bench-") as tmp:
        bench = Bench(server, Path(tmp), args.interval)
        if not q:  # warm up: DVC initialises the repositories, file caches fill; not counted
            for variant in VARIANTS:
                bench.run(variant, "warmup", ["train", "--steps", "20", "--metrics", str(args.metrics)])
        if "overhead" in sections:
            say("1. training overhead")
            results["overhead_params"] = {"metrics": args.metrics, "work": args.work}
            results["overhead"] = overhead(bench, steps, args.metrics, args.work, repeats, long_repeats,
                                           args.order == "rotate")
        if "freshness" in sections:
            say("2. freshness")
            f = {"steps": 40 if q else 400, "metrics": args.metrics, "work": 500_000, "rounds": 1 if q else 2}
            results["freshness_params"] = f
            results["freshness"] = freshness(bench, f["steps"], f["metrics"], f["work"], f["rounds"])
        if "scaling" in sections:
            say("3. scaling")
            s = {"metrics": args.metrics, "updates": 20 if q else 100, "period": 0.1, "interval": 0.25}
            results["scaling_params"] = s
            results["scaling"] = scaling(bench, sizes, s["metrics"], s["updates"], s["period"], s["interval"])
        if "idle" in sections:
            say("4. idle cost")
            results["idle"] = idle(bench, idle_seconds)
        if "baseline" in sections:
            say("5. baseline: DVCLive's own no-Studio path")
            b = {"steps": 200 if q else 5000, "metrics": args.metrics, "work": args.work, "rounds": 1 if q else 2}
            results["baseline_params"] = b
            results["baseline"] = baseline(bench, b["steps"], b["metrics"], b["work"], b["rounds"])
        if server.invalid:
            say(f"bench: the server refused {len(server.invalid)} bodies: {server.invalid[0].error}")
    seconds = time.perf_counter() - began
    text = report(results, args, command, seconds, os.getloadavg())
    print(text)
    out = Path(args.out) if args.out else RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, default=lambda o: asdict(o), indent=1) + "\n")
    say(f"report written to {out}")
    return 1 if server.invalid else 0
