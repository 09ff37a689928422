"""Pure functions: DVCLive file contents -> Studio `start` / `data` / `done` request bodies.

Bodies are byte-for-byte what `requests.post(json=...)` in dvc-studio-client produces
(`json.dumps(body, allow_nan=False)`, default separators, ASCII), so Studio sees exactly the payloads
it sees from DVCLive's own integration. Plot entries are serialized once and assembled into bodies
that respect Studio's limits: 29,000,000 bytes per body, 10,000,000 per plot entry, 200 entries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

MAX_REQUEST_SIZE = 29_000_000
MAX_PLOT_SIZE = 10_000_000
MAX_NUMBER_OF_PLOTS = 200
CLIENT = "dvclive"
NULL_SHA = "0" * 40
MESSAGE_MAX = 72


@dataclass(frozen=True)
class Limits:
    max_request: int = MAX_REQUEST_SIZE
    max_entry: int = MAX_PLOT_SIZE
    max_entries: int = MAX_NUMBER_OF_PLOTS


@dataclass(frozen=True)
class Identity:
    """What Studio identifies a live experiment by."""

    repo_url: str
    baseline_sha: str
    name: str
    client: str = CLIENT


@dataclass
class Request:
    """One POST: its event type, its serialized body and what it acknowledges when Studio answers 200."""

    event: str
    body: bytes
    acks: list = field(default_factory=list)
    rows: int = 0
    images: int = 0


_ENCODER = json.JSONEncoder(allow_nan=False)  # what json.dumps(obj, allow_nan=False) builds on every call


def encode(obj: Any) -> str:
    return _ENCODER.encode(obj)


def _base(event: str, ident: Identity) -> dict:
    return {
        "type": event,
        "repo_url": ident.repo_url,
        "baseline_sha": ident.baseline_sha,
        "name": ident.name,
        "client": ident.client,
    }


def start_request(ident: Identity, message: str | None = None, subdir: str | None = None) -> Request:
    body = _base("start", ident)
    if message:
        body["message"] = message[:MESSAGE_MAX]
    if subdir:
        body["subdir"] = subdir
    return Request("start", encode(body).encode())


def done_request(ident: Identity, experiment_rev: str | None = None) -> Request:
    body = _base("done", ident)
    if experiment_rev:
        body["experiment_rev"] = experiment_rev
    return Request("done", encode(body).encode())


def metrics_request(
    ident: Identity, step: int, params: dict[str, dict], metrics: dict[str, Any], acks: list | None = None
) -> Request:
    """The first POST of a data event: params, metrics (as-is) and step, as DVCLive sends it."""
    body = _base("data", ident)
    if params:  # dvc-studio-client leaves out empty params / metrics (`if params:`, `if metrics:`)
        body["params"] = params
    if metrics:
        body["metrics"] = {path: {"data": data} for path, data in metrics.items()}
    body["step"] = step
    return Request("data", encode(body).encode(), acks=list(acks or []))


# --- casting plot rows as DVCLive does (dvclive/studio.py:_cast_to_numbers), minus its crash ---------


def cast_value(column: str, text: str) -> Any:
    """Cast one TSV cell: step -> int, timestamp -> the string as-is, other -> float; nan/inf and
    non-numeric text stay the text they are (DVCLive would stop streaming on the latter)."""
    if column == "timestamp":
        return text
    if column == "step":
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                return text
            return int(as_float) if as_float.is_integer() else text
    try:
        value = float(text)
    except ValueError:
        return text
    if math.isnan(value) or math.isinf(value):
        return text
    return value


def cast_row(header: Sequence[str], fields: Sequence[str]) -> dict:
    return {column: cast_value(column, text) for column, text in zip(header, fields)}


def row_json(header: Sequence[str], fields: Sequence[str]) -> str:
    return encode(cast_row(header, fields))


# --- plot entries and body packing -------------------------------------------------------------------


@dataclass
class Entry:
    """One value of `plots`: already serialized, with its DVCLive-style size and its acknowledgement."""

    key: str
    json: str
    size: int
    ack: Any
    rows: int = 0
    images: int = 0


def tsv_entries(key: str, row_jsons: Sequence[str], ends: Sequence[int], max_entry: int) -> Iterable[Entry]:
    """Split the new rows of one TSV into entries no larger than `max_entry`, sized as DVCLive sizes
    them (the JSON of the list of rows). Each entry acknowledges the byte offset after its last row.
    The reader bounds a line's length, so one row always fits in an entry."""
    pending: list[str] = []
    size, last_end = 2, 0  # "[]"
    for rj, end in zip(row_jsons, ends):
        add = len(rj) + (2 if pending else 0)
        if pending and size + add > max_entry:
            yield _tsv_entry(key, pending, last_end, size)
            pending, size, add = [], 2, len(rj)
        pending.append(rj)
        size += add
        last_end = end
    if pending:
        yield _tsv_entry(key, pending, last_end, size)


