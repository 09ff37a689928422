"""Unit tests of livesend.reader: torn-write-safe TSV tails, documents, images and directory scans."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
from pathlib import Path

import pytest
from dvc_studio_client.schema import SCHEMAS_BY_TYPE
from PIL import Image

from livesend import reader, studio
from livesend.reader import Document, Stamp, TsvTail, Warnings

# --- helpers ----------------------------------------------------------------------------------------


def tail(path: Path) -> TsvTail:
    return TsvTail(str(path), "dvclive/plots/metrics/" + path.name, Warnings())


def rows(chunk) -> list:
    return [dict(zip(columns, fields)) for columns, fields in chunk.rows] if chunk else []


def take(t: TsvTail, budget: int = reader.READ_BUDGET) -> list:
    """Read and acknowledge everything complete (what a successful send does)."""
    chunk = t.read(budget)
    if chunk is not None and chunk.rows:
        t.ack(chunk.ends[-1], len(chunk.rows))
    return rows(chunk)


def append(path: Path, data: str | bytes) -> None:
    with open(path, "ab") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def warnings_of(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- TSV tails --------------------------------------------------------------------------------------


def test_only_complete_lines_are_handed_on(tmp_path):
    path = tmp_path / "loss.tsv"
    append(path, "step\tlo")
    t = tail(path)
    assert t.read() is None and t.header is None  # a partial header is not a header
    append(path, "ss\n0\t0.5\n1\t0.")
    assert take(t) == [{"step": "0", "loss": "0.5"}]
    assert take(t) == []  # the partial row stays on disk for later
    append(path, "25\n2\t0.1")
    assert take(t) == [{"step": "1", "loss": "0.25"}]
    append(path, "\n")
    assert take(t) == [{"step": "2", "loss": "0.1"}]
    assert t.offset == path.stat().st_size and t.rows_acked == 3


def test_ends_are_byte_offsets_after_each_row(tmp_path):
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n0\t1\n10\t2.5\n")
    chunk = tail(path).read()
    assert chunk.ends == [len("step\tm\n0\t1\n"), len("step\tm\n0\t1\n10\t2.5\n")]
    assert chunk.max_step == 10 and chunk.header == ["step", "m"] and not chunk.more


def test_crlf_lines(tmp_path):
    path = tmp_path / "win.tsv"
    append(path, b"timestamp\tstep\tacc\r\n1795673812493\t0\t0.5\r\n1795673812534\t1\t0.75\r\n")
    t = tail(path)
    assert take(t) == [
        {"timestamp": "1795673812493", "step": "0", "acc": "0.5"},
        {"timestamp": "1795673812534", "step": "1", "acc": "0.75"},
    ]
    assert t.header == ["timestamp", "step", "acc"]


def test_crlf_split_between_reads(tmp_path):
    path = tmp_path / "win.tsv"
    append(path, b"step\tacc\r\n0\t0.5\r")
    t = tail(path)
    assert take(t) == []
    append(path, b"\n")
    assert take(t) == [{"step": "0", "acc": "0.5"}]


@pytest.mark.parametrize(
    "content, expected",
    [
        # header without timestamp, later rows logged with timestamp=True
        ("step\tm\n0\t1\n1795673812493\t1\t2\n",
         [{"step": "0", "m": "1"}, {"timestamp": "1795673812493", "step": "1", "m": "2"}]),
        # header with timestamp, later rows without
        ("timestamp\tstep\tm\n1795673812493\t0\t1\n1\t2\n",
         [{"timestamp": "1795673812493", "step": "0", "m": "1"}, {"step": "1", "m": "2"}]),
    ],
)
def test_rows_misaligned_by_a_toggled_timestamp_are_aligned(tmp_path, content, expected):
    path = tmp_path / "m.tsv"
    append(path, content)
    assert take(tail(path)) == expected


def test_align():
    assert reader.align(["step", "m"], ["0", "1"]) == ["step", "m"]
    assert reader.align(["step", "m"], ["9", "0", "1"]) == ["timestamp", "step", "m"]
    assert reader.align(["timestamp", "step", "m"], ["0", "1"]) == ["step", "m"]
    assert reader.align(["step", "m"], ["0"]) is None
    assert reader.align(["timestamp", "step", "m"], ["1", "2", "3", "4"]) is None


def test_unalignable_rows_are_sent_as_they_are_with_one_warning(tmp_path, caplog):
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n0\t1\t2\t3\n1\n")
    assert take(tail(path)) == [{"step": "0", "m": "1", "column2": "2", "column3": "3"}, {"step": "1"}]
    assert len([w for w in warnings_of(caplog) if "do not match" in w]) == 1


def test_header_that_changes_mid_file(tmp_path, caplog):
    path = tmp_path / "m.tsv"
    append(path, "step\ta\n0\t1\nstep\tb\tc\n1\t2\t3\n")
    t = tail(path)
    chunk = t.read()
    assert rows(chunk) == [{"step": "0", "a": "1"}, {"step": "1", "b": "2", "c": "3"}]
    # only the first row acknowledged: the header change is not taken yet, and a re-read sees it again
    t.ack(chunk.ends[0], 1)
    assert t.header == ["step", "a"]
    assert rows(t.read()) == [{"step": "1", "b": "2", "c": "3"}]
    assert take(t) == [{"step": "1", "b": "2", "c": "3"}]
    assert t.header == ["step", "b", "c"]
    append(path, "2\t4\t5\n")
    assert take(t) == [{"step": "2", "b": "4", "c": "5"}]
    assert len([w for w in warnings_of(caplog) if "changed mid-file" in w]) == 1


def test_header_change_as_the_last_line_is_consumed(tmp_path):
    path = tmp_path / "m.tsv"
    append(path, "step\ta\n0\t1\nstep\tb\n")
    t = tail(path)
    assert take(t) == [{"step": "0", "a": "1"}]
    assert take(t) == []  # nothing to send, but the header line is taken
    assert t.offset == path.stat().st_size and t.header == ["step", "b"]
    append(path, "1\t2\n")
    assert take(t) == [{"step": "1", "b": "2"}]


def test_blank_lines_are_skipped_and_consumed(tmp_path):
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n\n0\t1\n\r\n\n1\t2\n\n")
    t = tail(path)
    assert take(t) == [{"step": "0", "m": "1"}, {"step": "1", "m": "2"}]
    assert take(t) == []
    assert t.offset == path.stat().st_size


def test_quoted_fields_as_dictwriter_writes_them(tmp_path):
    import csv

    path = tmp_path / "m.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "label"], delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerow({"step": 0, "label": 'tab\there "quoted"'})
        writer.writerow({"step": 1, "label": "plain"})
    assert take(tail(path)) == [{"step": "0", "label": 'tab\there "quoted"'}, {"step": "1", "label": "plain"}]


def test_binary_garbage_neither_crashes_nor_breaks_the_payload(tmp_path):
    path = tmp_path / "m.tsv"
    rng = random.Random(7)
    garbage = bytes(rng.randrange(256) for _ in range(20_000))
    append(path, b"step\tm\n0\t1\n" + garbage + b"\n1\t2\n")
    t = tail(path)
    chunk = t.read()
    assert rows(chunk)[0] == {"step": "0", "m": "1"} and rows(chunk)[-1] == {"step": "1", "m": "2"}
    entries = [studio.row_json(c, f) for c, f in chunk.rows]
    for request in studio.plots_requests(
        studio.Identity("r", studio.NULL_SHA, "n"), 1, studio.tsv_entries(t.key, entries, chunk.ends, 10**7)
    ):
        body = json.loads(request.body)
        SCHEMAS_BY_TYPE["data"](body)


def test_a_line_longer_than_max_line_is_cut_and_the_rest_skipped(tmp_path, caplog):
    path = tmp_path / "m.tsv"
    long_value = "x" * (reader.MAX_LINE + 5000)
    append(path, f"step\tm\n0\t1\n1\t{long_value}\n2\t3\n")
    t = tail(path)
    got = take(t)
    assert [r["step"] for r in got] == ["0", "1", "2"]
    assert got[1]["m"] == long_value[: reader.MAX_LINE - 2] and got[2] == {"step": "2", "m": "3"}
    assert len([w for w in warnings_of(caplog) if "is cut" in w]) == 1


def test_an_over_long_line_is_skipped_without_holding_it(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_LINE", 64)
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n" + "1\t" + "y" * 500)
    t = tail(path)
    assert t.read(budget=16) is None  # incomplete: wait for its end
    append(path, "z" * 300 + "\n2\t3\n")
    chunk = t.read(budget=16)
    assert rows(chunk) == [{"step": "1", "m": "y" * 62}]
    assert chunk.ends == [len("step\tm\n") + 2 + 500 + 300 + 1]
    t.ack(chunk.ends[-1], 1)
    assert take(t, budget=16) == [{"step": "2", "m": "3"}]


def test_budget_bounds_a_read_and_says_more(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_LINE", 100)
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n" + "".join(f"{i}\t{i}\n" for i in range(1000)))
    t = tail(path)
    seen = []
    while True:
        chunk = t.read(budget=100)
        if chunk is None or not chunk.rows:
            break
        seen.extend(int(r["step"]) for r in rows(chunk))
        t.ack(chunk.ends[-1], len(chunk.rows))
    assert seen == list(range(1000))


def test_unacknowledged_rows_are_read_again_the_same(tmp_path):
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n0\t1\n1\t2\n")
    t = tail(path)
    first = t.read()
    assert t.offset == len("step\tm\n")  # nothing acknowledged: a send failed
    append(path, "2\t3\n")
    again = t.read()
    assert again.rows[:2] == first.rows and again.ends[:2] == first.ends
    assert rows(again)[2] == {"step": "2", "m": "3"}
    t.ack(again.ends[1], 2)  # a partial acknowledgement (the first of two bodies)
    assert rows(t.read()) == [{"step": "2", "m": "3"}]
    t.ack(again.ends[0], 1)  # a late, older acknowledgement never moves the offset back
    assert t.offset == again.ends[1]


def test_is_replaced_on_truncate_and_recreate(tmp_path):
    path = tmp_path / "m.tsv"
    append(path, "step\tm\n0\t1\n1\t2\n")
    t = tail(path)
    assert not t.is_replaced(path.stat())  # never read: nothing to compare
    take(t)
    assert not t.is_replaced(path.stat())
    append(path, "2\t3\n")
    assert not t.is_replaced(path.stat())  # grown: the same file
    path.write_text("step\tm\n")  # truncated by a fresh run
    assert t.is_replaced(path.stat())

    t2 = tail(path)
    take(t2)
    fresh = tmp_path / "new.tsv"
    fresh.write_text("step\tm\n0\t9\n" + "5\t5\n" * 10)  # re-created, bigger than what was read
    os.replace(fresh, path)
    assert t2.is_replaced(path.stat())
    t2.restart()
    assert take(t2)[0] == {"step": "0", "m": "9"} and t2.header == ["step", "m"]


def test_is_replaced_when_rewritten_in_place_beyond_the_offset(tmp_path):
    """A fresh run deletes the TSVs; the new file often gets the old inode number back (ext4 does) and
    may have outgrown what was consumed by the next look. Rewriting in place keeps the inode for sure."""
    path = tmp_path / "m.tsv"
    path.write_text("timestamp\tstep\tm\n" + "".join(f"17956738124{i:02d}\t{i}\t{i}\n" for i in range(3)))
    t = tail(path)
    take(t)
    ino = path.stat().st_ino
    for i in range(3, 6):  # appends are not a replacement, however often looked at
        append(path, f"17956738124{i:02d}\t{i}\t{i}\n")
        assert not t.is_replaced(path.stat())
        take(t)
        assert not t.is_replaced(path.stat())
    with open(path, "w") as f:  # truncate + rewrite: same inode, more bytes than were consumed
        f.write("timestamp\tstep\tm\n" + "".join(f"18000000000{i:02d}\t{i}\t{i * 2}\n" for i in range(20)))
    assert path.stat().st_ino == ino and path.stat().st_size > t.offset
    assert t.is_replaced(path.stat())
    t.restart()
    assert take(t)[0] == {"timestamp": "1800000000000", "step": "0", "m": "0"}


def test_pending_rows(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("")
    t = tail(path)
    assert t.pending_rows() == 0
    append(path, "step\tm\n0\t1\n1\t2\n2\t")
    assert t.pending_rows() == 2  # header not read yet, partial line not counted
    chunk = t.read()
    assert t.pending_rows() == 2
    t.ack(chunk.ends[0], 1)
    assert t.pending_rows() == 1
    t.ack(chunk.ends[1], 1)
    assert t.pending_rows() == 0
    path.unlink()
    assert t.pending_rows() == 0


def test_unreadable_tsv_warns_once(tmp_path, caplog):
    t = tail(tmp_path / "gone.tsv")
    assert t.read() is None and t.read() is None
    assert len([w for w in warnings_of(caplog) if "cannot read" in w]) == 1


def test_split_line_and_looks_like_header():
    assert reader.split_line(b"a\tb\r") == ["a", "b"]
    assert reader.split_line(b'0\t"x\ty"') == ["0", "x\ty"]
    assert reader.split_line(b"\xff\t1") == ["\ufffd", "1"]
    assert reader.looks_like_header(["timestamp", "step", "loss"])
    assert not reader.looks_like_header(["1", "step", "x"])
    assert not reader.looks_like_header(["a", "b"])


# --- documents --------------------------------------------------------------------------------------


def doc(path: Path, kind: str = "json") -> Document:
    parse = reader.parse_json if kind == "json" else reader.parse_yaml
    return Document(str(path), path.name, parse, Warnings())


def rewrite(path: Path, text: str | bytes) -> None:
    """Rewrite in place, as DVCLive does, and make sure the stamp changes (mtime granularity)."""
    before = path.stat() if path.exists() else None
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    if before is not None and Stamp.of(path.stat()) == Stamp.of(before):
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))


def test_missing_file(tmp_path):
    d = doc(tmp_path / "metrics.json")
    assert d.poll() is False and d.value is None and not d.exists


@pytest.mark.parametrize("torn", ["", "   \n", '{"step": 2, "loss"', '{"step": 2, "loss": 0.1', "\x00\x00\x00", b"\xff\xfe{"])
def test_torn_json_keeps_the_last_good_value(tmp_path, torn):
    path = tmp_path / "metrics.json"
    d = doc(path)
    path.write_text("")
    assert d.poll() is False and d.value is None and d.exists
    rewrite(path, '{"step": 1, "loss": 0.5}\n')
    assert d.poll() is True and d.value == {"step": 1, "loss": 0.5}
    rewrite(path, torn)
    assert d.poll() is False and d.value == {"step": 1, "loss": 0.5}
    rewrite(path, '{"step": 2, "loss": 0.25}\n')
    assert d.poll() is True and d.value == {"step": 2, "loss": 0.25}


def test_yaml_prefix_without_final_newline_is_not_taken(tmp_path):
    path = tmp_path / "params.yaml"
    d = doc(path, "yaml")
    rewrite(path, "lr: 0.001\nepochs: 3\n")
    assert d.poll() is True and d.value == {"lr": 0.001, "epochs": 3}
    rewrite(path, "lr: 0.001\nepochs: 3\nmodel:\n  lay")
    assert d.poll() is False and d.value == {"lr": 0.001, "epochs": 3}
    rewrite(path, "lr: 0.001\nepochs: 3\nmodel:\n  layers: 2\n")
    assert d.poll() is True and d.value == {"lr": 0.001, "epochs": 3, "model": {"layers": 2}}


def test_yaml_without_content_is_an_empty_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    rewrite(path, "# nothing logged yet\n")
    d = doc(path, "yaml")
    assert d.poll() is True and d.value == {}


@pytest.mark.parametrize("kind, text", [("json", "[1, 2]\n"), ("json", "3\n"), ("yaml", "- a\n- b\n"), ("yaml", "just text\n")])
def test_a_non_mapping_is_ignored_with_one_warning(tmp_path, caplog, kind, text):
    path = tmp_path / ("metrics.json" if kind == "json" else "params.yaml")
    d = doc(path, kind)
    rewrite(path, '{"a": 1}\n')
    assert d.poll() is True
    rewrite(path, text)
    assert d.poll() is False and d.value == {"a": 1}
    rewrite(path, text + "\n")
    assert d.poll() is False and d.value == {"a": 1}
    assert len([w for w in warnings_of(caplog) if "mapping" in w]) == 1


def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    rewrite(path, '{"a": 1}\n')
    calls = []
    d = Document(str(path), "m", lambda text: calls.append(text) or json.loads(text), Warnings())
    assert d.poll() is True
    assert d.poll() is False and d.poll() is False
    assert len(calls) == 1
    rewrite(path, '{"a": 1}\n')  # a new stamp, the same value: read, but nothing new
    assert d.poll() is False and len(calls) == 2


def test_parse_warning_once_per_torn_size(tmp_path, caplog):
    path = tmp_path / "metrics.json"
    d = doc(path)
    rewrite(path, '{"a":')
    d.poll()
    d.poll()
    assert len([w for w in warnings_of(caplog) if "not valid yet" in w]) == 1


def test_a_directory_is_not_a_document(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    d = doc(tmp_path / "metrics.json")
    assert d.poll() is False and not d.exists


def test_a_document_linked_outside_the_tree_is_not_read(tmp_path, caplog):
    tree, outside = tmp_path / "repo", tmp_path / "home"
    (tree / "dvclive").mkdir(parents=True)
    outside.mkdir()
    (outside / "config.json").write_text('{"auths": {"registry": {"auth": "c2VjcmV0"}}}\n')
    (tree / "dvclive" / "params.yaml").symlink_to(outside / "config.json")  # JSON is YAML too
    (tree / "shared.yaml").write_text("lr: 0.1\n")
    (tree / "dvclive" / "metrics.json").symlink_to("../shared.yaml")
    w = Warnings()
    leaked = Document(str(tree / "dvclive" / "params.yaml"), "dvclive/params.yaml", reader.parse_yaml, w, str(tree))
    for _ in range(2):
        assert leaked.poll() is False and leaked.value is None and not leaked.exists
    assert len([m for m in warnings_of(caplog) if "outside the working tree" in m]) == 1
    linked = Document(str(tree / "dvclive" / "metrics.json"), "m", reader.parse_yaml, w, str(tree))
    assert linked.poll() is True and linked.value == {"lr": 0.1}  # a link inside the tree is followed
    # without a tree root, a document may not lead out of its own directory
    assert Document(str(tree / "dvclive" / "params.yaml"), "p", reader.parse_yaml, w).poll() is False
    assert Document(str(tree / "dvclive" / "metrics.json"), "m", reader.parse_yaml, w).poll() is False
    (tmp_path / "link").symlink_to(outside)  # the whole directory a link out of the tree
    real_file = outside / "metrics.json"
    real_file.write_text('{"a": 1}\n')
    (tree / "out").symlink_to(outside)
    assert Document(str(tree / "out" / "metrics.json"), "m", reader.parse_json, w, str(tree)).poll() is False
    # a directory named outside the tree on purpose (--dir /scratch/dvclive) is read
    assert Document(str(tmp_path / "link" / "metrics.json"), "m", reader.parse_json, w, str(tree)).poll() is True


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (reader.parse_json, '{"a": NaN, "b": [Infinity, -Infinity], "c": "nan"}\n',
         {"a": "nan", "b": ["inf", "-inf"], "c": "nan"}),
        (reader.parse_yaml, "a: .nan\nb:\n  c: .inf\n  d: -.inf\ne: 1.5\n",
         {"a": "nan", "b": {"c": "inf", "d": "-inf"}, "e": 1.5}),
        (reader.parse_json, '{"big": 1e400, "list": [1, 2.5, null, true]}', {"big": "inf", "list": [1, 2.5, None, True]}),
        (reader.parse_yaml, "when: 2024-01-01\n1.5: x\n.nan: y\n", {"when": "2024-01-01", "1.5": "x", "nan": "y"}),
    ],
)
def test_non_finite_numbers_become_dvclives_strings(parse, text, expected):
    """DVCLive writes NaN/Inf as "nan"/"inf"; a file holding real NaN would make the body unsendable
    (`json.dumps(allow_nan=False)` raises), so such values are read as DVCLive's strings."""
    value = parse(text)
    assert value == expected
    studio.encode(value)


