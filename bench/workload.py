"""The command the benchmark runs: a real DVCLive training loop (and its variants for the scaling and
idle sections). It never talks to Studio itself unless DVCLive's own posting is switched on in its
environment; it writes how long its parts took to a JSON file.

    python bench/workload.py train  --steps N --metrics M --work W [--clock] [--parent-cpu] [--lean] --timing FILE
    python bench/workload.py resume --metrics M --updates U --period S --go FILE --timing FILE
    python bench/workload.py idle   --sleep S --timing FILE
"""

from __future__ import annotations

import argparse
import json
import os
import time

from dvclive import Live


def burn(n: int) -> int:
    """A fixed amount of CPU work (n multiply-adds in the interpreter): the 'training' of one step."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def parent_cpu() -> float:
    """CPU seconds (user + system, every thread) of this process's parent so far: livesend, when it wraps
    the training. Read at the training's start and end, it gives what livesend spent while the training ran."""
    with open(f"/proc/{os.getppid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def without_the_idle_queue() -> None:
    """DVCLive with Studio off still parses every TSV at every step and queues the *whole* parsed history
    to a thread that drops it (dvclive 3.49: `Live.post_data_to_studio`). This keeps the parse and drops the
    queue, to measure what the queue alone costs (the benchmark's `baseline` section)."""
    Live.post_data_to_studio = lambda self: self._get_live_data()


def train(args) -> dict:
    if args.lean:
        without_the_idle_queue()
    before = parent_cpu() if args.parent_cpu else None
    t0 = time.perf_counter()
    with Live("dvclive", save_dvc_exp=False) as live:
        live.log_params({"steps": args.steps, "metrics": args.metrics, "work": args.work})
        t1 = time.perf_counter()
        for step in range(args.steps):
            burn(args.work)
            for m in range(args.metrics):
                live.log_metric(f"train/m{m}", step * 0.001 + m)
            if args.clock:
                live.log_metric("t", time.time())  # the wall clock when the value was logged
            live.next_step()
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    cpu = os.times()  # this process's CPU so far, every thread (DVCLive's posting thread too), imports included
    out = {"init": t1 - t0, "loop": t2 - t1, "end": t3 - t2, "total": t3 - t0, "cpu": cpu.user + cpu.system}
    if before is not None:
        out["parent_cpu"] = parent_cpu() - before
    return out


def resume(args) -> dict:
    """A resumed run: the TSVs already hold the history. Wait for `--go` (the bench creates it once
    livesend has delivered the backlog), then append one row per metric every `--period` seconds."""
    with Live("dvclive", save_dvc_exp=False, resume=True) as live:
        while not os.path.exists(args.go):  # the bench's signal; bounded by the bench's own timeout
            time.sleep(0.05)
        t0 = time.perf_counter()
        step = live.step
        for _ in range(args.updates):
            step += 1
            live.step = step  # as a loop that logs and writes the summary itself (no per-step re-parse)
            for m in range(args.metrics):
                live.log_metric(f"train/m{m}", step * 0.001 + m)
            live.make_summary()
            time.sleep(args.period)
        return {"phase": time.perf_counter() - t0}


def idle(args) -> dict:
    with Live("dvclive", save_dvc_exp=False) as live:
        for step in range(3):
            live.log_metric("train/m0", step)
            live.next_step()
        with open(args.ready, "w") as f:
            f.write(repr(time.time()))
        time.sleep(args.sleep)
    return {"sleep": args.sleep}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "resume", "idle"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--metrics", type=int, default=5)
    parser.add_argument("--work", type=int, default=0)
    parser.add_argument("--clock", action="store_true")
    parser.add_argument("--parent-cpu", action="store_true", help="measure the parent's (livesend's) CPU meanwhile")
    parser.add_argument("--lean", action="store_true", help="DVCLive without its no-Studio queue (see above)")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--period", type=float, default=0.1)
    parser.add_argument("--go", default="go")
    parser.add_argument("--ready", default="ready")
    parser.add_argument("--sleep", type=float, default=30.0)
    parser.add_argument("--timing", required=True)
    args = parser.parse_args()
    result = {"train": train, "resume": resume, "idle": idle}[args.mode](args)
    with open(args.timing, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
