"""Hostile and broken input in the DVCLive directory, next to a real DVCLive training: each problem is
one clear warning, said once, and everything else keeps flowing."""

from __future__ import annotations

import base64
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import harness
import psutil
from conftest import EXAMPLES
from dvclive_files import received_state

PRODUCER = f"""
import os, pathlib, runpy, sys
sys.argv = ['train.py', '--epochs', '8', '--image-every', '2']
runpy.run_path({str(EXAMPLES / 'train.py')!r}, run_name='__main__')
"""


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def png(size: int) -> bytes:
    """Bytes that end like a PNG (what livesend checks for completeness)."""
    return b"\x89PNG\r\n\x1a\n" + os.urandom(max(0, size - 20)) + b"IEND\xaeB`\x82"


def hostile_tree(repo: Path, outside: Path) -> None:
    """Everything odd a DVCLive directory can hold, written before the training appends to it."""
    metrics, images = repo / "extra" / "plots" / "metrics", repo / "extra" / "plots" / "images"
    write(metrics / "garbage.tsv", b"step\tx\n" + bytes(range(256)) * 20 + b"\n0\t1\n")
    write(metrics / "header_change.tsv", "step\tx\n0\t1\n1\t2\ntimestamp\tstep\tx\n123\t2\t3\n")
    write(metrics / "text.tsv", "step\tlabel\n0\tabc\n1\tnan\n2\t-inf\n")
    write(metrics / "with space.tsv", "step\tv\n0\t1\n")
    write(metrics / "ünïcødé.tsv", "step\tv\n0\t2\n")
    write(metrics / "new\nline.tsv", "step\tv\n0\t3\n")
    write(metrics.joinpath(*["deep"] * 60, "deep.tsv"), "step\tv\n0\t4\n")
    write(outside / "secret.tsv", "step\tv\n0\t424242\n")
    os.symlink(outside / "secret.tsv", metrics / "outside.tsv")
    os.symlink(outside, metrics / "outside_dir")
    write(metrics / "inside_link_target.tsv", "step\tv\n0\t5\n")
    os.symlink(metrics / "inside_link_target.tsv", metrics / "inside_link.tsv")
    write(images / "big.png", png(10_500_000))
    write(images / "small.png", png(2_000))
    write(repo / "extra" / "metrics.json", '{"step": 0, "never": ')  # stays invalid all run
    write(repo / "extra" / "params.yaml", "lr: 0.1\n")


def test_hostile_files_warn_once_and_everything_else_flows(studio, repo, tmp_path):
    outside = tmp_path / "outside"
    hostile_tree(repo, outside)
    (repo / "produce.py").write_text(PRODUCER)
    outcome = harness.run(repo, studio.url, [sys.executable, "produce.py"], "--dir", "dvclive", "--dir", "extra",
                          "--name", "h", "--interval", "0.1")
    # the real training's directory is untouched by its neighbour's problems
    harness.check(outcome, studio, live_dir="dvclive", name="h-dvclive")
    got = received_state(studio.accepted, "h-extra")
    plots = got["plots"]
    assert plots["extra/plots/metrics/header_change.tsv"] == [
        {"step": 0, "x": 1.0}, {"step": 1, "x": 2.0}, {"timestamp": "123", "step": 2, "x": 3.0},
    ]
    assert plots["extra/plots/metrics/text.tsv"] == [
        {"step": 0, "label": "abc"}, {"step": 1, "label": "nan"}, {"step": 2, "label": "-inf"},
    ]
    assert plots["extra/plots/metrics/with space.tsv"] == [{"step": 0, "v": 1.0}]
    assert plots["extra/plots/metrics/ünïcødé.tsv"] == [{"step": 0, "v": 2.0}]
    assert plots["extra/plots/metrics/new\nline.tsv"] == [{"step": 0, "v": 3.0}]
    assert plots["extra/plots/metrics/" + "deep/" * 60 + "deep.tsv"] == [{"step": 0, "v": 4.0}]
    assert plots["extra/plots/metrics/inside_link.tsv"] == [{"step": 0, "v": 5.0}]
    assert plots["extra/plots/metrics/garbage.tsv"][-1] == {"step": 0, "x": 1.0}  # garbage did not stop the file
    # never uploaded: a file outside the repository, an image over Studio's 10 MB limit
    assert not any("outside" in key for key in plots)
    assert all("424242" not in str(body) for body in studio.accepted)
    assert "424242" not in str(outcome.report)  # nor in the report (job summary, PR comment)
    assert set(got["images"]) == {"extra/plots/images/small.png"}
    assert got["images"]["extra/plots/images/small.png"] == base64.b64encode((repo / "extra/plots/images/small.png").read_bytes()).decode()
    # the invalid metrics.json was never sent; the params were
    assert got["metrics"] == {}
    assert got["params"] == {"extra/params.yaml": {"lr": 0.1}}
    assert studio.count("done", "h-extra") == 1
    # each problem: one warning, once
    for text in ("outside.tsv links outside", "outside_dir links outside", "big.png is 10.5 MB",
                 "extra/metrics.json is not valid yet", "header of extra/plots/metrics/header_change.tsv changed"):
        assert len(outcome.lines(text)) == 1, (text, outcome.stderr)
    assert "Traceback" not in outcome.stderr