# --- images -----------------------------------------------------------------------------------------


def image_bytes(fmt: str, size=(20, 12), seed: int = 0, **options) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, comment=b"c")
    return out.getvalue()


IMAGES = [
    (".png", image_bytes("PNG")),
    (".png", image_bytes("PNG", size=(1, 1))),
    (".jpg", image_bytes("JPEG")),
    (".jpeg", image_bytes("JPEG", seed=3, quality=40)),
    (".gif", image_bytes("GIF")),
    (".gif", image_bytes("GIF", seed=5)),
    (".gif", animated_gif()),
]


@pytest.mark.parametrize("suffix, data", IMAGES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(IMAGES)])
def test_image_complete_only_for_the_whole_file(suffix, data):
    assert reader.image_complete(suffix, data)
    truncated_but_complete = [n for n in range(len(data)) if reader.image_complete(suffix, data[:n])]
    assert truncated_but_complete == []


def test_read_image(tmp_path):
    path = tmp_path / "a.png"
    data = image_bytes("PNG")
    path.write_bytes(data[:-10])
    stamp = Stamp.of(path.stat())
    assert reader.read_image(str(path), stamp, force=False) is None  # half-written
    assert base64.b64decode(reader.read_image(str(path), stamp, force=True)) == data[:-10]  # stable: sent anyway
    path.write_bytes(data)
    assert reader.read_image(str(path), stamp, force=True) is None  # changed since it was listed
    stamp = Stamp.of(path.stat())
    assert reader.read_image(str(path), stamp, force=False) == base64.b64encode(data).decode()
    path.write_bytes(b"")
    assert reader.read_image(str(path), Stamp.of(path.stat()), force=True) is None