def row_entries(key: str, rows: Sequence[dict], ends: Sequence[int], max_entry: int) -> Iterable[Entry]:
    """`tsv_entries` of cast rows, byte for byte: the list is encoded in one call when it fits in one
    entry (the common case: `encode` of a list is its items' encodings joined by ", "), else row by row."""
    whole = encode(list(rows))
    if len(whole) > max_entry:
        yield from tsv_entries(key, [encode(row) for row in rows], ends, max_entry)
    elif rows:
        yield Entry(key, '{"data": ' + whole + "}", len(whole), ("tsv", key, ends[-1], len(rows)), rows=len(rows))


def _tsv_entry(key: str, rows: Sequence[str], end: int, size: int) -> Entry:
    return Entry(key, '{"data": [' + ", ".join(rows) + "]}", size, ("tsv", key, end, len(rows)), rows=len(rows))


def image_entry(key: str, b64: str, ack: Any) -> Entry:
    return Entry(key, '{"image": "' + b64 + '"}', len(b64), ack, images=1)


def plots_requests(ident: Identity, step: int, entries: Iterable[Entry], limits: Limits = Limits()) -> list[Request]:
    """Pack entries, in order, into `data` bodies `{..., "step": N, "plots": {...}}` within the limits.

    Entries of the same key go to different bodies (a key appears once in a JSON object), in order, so
    acknowledging bodies in sending order acknowledges rows in file order."""
    head = encode({**_base("data", ident), "step": step})[:-1] + ', "plots": {'
    # len(body) == len(head) + sum(len(part) + 2): the first part has no ", " before it, "}}" closes
    overhead = len(head)
    requests: list[Request] = []
    parts: list[str] = []
    keys: set[str] = set()
    current: Request | None = None
    total = overhead

    def close() -> None:
        nonlocal current, parts, keys, total
        if current is not None and parts:
            current.body = (head + ", ".join(parts) + "}}").encode()
            requests.append(current)
        current, parts, keys, total = None, [], set(), overhead

    for entry in entries:
        piece = len(encode(entry.key)) + 2 + len(entry.json) + 2
        if current is None:
            current = Request("data", b"")
        elif entry.key in keys or len(parts) >= limits.max_entries or total + piece > limits.max_request:
            close()
            current = Request("data", b"")
        parts.append(encode(entry.key) + ": " + entry.json)
        keys.add(entry.key)
        total += piece
        current.acks.append(entry.ack)
        current.rows += entry.rows
        current.images += entry.images
    close()
    return requests


def rebuild_state(bodies: Iterable[dict]) -> dict:
    """Experiment state as Studio would rebuild it from data bodies: latest metrics and params, every
    plot row in order, last image per path. Used by tests and by `--dry-run` summaries."""
    state: dict = {"metrics": {}, "params": {}, "plots": {}, "images": {}, "steps": []}
    for body in bodies:
        if body.get("type") != "data":
            continue
        state["steps"].append(body["step"])
        for path, value in body.get("metrics", {}).items():
            state["metrics"][path] = value.get("data")
        state["params"].update(body.get("params", {}))
        for path, value in body.get("plots", {}).items():
            if "image" in value:
                state["images"][path] = value["image"]
            else:
                state["plots"].setdefault(path, []).extend(value.get("data", []))
    return state