def test_unreadable_files_are_skipped_with_one_warning(studio, repo):
    """Run livesend without root's permission override (capsh drops it), as a CI runner user would be."""
    metrics = repo / "extra" / "plots" / "metrics"  # not dvclive/: DVCLive's fresh start would delete it
    locked = write(metrics / "locked.tsv", "step\tv\n0\t1\n")
    write(metrics / "ok.tsv", "step\tv\n0\t2\n")
    locked.chmod(0)
    (repo / "produce.py").write_text(PRODUCER)
    capsh = shutil.which("capsh")
    assert capsh, "capsh (Debian package libcap2-bin) is needed"
    (repo / ".wrapper.py").write_text(harness.WRAPPER)
    env = harness.clean_env(STUDIO_ENDPOINT=studio.url, STUDIO_TOKEN=harness.TOKEN)
    command = (f"exec {sys.executable} -m livesend run --record .record.jsonl --report-json .report.json "
               f"--interval 0.1 --name u --dir dvclive --dir extra -- {sys.executable} .wrapper.py {sys.executable} produce.py")
    proc = harness.subprocess.Popen(
        [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", command], cwd=repo, env=env,
        stdout=harness.subprocess.PIPE, stderr=harness.subprocess.PIPE, text=True,
    )
    outcome = harness.finish(proc, repo)
    assert outcome.returncode == 0, outcome.stderr
    assert len(outcome.lines("cannot read extra/plots/metrics/locked.tsv")) == 1, outcome.stderr
    assert "Permission denied" in outcome.lines("locked.tsv")[0]
    extra = received_state(studio.accepted, "u-extra")
    assert extra["plots"] == {"extra/plots/metrics/ok.tsv": [{"step": 0, "v": 2.0}]}
    harness.check(outcome, studio, name="u-dvclive")


def test_file_deleted_and_recreated_is_sent_again_from_its_first_row(studio, repo):
    script = repo / "recreate.py"
    script.write_text(
        "import pathlib, time\n"
        "p = pathlib.Path('dvclive/plots/metrics'); p.mkdir(parents=True)\n"
        "(p / 'keep.tsv').write_text('step\\tv\\n0\\t1\\n')\n"
        "(p / 'again.tsv').write_text('step\\tv\\n0\\t10\\n1\\t11\\n')\n"
        "while not pathlib.Path('go').exists(): time.sleep(0.01)\n"
        "(p / 'again.tsv').unlink()\n"
        "(p / 'again.tsv').write_text('step\\tv\\n0\\t20\\n')\n"
        "with (p / 'keep.tsv').open('a') as f: f.write('1\\t2\\n')\n"
    )
    proc = harness.start(repo, studio.url, [sys.executable, "recreate.py"], "--interval", "0.1")
    assert studio.wait_for(lambda s: len(received_state(s.accepted)["plots"].get("dvclive/plots/metrics/again.tsv", [])) == 2)
    (repo / "go").touch()
    outcome = harness.finish(proc, repo)
    assert outcome.returncode == 0
    plots = received_state(studio.accepted)["plots"]
    assert plots["dvclive/plots/metrics/again.tsv"] == [{"step": 0, "v": 10.0}, {"step": 1, "v": 11.0}, {"step": 0, "v": 20.0}]
    assert plots["dvclive/plots/metrics/keep.tsv"] == [{"step": 0, "v": 1.0}, {"step": 1, "v": 2.0}]
    assert studio.count("start") == 1  # one file re-created is not a fresh DVCLive run
    assert len(outcome.lines("again.tsv was re-created")) == 1


def test_directory_replaced_by_a_file(studio, repo):
    script = repo / "replace.py"
    script.write_text(
        "import pathlib, shutil, time\n"
        "p = pathlib.Path('dvclive/plots/metrics'); p.mkdir(parents=True)\n"
        "(p / 'loss.tsv').write_text('step\\tloss\\n0\\t1\\n')\n"
        "while not pathlib.Path('go').exists(): time.sleep(0.01)\n"
        "shutil.rmtree('dvclive'); pathlib.Path('dvclive').write_text('not a directory')\n"
        "while not pathlib.Path('go2').exists(): time.sleep(0.01)\n"
    )
    proc = harness.start(repo, studio.url, [sys.executable, "replace.py"], "--interval", "0.1", "--name", "r")
    assert studio.wait_for(lambda s: s.count("data") >= 1)
    (repo / "go").touch()
    assert studio.wait_for(lambda s: s.count("done") == 1)  # the run it held ended with it
    (repo / "go2").touch()
    outcome = harness.finish(proc, repo)
    assert outcome.returncode == 0
    assert len(outcome.lines("dvclive is not a directory")) == 1
    assert received_state(studio.accepted)["plots"]["dvclive/plots/metrics/loss.tsv"] == [{"step": 0, "loss": 1.0}]
    harness.assert_no_token(outcome, studio)


def test_500_metric_files_and_300_images(studio, repo):
    script = repo / "many.py"
    script.write_text(
        "import os, pathlib\n"
        "m = pathlib.Path('dvclive/plots/metrics'); i = pathlib.Path('dvclive/plots/images')\n"
        "for n in range(500):\n"
        "    f = m / f'group{n % 7}' / f'metric{n}.tsv'; f.parent.mkdir(parents=True, exist_ok=True)\n"
        "    f.write_text('step\\tv\\n' + ''.join(f'{s}\\t{n + s}\\n' for s in range(3)))\n"
        "i.mkdir(parents=True)\n"
        "for n in range(300):\n"
        "    (i / f'img{n}.png').write_bytes(b'\\x89PNG' + os.urandom(30000) + b'IEND\\xaeB`\\x82')\n"
    )
    outcome = harness.run(repo, studio.url, [sys.executable, "many.py"], "--interval", "0.1")
    harness.check(outcome, studio)
    got = received_state(studio.accepted)
    assert len(got["plots"]) == 500 and sum(len(v) for v in got["plots"].values()) == 1500
    assert len(got["images"]) == 300
    assert max(len(b.get("plots", {})) for b in studio.accepted) <= 200


def test_one_gigabyte_tsv_is_streamed_with_bounded_memory(studio, repo):
    metrics = repo / "extra" / "plots" / "metrics"
    metrics.mkdir(parents=True)
    huge = metrics / "huge.tsv"
    with huge.open("wb") as f:  # a sparse 1 GB line (no disk used), then a normal row
        f.write(b"step\tv\n")
        f.truncate(1 << 30)
        f.seek(1 << 30)
        f.write(b"\n1\t2\n")
    (repo / "produce.py").write_text(PRODUCER)
    proc = harness.start(repo, studio.url, [sys.executable, "produce.py"], "--interval", "0.1", "--name", "g",
                         "--dir", "dvclive", "--dir", "extra")
    peak = {"rss": 0}
    watcher = psutil.Process(proc.pid)

    def sample():
        while proc.poll() is None:
            try:
                peak["rss"] = max(peak["rss"], watcher.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outcome = harness.finish(proc, repo)
    sampler.join()
    assert outcome.returncode == 0, outcome.stderr
    print(f"1 GiB TSV: livesend peak RSS {peak['rss'] / 2**20:.1f} MB")
    assert peak["rss"] < 100 * 2**20, f"peak RSS {peak['rss'] / 2**20:.0f} MB"
    rows = received_state(studio.accepted, "g-extra")["plots"]["extra/plots/metrics/huge.tsv"]
    assert [r["step"] for r in rows[1:]] == [1]  # the cut giant line, then the row after it
    assert len(rows[0]["step"]) <= 1_000_000
    assert len(outcome.lines("huge.tsv is over")) == 1
    harness.check(outcome, studio, name="g-dvclive")