# --- scanning ---------------------------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    live = root / "dvclive"
    for rel in ["plots/metrics/loss.tsv", "plots/metrics/train/acc.tsv", "plots/metrics/deep/er/x.csv",
                "plots/images/sample.png", "plots/images/per_step/0.png", "plots/images/a.JPG", "plots/images/b.gif",
                "plots/images/c.jpeg",
                # not sent live
                "metrics.json", "params.yaml", "plots/custom/c.json", "plots/sklearn/roc.json",
                "plots/metrics/notes.txt", "plots/metrics/img.png", "plots/images/data.tsv", "plots/images/x.webp",
                "report.html", "plots/metrics.tsv"]:
        (live / rel).parent.mkdir(parents=True, exist_ok=True)
        (live / rel).write_text("step\tm\n")
    return live


def scan(root: Path, live: Path | None = None, key: str = "dvclive", warnings: Warnings | None = None):
    return reader.scan(str(live or root / "dvclive"), key, str(root), warnings or Warnings())


def test_scan_finds_tsvs_and_images_only(tmp_path):
    make_tree(tmp_path)
    listing = scan(tmp_path)
    assert listing.is_dir and listing.has_plots
    assert sorted(listing.tsvs) == [
        "dvclive/plots/metrics/deep/er/x.csv", "dvclive/plots/metrics/loss.tsv", "dvclive/plots/metrics/train/acc.tsv"]
    assert sorted(listing.images) == [
        "dvclive/plots/images/a.JPG", "dvclive/plots/images/b.gif", "dvclive/plots/images/c.jpeg",
        "dvclive/plots/images/per_step/0.png", "dvclive/plots/images/sample.png"]
    path, st = listing.tsvs["dvclive/plots/metrics/train/acc.tsv"]
    assert path == str(tmp_path / "dvclive/plots/metrics/train/acc.tsv") and st.st_size == len("step\tm\n")


