"""Unit tests of livesend.studio: DVCLive's casting, byte-exact bodies and packing within Studio's limits.

The oracles are the real packages: DVCLive's `_cast_to_numbers`, dvc-studio-client's
`post_live_metrics` (with `requests.post` replaced by a recorder, so nothing is sent) and its schema."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
import requests
from dvc_studio_client import post_live_metrics as plm
from dvc_studio_client.schema import SCHEMAS_BY_TYPE
from dvclive.studio import _cast_to_numbers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livesend import studio
from livesend.studio import Entry, Identity, Limits

IDENT = Identity("https://github.com/example/repo", "c45d3d9ae43b014f4a6af78076a819168d492562", "areal-coze")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire(body: dict) -> bytes:
    """The bytes requests puts on the wire for `requests.post(json=body)`."""
    return requests.Request("POST", "http://127.0.0.1/api/live", json=body).prepare().body


def dvclive_cast(column: str, text: str) -> Any:
    return _cast_to_numbers([{column: text}])[0][column]


@pytest.fixture
def dvc_client(monkeypatch):
    """Call dvc-studio-client's own `post_live_metrics` and collect the bodies it would POST."""
    for var in ("DVC_STUDIO_OFFLINE", "STUDIO_ENDPOINT", "DVC_STUDIO_URL", "DVC_STUDIO_TOKEN", "STUDIO_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    sent: list = []

    class Answer:
        status_code = 200
        content = b"{}"

    def fake_post(url, json=None, headers=None, timeout=None):  # noqa: A002 - requests' own name
        sent.append(wire(json))  # serialized now: the client mutates the dict between its two POSTs
        return Answer()

    monkeypatch.setattr(plm.requests, "post", fake_post)

    def post(event: str, **kwargs) -> list:
        sent.clear()
        ok = plm.post_live_metrics(
            event, IDENT.baseline_sha, IDENT.name, "dvclive", studio_token="t", studio_repo_url=IDENT.repo_url,
            studio_url="http://127.0.0.1:1", **kwargs,
        )
        assert ok is True
        return list(sent)

    return post


def validate(body: bytes) -> dict:
    obj = json.loads(body)
    SCHEMAS_BY_TYPE[obj["type"]](obj)
    assert body == wire(obj)  # canonical: default separators, ASCII, no NaN
    return obj


# --- casting ----------------------------------------------------------------------------------------

CELLS = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.floats(width=32).map(str),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "0", "1.0", " 2 ",
                     "1_000", "0x10", "", "abc", "é", "1e-05", "\t", "\"q\""]),
    st.text(max_size=12),
)
COLUMNS = st.sampled_from(["step", "timestamp", "loss", "acc", "usage (%)", "nan", "Step"])


