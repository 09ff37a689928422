"""What a DVCLive directory holds, rebuilt the way Studio would see it: the reference the end-to-end
tests compare the received payloads against."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import yaml


def cast(column: str, value: str):
    """DVCLive's `_cast_to_numbers` (with livesend's deviation: non-numeric text is kept as text)."""
    if column == "step":
        return int(value)
    if column == "timestamp":
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if number != number or number in (float("inf"), float("-inf")):
        return value
    return number


def disk_state(live_dir: Path, root: Path) -> dict:
    """{"metrics": {key: data}, "params": {key: data}, "plots": {key: rows}, "images": {key: b64}}."""
    def key(path: Path) -> str:
        return path.relative_to(root).as_posix()

    state: dict = {"metrics": {}, "params": {}, "plots": {}, "images": {}}
    metrics = live_dir / "metrics.json"
    if metrics.exists():
        state["metrics"][key(metrics)] = json.loads(metrics.read_text())
    params = live_dir / "params.yaml"
    # DVCLive sends `{<params.yaml>: {}}` when no params were logged
    state["params"][key(params)] = (yaml.safe_load(params.read_text()) if params.exists() else None) or {}
    for tsv in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        with tsv.open(newline="") as f:
            state["plots"][key(tsv)] = [
                {k: cast(k, v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")
            ]
    images = live_dir / "plots" / "images"
    if images.exists():
        for image in sorted(p for p in images.rglob("*") if p.is_file()):
            state["images"][key(image)] = base64.b64encode(image.read_bytes()).decode()
    return state


def received_state(bodies: list, name: str | None = None) -> dict:
    """The same shape, rebuilt from the data bodies Studio accepted (in order)."""
    state: dict = {"metrics": {}, "params": {}, "plots": {}, "images": {}}
    for body in bodies:
        if body["type"] != "data" or (name is not None and body["name"] != name):
            continue
        for path, value in body.get("metrics", {}).items():
            state["metrics"][path] = value["data"]
        state["params"].update(body.get("params", {}))
        for path, value in body.get("plots", {}).items():
            if "image" in value:
                state["images"][path] = value["image"]
            else:
                state["plots"].setdefault(path, []).extend(value["data"])
    return state


def leaf_types(value, path: str = "") -> set:
    """{(path, type name)} of every leaf of a payload value (list items under `path[]`). Unlike a whole
    document's shape, the union over a run does not depend on how many intermediate states were sent."""
    if isinstance(value, dict):
        return {leaf for k, v in value.items() for leaf in leaf_types(v, f"{path}/{k}")}
    if isinstance(value, list):
        return {leaf for v in value for leaf in leaf_types(v, f"{path}[]")}
    return {(path, type(value).__name__)}