def test_scan_keys_for_a_nested_dir_and_for_the_root(tmp_path):
    live = tmp_path / "results" / "live"
    (live / "plots" / "metrics").mkdir(parents=True)
    (live / "plots" / "metrics" / "m.tsv").write_text("")
    assert list(scan(tmp_path, live, "results/live").tsvs) == ["results/live/plots/metrics/m.tsv"]
    assert list(scan(tmp_path, live, ".").tsvs) == ["plots/metrics/m.tsv"]


def test_scan_missing_dir_and_dir_that_is_a_file(tmp_path, caplog):
    listing = scan(tmp_path)
    assert not listing.is_dir and not listing.has_plots
    (tmp_path / "dvclive").write_text("oops")
    w = Warnings()
    assert not scan(tmp_path, warnings=w).is_dir
    assert not scan(tmp_path, warnings=w).is_dir
    assert len([m for m in warnings_of(caplog) if "not a directory" in m]) == 1
    (tmp_path / "dvclive").unlink()
    (tmp_path / "dvclive" / "plots").mkdir(parents=True)
    (tmp_path / "dvclive" / "plots" / "metrics").write_text("a file")
    listing = scan(tmp_path)
    assert listing.is_dir and not listing.has_plots


def test_scan_names_with_spaces_unicode_and_newlines(tmp_path):
    metrics = tmp_path / "dvclive" / "plots" / "metrics"
    (metrics / "sys tem").mkdir(parents=True)
    names = ["sys tem/usage (%).tsv", "ünï cödé.tsv", "new\nline.tsv", "tab\tname.tsv"]
    for name in names:
        (metrics / name).write_text("step\tm\n")
    assert sorted(scan(tmp_path).tsvs) == sorted(f"dvclive/plots/metrics/{n}" for n in names)