@FAST
@given(COLUMNS, CELLS)
def test_cast_value_matches_dvclive_or_keeps_the_text(column, text):
    got = studio.cast_value(column, text)
    try:
        expected = dvclive_cast(column, text)
    except ValueError:
        # DVCLive stops its stream here; livesend sends the text instead (a step such as "1.0" as its int).
        if column == "step" and not isinstance(got, str):
            assert float(text) == got and isinstance(got, int)
        else:
            assert got == text
        return
    assert type(got) is type(expected)
    assert got == expected or (isinstance(got, float) and math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize(
    "column, text, expected",
    [
        ("step", "3", 3),
        ("step", "-1", -1),
        ("timestamp", "1795673812493", "1795673812493"),
        ("timestamp", "not a number", "not a number"),
        ("loss", "0", 0.0),
        ("loss", "0.3333333333333333", 0.3333333333333333),
        ("loss", "1e-05", 1e-05),
        ("loss", "nan", "nan"),
        ("loss", "NaN", "NaN"),
        ("loss", "inf", "inf"),
        ("loss", "-inf", "-inf"),
        ("loss", "Infinity", "Infinity"),
        ("loss", "1e400", "1e400"),
        ("label", "abc", "abc"),
        ("label", "", ""),
    ],
)
def test_cast_value_examples(column, text, expected):
    got = studio.cast_value(column, text)
    assert got == expected and type(got) is type(expected)


@FAST
@given(st.lists(st.tuples(COLUMNS, CELLS), min_size=1, max_size=6, unique_by=lambda t: t[0]))
def test_row_json_is_json_dumps_of_dvclive_cast_row(cells):
    header = [c for c, _ in cells]
    fields = [t for _, t in cells]
    try:
        row = _cast_to_numbers([dict(zip(header, fields))])[0]
    except ValueError:
        row = {c: studio.cast_value(c, t) for c, t in zip(header, fields)}
    assert studio.row_json(header, fields) == json.dumps(row, allow_nan=False)
    assert studio.row_json(header, fields).encode() == wire(row)


def test_row_json_never_holds_nan_and_keeps_column_order():
    text = studio.row_json(["timestamp", "step", "loss"], ["17", "2", "nan"])
    assert text == '{"timestamp": "17", "step": 2, "loss": "nan"}'
    assert studio.row_json(["step", "loss"], ["1", "é\u2028"]) == '{"step": 1, "loss": "\\u00e9\\u2028"}'


# --- start / done / metrics bodies ------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, subdir",
    [(None, None), ("", ""), ("short", None), ("m" * 71 + "é" + "xyz" * 20, "sub/dir"), (None, "nested/dvc root")],
)
def test_start_body_is_dvc_studio_clients(dvc_client, message, subdir):
    request = studio.start_request(IDENT, message, subdir)
    assert request.event == "start" and request.acks == []
    assert [request.body] == dvc_client("start", message=message, subdir=subdir)
    body = validate(request.body)
    assert len(body.get("message", "")) <= 72
    assert list(body)[:5] == ["type", "repo_url", "baseline_sha", "name", "client"]


def test_start_message_cut_to_72_characters():
    body = json.loads(studio.start_request(IDENT, "x" * 200).body)
    assert body["message"] == "x" * 72
    assert json.loads(studio.start_request(IDENT, "é" * 73).body)["message"] == "é" * 72


@pytest.mark.parametrize("rev", [None, "", "3e2f795a9b2a6c0b0e4b7a0e1a5b2c3d4e5f6a7b"])
def test_done_body_is_dvc_studio_clients(dvc_client, rev):
    request = studio.done_request(IDENT, rev)
    assert [request.body] == dvc_client("done", experiment_rev=rev)
    body = validate(request.body)
    assert ("experiment_rev" in body) == bool(rev)


def test_null_sha_identity_passes_the_schema():
    validate(studio.start_request(Identity("git@github.com:org/repo.git", studio.NULL_SHA, "n")).body)


@pytest.mark.parametrize(
    "params, metrics",
    [
        ({"dvclive/params.yaml": {"lr": 0.001, "model": {"layers": 2}}},
         {"dvclive/metrics.json": {"train": {"loss": 0.5}, "weird": {"nan": "nan"}, "step": 3, "n": 7}}),
        ({"dvclive/params.yaml": {}}, {"dvclive/metrics.json": {}}),
        ({"dvclive/params.yaml": {"name": "ünïcode"}}, {}),
        ({}, {}),
    ],
)
def test_metrics_body_is_dvc_studio_clients(dvc_client, params, metrics):
    request = studio.metrics_request(IDENT, 3, params, metrics, acks=[("docs",)])
    expected = dvc_client("data", step=3, params=params,
                          metrics={k: {"data": v} for k, v in metrics.items()})
    assert [request.body] == expected
    body = validate(request.body)
    present = {"params": params, "metrics": metrics}
    assert list(body)[5:] == [k for k, v in present.items() if v] + ["step"]
    assert request.acks == [("docs",)]


