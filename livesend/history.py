"""Metric histories for the end-of-run report, read from the DVCLive TSVs on disk, with bounded
memory and time whatever their size.

A TSV up to STREAM_LIMIT bytes is streamed once and decimated as it goes (keep every k-th row, double
k whenever the kept points reach 2 x MAX_POINTS); a larger one is sampled by seeking to MAX_POINTS
evenly spaced offsets, plus its last complete row. Either way at most about 2 x MAX_POINTS points of
one metric are ever held, and no line longer than MAX_LINE is read into memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from livesend.reader import Warnings, align, scan, split_line

MAX_POINTS = 60  # points kept per metric (up to twice that while streaming)
STREAM_LIMIT = 4 * 1024 * 1024  # bytes: larger TSVs are sampled by seeking instead of read whole
MAX_LINE = 64 * 1024  # a longer line is skipped
MAX_SERIES = 1000  # TSV files read per DVCLive directory
TAIL = 256 * 1024  # bytes read from the end of a large TSV to find its last complete row


@dataclass
class Series:
    """One plotted metric: sampled (step, value) points; value None for NaN, inf or text."""

    name: str
    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    rows: int = 0  # rows in the file (an estimate when `sampled`)
    sampled: bool = False

    @property
    def last(self) -> Optional[float]:
        return self.values[-1] if self.values else None

    @property
    def last_step(self) -> Optional[int]:
        return self.steps[-1] if self.steps else None


def number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class _Columns:
    def __init__(self, header: list) -> None:
        self.header = header
        names = [c for c in header if c not in ("timestamp", "step")]
        self.value = names[0] if names else None

    def point(self, raw: bytes, index: int) -> Optional[tuple]:
        """(step, value) of one complete line, or None for a line that does not fit the header."""
        fields = split_line(raw.rstrip(b"\n"))
        columns = align(self.header, fields)
        if columns is None or self.value is None:
            return None
        row = dict(zip(columns, fields))
        if self.value not in row:
            return None
        step = index
        if "step" in row:
            try:
                step = int(float(row["step"]))
            except ValueError:
                return None
        return step, number(row[self.value])


def _readline(f, skip_long: bool = True) -> Optional[bytes]:
    """The next complete line (with its newline), b"" at the end, None for a line over MAX_LINE
    (skipped to its end when `skip_long`, else left where it is: a sample never scans on).
    A last line without a newline is torn (still being written): treated as the end."""
    line = f.readline(MAX_LINE)
    if not line:
        return b""
    if line.endswith(b"\n"):
        return line
    if len(line) < MAX_LINE:
        return b""  # torn last line
    if not skip_long:
        return None
    while True:  # skip the rest of an overlong line
        rest = f.readline(MAX_LINE)
        if not rest:
            return b""
        if rest.endswith(b"\n"):
            return None


def read_series(path: str, name: str, max_points: int = MAX_POINTS, stream_limit: int = STREAM_LIMIT) -> Optional[Series]:
    """The sampled history of one DVCLive TSV, or None when it cannot be read or has no header."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_line = _readline(f, skip_long=False)
            if not header_line:
                return None
            columns = _Columns(split_line(header_line.rstrip(b"\n")))
            if columns.value is None:
                return None
            if size <= stream_limit:
                return _stream(f, columns, name, max_points)
            return _sample(f, size, columns, name, max_points)
    except OSError:
        return None


def _stream(f, columns: _Columns, name: str, max_points: int) -> Series:
    kept: list = []
    stride, index, last = 1, 0, None
    while True:
        line = _readline(f)
        if line == b"":
            break
        if line is None:
            continue
        point = columns.point(line, index)
        if point is None:
            continue
        if index % stride == 0:
            kept.append(point)
            if len(kept) >= 2 * max_points:
                kept = kept[::2]
                stride *= 2
        last = point
        index += 1
    if last is not None and (not kept or kept[-1] is not last):
        kept.append(last)
    return Series(name, [p[0] for p in kept], [p[1] for p in kept], rows=index, sampled=stride > 1)


def _sample(f, size: int, columns: _Columns, name: str, max_points: int) -> Series:
    start = f.tell()
    span = size - start
    kept: list = []
    lengths: list = []
    for i in range(max_points):
        offset = start + span * i // max_points
        f.seek(offset)
        if offset > start:  # the rest of the line the seek landed in
            rest = _readline(f, skip_long=False)
            if rest == b"":
                break
            if rest is None:
                continue
        line = _readline(f, skip_long=False)
        if not line:
            continue
        lengths.append(len(line))
        point = columns.point(line, i)
        if point is not None and (not kept or point[0] > kept[-1][0]):
            kept.append(point)
    f.seek(max(start, size - TAIL))
    tail = f.read(TAIL)
    end = tail.rfind(b"\n")
    if end > 0:
        begin = tail.rfind(b"\n", 0, end) + 1
        point = columns.point(tail[begin:end + 1], max_points)
        if point is not None and (not kept or point[0] > kept[-1][0]):
            kept.append(point)
    rows = round(span / (sum(lengths) / len(lengths))) if lengths else 0
    return Series(name, [p[0] for p in kept], [p[1] for p in kept], rows=rows, sampled=True)


def plotted_metrics(live_dir: str, tree_root: str, max_series: int = MAX_SERIES) -> tuple[dict, int]:
    """({metric name: Series} of <live_dir>/plots/metrics/**/*.tsv in name order, files not read
    because there were more than `max_series`). Listed as the sender lists them: links out of the
    working tree are not read."""
    prefix = "plots/metrics/"
    listing = scan(live_dir, "", tree_root, Warnings(quiet=True))  # the sender warned already
    found = sorted((key[len(prefix):-len(".tsv")], path) for key, (path, _) in listing.tsvs.items()
                   if key.startswith(prefix) and key.endswith(".tsv"))
    out = {}
    for name, path in found[:max_series]:
        series = read_series(path, name)
        if series is not None:
            out[name] = series
    return out, max(0, len(found) - max_series)