def test_symlink_outside_the_tree_is_not_followed_and_warned_once(tmp_path, caplog):
    tree, outside = tmp_path / "repo", tmp_path / "secret"
    outside.mkdir()
    (outside / "id_rsa.png").write_bytes(b"PRIVATE KEY")
    (outside / "dir").mkdir()
    (outside / "dir" / "k.tsv").write_text("step\tkey\n")
    live = make_tree(tree)
    (live / "plots/images/leak.png").symlink_to(outside / "id_rsa.png")
    (live / "plots/metrics/leakdir").symlink_to(outside / "dir")
    (live / "plots/metrics/rel.tsv").symlink_to("../../../../secret/dir/k.tsv")
    w = Warnings()
    for _ in range(3):
        listing = scan(tree, warnings=w)
        assert not any("leak" in k or "rel.tsv" in k for k in [*listing.tsvs, *listing.images])
        assert "dvclive/plots/metrics/loss.tsv" in listing.tsvs
    assert len([m for m in warnings_of(caplog) if "outside the working tree" in m]) == 3  # once per link


@pytest.mark.parametrize("linked", ["plots", "plots/metrics", "plots/images"])
def test_a_linked_plots_directory_outside_the_tree_is_not_followed(tmp_path, linked, caplog):
    tree, outside = tmp_path / "repo", tmp_path / "elsewhere"
    fake = make_tree(outside)
    live = tree / "dvclive"
    (live / linked).parent.mkdir(parents=True, exist_ok=True)
    (live / linked).symlink_to(fake / linked)
    listing = scan(tree)
    assert listing.tsvs == {} and listing.images == {}
    assert any("outside the working tree" in m for m in warnings_of(caplog))