def test_plots_body_is_the_second_post_of_dvc_studio_client(dvc_client):
    png = base64.b64encode(b"\x89PNG fake").decode()
    rows = {
        "dvclive/plots/metrics/train/loss.tsv": [["step", "loss"], ["0", "0.5"], ["1", "nan"]],
        "dvclive/plots/metrics/with_ts.tsv": [["timestamp", "step", "with_ts"], ["1795673812493", "0", "0"]],
    }
    entries = []
    plots: dict = {}
    for key, (header, *body_rows) in rows.items():
        jsons = [studio.row_json(header, r) for r in body_rows]
        entries.extend(studio.tsv_entries(key, jsons, list(range(1, len(jsons) + 1)), studio.MAX_PLOT_SIZE))
        plots[key] = {"data": [json.loads(j) for j in jsons]}
    entries.append(studio.image_entry("dvclive/plots/images/sample.png", png, ("image", "x")))
    plots["dvclive/plots/images/sample.png"] = {"image": png}
    params = {"dvclive/params.yaml": {"lr": 0.1}}
    metrics = {"dvclive/metrics.json": {"data": {"step": 1}}}

    first, second = dvc_client("data", step=1, params=params, metrics=metrics, plots=plots)
    assert studio.metrics_request(IDENT, 1, params, {"dvclive/metrics.json": {"step": 1}}).body == first
    (request,) = studio.plots_requests(IDENT, 1, entries)
    assert request.body == second
    assert request.rows == 3 and request.images == 1
    validate(request.body)


def test_no_entries_make_no_request():
    assert studio.plots_requests(IDENT, 0, []) == []


# --- packing within the limits ------------------------------------------------------------------------


def dvclive_size(value: dict) -> int:
    """How dvc-studio-client sizes one plot entry."""
    return len(json.dumps(value["data"]).encode()) if "data" in value else len(value["image"])


def check_requests(requests_: list, entries: list, limits: Limits, step: int = 7) -> dict:
    """Every invariant of a packing; returns the rows per key as Studio would concatenate them."""
    rows: dict = {}
    acks = []
    for request in requests_:
        assert len(request.body) <= limits.max_request
        body = validate(request.body)
        assert list(body) == ["type", "repo_url", "baseline_sha", "name", "client", "step", "plots"]
        assert body["step"] == step and body["type"] == "data"
        assert 0 < len(body["plots"]) <= limits.max_entries
        # a key once per body: the JSON text holds no duplicate keys
        pairs = json.loads(request.body, object_pairs_hook=lambda kv: kv)
        plot_keys = [k for k, _ in dict(pairs)["plots"]]
        assert len(plot_keys) == len(set(plot_keys))
        n_rows = n_images = 0
        for key, value in body["plots"].items():
            assert dvclive_size(value) <= limits.max_entry
            if "data" in value:
                rows.setdefault(key, []).extend(value["data"])
                n_rows += len(value["data"])
            else:
                n_images += 1
        assert (request.rows, request.images) == (n_rows, n_images)
        acks.extend(request.acks)
    assert acks == [e.ack for e in entries]  # in order, each once
    return rows


ROW = st.tuples(st.integers(0, 10**6), st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str),
                                                  st.text(max_size=20)))
KEYS = st.sampled_from([f"dvclive/plots/metrics/m{i}.tsv" for i in range(4)] + ["dvclive/plots/metrics/ü ber.tsv"])