def test_a_dvclive_dir_that_links_outside_the_tree_is_not_followed(tmp_path, caplog):
    tree = tmp_path / "repo"
    tree.mkdir()
    (tree / "dvclive").symlink_to(make_tree(tmp_path / "elsewhere"))
    listing = scan(tree)
    assert listing.tsvs == {} and listing.images == {}
    assert any("outside the working tree" in m for m in warnings_of(caplog))


def test_symlinks_inside_the_tree_are_followed(tmp_path):
    make_tree(tmp_path)
    shared = tmp_path / "shared"
    (shared / "more").mkdir(parents=True)
    (shared / "more" / "m.tsv").write_text("step\tm\n")
    (shared / "pic.png").write_bytes(b"png")
    live = tmp_path / "dvclive"
    (live / "plots/metrics/linked").symlink_to(shared / "more")
    (live / "plots/images/pic.png").symlink_to("../../../shared/pic.png")
    listing = scan(tmp_path)
    assert "dvclive/plots/metrics/linked/m.tsv" in listing.tsvs
    assert "dvclive/plots/images/pic.png" in listing.images


def test_a_dvclive_dir_chosen_outside_the_tree_is_read(tmp_path):
    """--dir may point outside the working tree on purpose: its own files are listed."""
    tree = tmp_path / "repo"
    tree.mkdir()
    live = make_tree(tmp_path / "scratch")
    assert "dvclive/plots/metrics/loss.tsv" in scan(tree, live).tsvs


def test_symlink_loops_and_broken_links(tmp_path):
    make_tree(tmp_path)
    metrics = tmp_path / "dvclive/plots/metrics"
    (metrics / "loop").symlink_to(".")
    (metrics / "train" / "up").symlink_to("..")
    (metrics / "broken.tsv").symlink_to("nowhere.tsv")
    (metrics / "self.tsv").symlink_to("self.tsv")
    listing = scan(tmp_path)
    assert sorted(listing.tsvs) == [
        "dvclive/plots/metrics/deep/er/x.csv", "dvclive/plots/metrics/loss.tsv", "dvclive/plots/metrics/train/acc.tsv"]


def test_unreadable_directory(tmp_path, caplog):
    make_tree(tmp_path)
    locked = tmp_path / "dvclive/plots/metrics/train"
    locked.chmod(0)
    try:
        listing = scan(tmp_path)
    finally:
        locked.chmod(0o755)
    assert "dvclive/plots/metrics/loss.tsv" in listing.tsvs
    if os.geteuid() == 0:  # root reads it anyway
        assert "dvclive/plots/metrics/train/acc.tsv" in listing.tsvs
    else:
        assert "dvclive/plots/metrics/train/acc.tsv" not in listing.tsvs
        assert any("cannot list" in m for m in warnings_of(caplog))