@st.composite
def backlog(draw):
    """Limits and a list of plot entries (TSV row runs and images) that each fit those limits."""
    max_entry = draw(st.integers(60, 400))
    max_request = draw(st.integers(max_entry + 400, max_entry + 1500))
    limits = Limits(max_request=max_request, max_entry=max_entry, max_entries=draw(st.integers(1, 6)))
    entries, expected = [], {}
    offset = 0
    for _ in range(draw(st.integers(0, 12))):
        key = draw(KEYS)
        if draw(st.booleans()):
            b64 = base64.b64encode(draw(st.binary(max_size=max_entry * 3 // 4))).decode()
            entries.append(studio.image_entry(key.replace("metrics", "images") + ".png", b64, ("image", key, offset)))
            offset += 1
            continue
        jsons, ends = [], []
        for step, value in draw(st.lists(ROW, min_size=1, max_size=15)):
            text = studio.row_json(["step", "v"], [str(step), value])
            if len(text) + 2 > max_entry:
                continue
            offset += len(text)
            jsons.append(text)
            ends.append(offset)
            expected.setdefault(key, []).append(json.loads(text))
        new = list(studio.tsv_entries(key, jsons, ends, max_entry))
        assert sum(e.rows for e in new) == len(jsons)
        entries.extend(new)
    return limits, entries, expected


@FAST
@given(backlog(), st.integers(0, 2**40))
def test_packing_respects_every_limit_and_keeps_every_row_once_in_order(case, step):
    limits, entries, expected = case
    requests_ = studio.plots_requests(IDENT, step, entries, limits)
    assert check_requests(requests_, entries, limits, step) == expected


def test_large_backlog_split_by_rows_in_order():
    key = "dvclive/plots/metrics/train/loss.tsv"
    header = ["timestamp", "step", "loss"]
    jsons, ends, pos = [], [], 0
    for i in range(5000):
        line = f"{1795673812493 + i}\t{i}\t{i / 7}\n"
        pos += len(line)
        jsons.append(studio.row_json(header, line[:-1].split("\t")))
        ends.append(pos)
    limits = Limits(max_request=20_000, max_entry=4_000, max_entries=200)
    entries = list(studio.tsv_entries(key, jsons, ends, limits.max_entry))
    assert len(entries) > 1 and all(e.size <= limits.max_entry for e in entries)
    # each entry acknowledges the byte offset after its own last row
    assert [e.ack[2] for e in entries] == sorted(e.ack[2] for e in entries)
    assert entries[-1].ack == ("tsv", key, pos, entries[-1].rows)
    requests_ = studio.plots_requests(IDENT, 4999, entries, limits)
    assert len(requests_) == len(entries)  # one key: one entry per body
    rows = check_requests(requests_, entries, limits, 4999)
    assert [r["step"] for r in rows[key]] == list(range(5000))
    assert rows[key][3] == {"timestamp": "1795673812496", "step": 3, "loss": 3 / 7}


def test_entry_size_is_dvclive_size():
    jsons = [studio.row_json(["step", "v"], [str(i), "0.5"]) for i in range(10)]
    (entry,) = studio.tsv_entries("k", jsons, list(range(10)), 10_000)
    assert entry.size == dvclive_size(json.loads(entry.json)) and entry.rows == 10
    assert studio.image_entry("k", "QUJD", None).size == 4


def test_at_most_max_entries_per_body():
    entries = [studio.image_entry(f"img/{i}.png", "QUJD", i) for i in range(450)]
    requests_ = studio.plots_requests(IDENT, 0, entries)
    assert [len(json.loads(r.body)["plots"]) for r in requests_] == [200, 200, 50]
    check_requests(requests_, entries, Limits(), 0)


def test_same_key_twice_goes_to_the_next_body():
    entries = [Entry("a", '{"data": []}', 2, 1), Entry("b", '{"data": []}', 2, 2), Entry("a", '{"data": []}', 2, 3)]
    requests_ = studio.plots_requests(IDENT, 0, entries)
    assert [r.acks for r in requests_] == [[1, 2], [3]]


def test_body_size_limit_is_exact_enough():
    image = "A" * 1000
    entries = [studio.image_entry(f"i{n}", image, n) for n in range(10)]
    one = len(studio.plots_requests(IDENT, 0, entries[:1])[0].body)
    per_extra = len(studio.plots_requests(IDENT, 0, entries[:2])[0].body) - one
    limit = one + 2 * per_extra  # room for exactly three entries
    requests_ = studio.plots_requests(IDENT, 0, entries, Limits(max_request=limit))
    assert [len(r.acks) for r in requests_] == [3, 3, 3, 1]
    assert max(len(r.body) for r in requests_) <= limit


# --- rebuild_state ----------------------------------------------------------------------------------


def test_rebuild_state_takes_latest_values_and_every_row():
    bodies = [
        {"type": "start"},
        {"type": "data", "step": 0, "params": {"p.yaml": {"a": 1}}, "metrics": {"m.json": {"data": {"x": 1}}}},
        {"type": "data", "step": 0, "plots": {"t.tsv": {"data": [{"step": 0}]}, "i.png": {"image": "AA=="}}},
        {"type": "data", "step": 1, "plots": {"t.tsv": {"data": [{"step": 1}]}, "i.png": {"image": "AQ=="}}},
        {"type": "data", "step": 1, "params": {"p.yaml": {"a": 2}}, "metrics": {"m.json": {"data": {"x": 2}}}},
        {"type": "done"},
    ]
    assert studio.rebuild_state(bodies) == {
        "metrics": {"m.json": {"x": 2}}, "params": {"p.yaml": {"a": 2}},
        "plots": {"t.tsv": [{"step": 0}, {"step": 1}]}, "images": {"i.png": "AQ=="}, "steps": [0, 0, 1, 1],
    }