def test_a_directory_that_cannot_be_listed_is_skipped_with_one_warning(tmp_path, caplog, monkeypatch):
    make_tree(tmp_path)
    real_scandir = os.scandir
    locked = str(tmp_path / "dvclive/plots/metrics/train")

    def scandir(path):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(reader.os, "scandir", scandir)
    w = Warnings()
    for _ in range(2):
        listing = scan(tmp_path, warnings=w)
        assert "dvclive/plots/metrics/loss.tsv" in listing.tsvs
        assert "dvclive/plots/metrics/train/acc.tsv" not in listing.tsvs
        assert "dvclive/plots/images/sample.png" in listing.images
    assert len([m for m in warnings_of(caplog) if "cannot list" in m]) == 1


def test_a_file_that_vanishes_during_the_scan(tmp_path, monkeypatch):
    make_tree(tmp_path)
    real_scandir = os.scandir

    def scandir(path):
        entries = list(real_scandir(path))
        for entry in entries:
            if entry.name == "loss.tsv":
                os.unlink(entry.path)
        return iter(entries)

    monkeypatch.setattr(reader.os, "scandir", scandir)
    listing = scan(tmp_path)
    assert "dvclive/plots/metrics/loss.tsv" not in listing.tsvs
    assert "dvclive/plots/metrics/train/acc.tsv" in listing.tsvs


def test_warnings_once_and_forget(caplog):
    w = Warnings()
    w.once("k", "said %s", 1)
    w.once("k", "said %s", 2)
    w.forget("k")
    w.once("k", "said %s", 3)
    assert warnings_of(caplog) == ["said 1", "said 3"]
