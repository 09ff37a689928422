"""Incremental, torn-write-safe readers of one DVCLive output directory.

DVCLive writes without atomic renames: metrics.json and params.yaml are truncated and rewritten,
TSVs are appended a row at a time, images are overwritten in place. These readers only ever hand on
complete data: whole TSV lines, documents that parse (and, for YAML, end in a newline and did not
change while being read), images whose format trailer is present or that have stopped changing.

TSVs are tailed from a byte offset that advances only when Studio acknowledged the rows, so the
files on disk are the spool: nothing is held in memory between reads.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
import os
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml

log = logging.getLogger("livesend")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif")
TSV_SUFFIXES = (".tsv", ".csv")
MAX_LINE = 1_000_000  # a longer TSV line is cut here (the rest of the line is skipped, with a warning)
READ_BUDGET = 4_000_000  # bytes of TSV read per file per request round: bounds memory


class Warnings:
    """Say each distinct problem once (or never, for a second reader of what the sender already read)."""

    def __init__(self, quiet: bool = False) -> None:
        self._said: set = set()
        self.quiet = quiet

    def once(self, key: Any, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            if not self.quiet:
                log.warning(message, *args)

    def forget(self, key: Any) -> None:
        self._said.discard(key)


@dataclass(frozen=True)
class Stamp:
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Stamp":
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except OSError:
        return None


# --- TSV --------------------------------------------------------------------------------------------


@dataclass
class TsvChunk:
    header: list
    rows: list  # list of (columns, fields)
    ends: list  # byte offset after each row
    max_step: Optional[int]
    more: bool = False  # the read stopped at its budget: more complete rows may follow


def split_line(raw: bytes) -> list:
    text = raw.decode("utf-8", "replace")
    if text.endswith("\r"):
        text = text[:-1]
    if '"' in text:
        try:
            return next(csv.reader([text], delimiter="\t"), [])
        except csv.Error:  # e.g. a stray "\r" inside: not DVCLive's quoting, take the fields as they are
            pass
    return text.split("\t")


def align(header: list, fields: list) -> Optional[list]:
    """Columns for a row whose length differs from the header (DVCLive's DictWriter keeps the first
    header even when `timestamp=True` is toggled later). None when no sensible mapping exists."""
    if len(fields) == len(header):
        return header
    if "timestamp" not in header and len(fields) == len(header) + 1:
        return ["timestamp"] + header
    if header and header[0] == "timestamp" and len(fields) == len(header) - 1:
        return header[1:]
    return None


def looks_like_header(fields: list) -> bool:
    if "step" not in fields:
        return False
    for value in fields:
        try:
            float(value)
            return False
        except ValueError:
            pass
    return True


class TsvTail:
    """Reads new complete rows of one TSV from the acknowledged offset."""

    def __init__(self, path: str, key: str, warnings: Warnings) -> None:
        self.path = path
        self.key = key
        self.warnings = warnings
        self.ino: Optional[int] = None
        self._mark: Optional[tuple] = None  # (bytes just before the offset, (size, mtime) they were last seen at)
        self.offset = 0  # acknowledged byte offset (0: header not read yet)
        self.header: Optional[list] = None
        self.header_end = 0
        self.rows_acked = 0
        self._header_changes: list = []  # (offset after the new header line, new header)
        self._long_line = (-1, 0)  # (line start, how far its end was searched for)

    def is_replaced(self, st: os.stat_result) -> bool:
        """True when the file was re-created or truncated below what was consumed (a fresh run). A file
        deleted and re-created often gets the same inode number back, and may have outgrown the offset
        by the next look: so the bytes just before the offset must also still be the ones consumed."""
        if self.ino is None:
            return False
        if st.st_ino != self.ino or st.st_size < self.offset:
            return True
        if self._mark is None or self._mark[1] == (st.st_size, st.st_mtime_ns):
            return False
        now = self._bytes_before(self.offset)
        if now is None:
            return False
        if now != self._mark[0]:
            return True
        self._mark = (now, (st.st_size, st.st_mtime_ns))
        return False

    def _bytes_before(self, offset: int) -> Optional[bytes]:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, offset - 64))
                return f.read(min(64, offset))
        except OSError:
            return None

    def restart(self) -> None:
        self.ino, self.offset, self.header, self.header_end, self._mark = None, 0, None, 0, None
        self._header_changes = []
        self._long_line = (-1, 0)

    def read(self, budget: int = READ_BUDGET) -> Optional[TsvChunk]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if self.ino is None:
                    self.ino = st.st_ino
                if self.header is None:
                    line = f.readline(MAX_LINE)
                    if not line.endswith(b"\n"):
                        return None
                    self.header = split_line(line[:-1])
                    self.header_end = self.offset = len(line)
                f.seek(self.offset)
                data = f.read(budget)
                if len(data) == budget < MAX_LINE and b"\n" not in data:  # no line ends within the budget:
                    budget = MAX_LINE  # read on to MAX_LINE, so a long line can still end (or be cut)
                    data += f.read(budget - len(data))
                chunk = self._parse(f, data)
                if chunk is not None:
                    chunk.more = len(data) == budget
                return chunk
        except OSError as exc:
            self.warnings.once(("read", self.path), "cannot read %s (%s); skipping it", self.key, exc.strerror or exc)
            return None

    def _parse(self, f, data: bytes) -> Optional[TsvChunk]:
        cut = data.rfind(b"\n")
        base = self.offset
        long_tail = None
        if cut < 0:
            if len(data) < MAX_LINE:
                return None
            long_tail = self._skip_long_line(f, base + len(data))
            if long_tail is None:
                return None
            lines = [data[:MAX_LINE]]
            ends = [long_tail]
        else:
            lines = data[:cut].split(b"\n")
            ends = []
            pos = base
            for line in lines:
                pos += len(line) + 1
                ends.append(pos)
        header = self.header
        rows, row_ends = [], []
        max_step = None
        for line, end in zip(lines, ends):
            if len(line) > MAX_LINE:
                self.warnings.once(("long", self.path), "a line of %s is over %d bytes; it is cut", self.key, MAX_LINE)
                line = line[:MAX_LINE]
            fields = split_line(line)
            if not fields or fields == [""]:
                continue
            if looks_like_header(fields):  # before `align`: a new header may have the old one's length
                self.warnings.once(("header", self.path), "the header of %s changed mid-file; following it", self.key)
                header = fields
                if (end, fields) not in self._header_changes:
                    self._header_changes.append((end, fields))
                continue
            columns = align(header, fields)
            if columns is None:
                self.warnings.once(
                    ("align", self.path), "rows of %s do not match its header %s; sending them as they are", self.key, header
                )
                columns = header + [f"column{i}" for i in range(len(header), len(fields))]
            rows.append((columns, fields))
            row_ends.append(end)
            if "step" in columns:
                try:
                    step = int(fields[columns.index("step")])
                    max_step = step if max_step is None or step > max_step else max_step
                except (ValueError, IndexError):
                    pass
        if not rows and ends:
            self.ack(ends[-1], 0)  # only blank lines or a header change: nothing to deliver
        return TsvChunk(header, rows, row_ends, max_step)

    def _skip_long_line(self, f, pos: int) -> Optional[int]:
        """Find the end of an over-long line without holding it; None while it is still incomplete."""
        self.warnings.once(("long", self.path), "a line of %s is over %d bytes; it is cut", self.key, MAX_LINE)
        start, searched = self._long_line
        if start == self.offset and searched > pos:
            pos = searched  # resume where the last search for its end stopped: never rescan
        f.seek(pos)
        while True:
            block = f.read(1 << 20)
            if not block:
                self._long_line = (self.offset, pos)
                return None
            i = block.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(block)

    def ack(self, end: int, rows: int) -> None:
        if end > self.offset:
            mark = self._bytes_before(end)
            self._mark = None if mark is None else (mark, None)
        self.offset = max(self.offset, end)
        self.rows_acked += rows
        while self._header_changes and self._header_changes[0][0] <= self.offset:
            self.header = self._header_changes.pop(0)[1]

    def pending_rows(self) -> int:
        """Complete rows on disk not yet acknowledged (counted by streaming, for the final report)."""
        count = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset or 0)
                while block := f.read(1 << 20):
                    count += block.count(b"\n")
        except OSError:
            return 0
        return count - (1 if self.header is None and count else 0)


# --- JSON / YAML documents ----------------------------------------------------------------------------


def sendable(value: Any) -> Any:
    """A parsed value that `json.dumps(allow_nan=False)` takes: NaN/Inf become DVCLive's "nan"/"inf"/"-inf"
    (the strings it writes itself), other non-JSON YAML values (dates, sets, bytes) their text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if value != value else "inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else str(sendable(k)): sendable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sendable(v) for v in value]
    return str(value)


def parse_json(text: str) -> Any:
    return sendable(json.loads(text))


def parse_yaml(text: str) -> Any:
    if not text.endswith("\n"):
        raise ValueError("no final newline yet")
    return sendable(yaml.safe_load(text))


class Document:
    """The last good parsed value of a file that DVCLive rewrites in place (metrics.json, params.yaml)."""

    def __init__(
        self, path: str, key: str, parse: Callable[[str], Any], warnings: Warnings, tree_root: Optional[str] = None
    ) -> None:
        self.path, self.key, self.parse, self.warnings = path, key, parse, warnings
        self.tree_root = tree_root  # a link leading out of it is not read (without one: out of the file's directory)
        self.value: Any = None
        self.stamp: Optional[Stamp] = None
        self.exists = False

    def _real_path(self) -> Optional[str]:
        real = os.path.realpath(self.path)
        directory = os.path.dirname(self.path)
        root = allowed_root(directory, self.tree_root) if self.tree_root else os.path.realpath(directory)
        if root is not None and inside(real, root):
            return real
        self.warnings.once(("link", self.path), "%s links outside the working tree; not uploading it", self.key)
        return None

    def poll(self) -> bool:
        """Re-read when the file changed; True when a new good value was taken."""
        st = _stat(self.path)
        real = self._real_path() if st is not None else None
        self.exists = real is not None and stat_mod.S_ISREG(st.st_mode)
        if not self.exists:
            return False
        stamp = Stamp.of(st)
        if stamp == self.stamp:
            return False
        try:
            with open(real, "rb") as f:
                raw = f.read()
                after = Stamp.of(os.fstat(f.fileno()))
        except OSError as exc:
            self.warnings.once(("read", self.path), "cannot read %s (%s); skipping it", self.key, exc.strerror or exc)
            return False
        if after != stamp or not raw.strip():
            return False  # being written: read again on the next change
        try:
            value = self.parse(raw.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a good value yet"
            self.warnings.once(
                ("parse", self.path, stamp.size), "%s is not valid yet (%s); keeping its last good value", self.key,
                str(exc).splitlines()[0][:120],
            )
            return False
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.warnings.once(("type", self.path), "%s does not hold a mapping; ignoring it", self.key)
            return False
        self.stamp = stamp
        if value == self.value:
            return False
        self.value = value
        return True


# --- images -----------------------------------------------------------------------------------------

_TRAILERS = {".png": (b"IEND\xaeB`\x82",), ".gif": (b";",), ".jpg": (b"\xff\xd9",), ".jpeg": (b"\xff\xd9",)}


def _gif_complete(data: bytes) -> bool:
    """Walk GIF's length-prefixed blocks to the trailer (a `;` byte alone also occurs inside LZW data)."""
    if len(data) < 13 or not data.startswith(b"GIF"):
        return False
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # global colour table
    while pos < len(data):
        kind = data[pos]
        if kind == 0x3B:
            return True
        if kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif kind == 0x2C and pos + 10 <= len(data):  # image: descriptor, local colour table, LZW size
            flags = data[pos + 9]
            pos += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        else:
            return False
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1  # the sub-blocks' terminator
    return False


def image_complete(suffix: str, data: bytes) -> bool:
    if suffix == ".gif":
        return _gif_complete(data)
    tail = data[-64:].rstrip(b"\x00")
    return any(t in tail[-len(t) - 16 :] for t in _TRAILERS.get(suffix, (b"",)))


def read_image(path: str, stamp: Stamp, force: bool) -> Optional[str]:
    """Base64 of an image file, or None while it looks half-written (unless `force`)."""
    with open(path, "rb") as f:
        data = f.read()
        if Stamp.of(os.fstat(f.fileno())) != stamp:
            return None
    if not data:
        return None
    if not force and not image_complete(os.path.splitext(path)[1].lower(), data):
        return None
    return base64.b64encode(data).decode("ascii")


# --- scanning the directory -------------------------------------------------------------------------


@dataclass
class Listing:
    """What one scan of a DVCLive directory found: paths keyed by their Studio key."""

    is_dir: bool = False
    tsvs: dict = field(default_factory=dict)  # key -> (path, stat)
    images: dict = field(default_factory=dict)  # key -> (path, stat)

    @property
    def has_plots(self) -> bool:
        return bool(self.tsvs or self.images)


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def allowed_root(live_dir: str, tree_root: str) -> Optional[str]:
    """What links under `live_dir` may lead into: the working tree; or, for a directory named outside the
    tree on purpose (--dir /scratch/x), that directory; None when `live_dir` itself is a link out of the tree."""
    real_live = os.path.realpath(live_dir)
    if inside(real_live, tree_root):
        return tree_root
    if inside(os.path.abspath(live_dir), tree_root):
        return None
    return real_live


def scan(live_dir: str, live_key: str, tree_root: str, warnings: Warnings) -> Listing:
    """List TSVs under plots/metrics and images under plots/images. Symlinks that leave `tree_root`
    (the working tree) are never followed or read."""
    listing = Listing()
    st = _stat(live_dir)
    if st is None:
        return listing
    if not stat_mod.S_ISDIR(st.st_mode):
        warnings.once(("notdir", live_dir), "%s is not a directory; waiting for DVCLive output there", live_key)
        return listing
    listing.is_dir = True
    prefix = live_key + "/" if live_key not in ("", ".") else ""
    root = allowed_root(live_dir, tree_root)
    if root is None:  # the directory in the tree is a link out of it
        warnings.once(("link", live_dir), "%s links outside the working tree; not uploading its plots", live_key)
        return listing
    _walk(os.path.join(live_dir, "plots", "metrics"), prefix + "plots/metrics", TSV_SUFFIXES, listing.tsvs, root, warnings)
    _walk(os.path.join(live_dir, "plots", "images"), prefix + "plots/images", IMAGE_SUFFIXES, listing.images, root, warnings)
    return listing


def _walk(top: str, top_key: str, suffixes: tuple, out: dict, tree_root: str, warnings: Warnings) -> None:
    top_st = _stat(top)
    if top_st is None:
        return
    if not inside(os.path.realpath(top), tree_root):  # `plots` or `plots/metrics` itself is a link out
        warnings.once(("link", top), "%s links outside the working tree; not uploading it", top_key)
        return
    stack = [(top, top_key)]
    seen_dirs: set = {(top_st.st_dev, top_st.st_ino)}
    while stack:
        path, key = stack.pop()
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue
        except OSError as exc:
            warnings.once(("scandir", path), "cannot list %s (%s); skipping it", key, exc.strerror or exc)
            continue
        for entry in entries:
            entry_key = key + "/" + entry.name
            try:
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not inside(real, tree_root):
                        warnings.once(("link", entry.path), "%s links outside the working tree; not uploading it", entry_key)
                        continue
                if entry.is_dir():
                    dir_st = os.stat(entry.path)
                    ident = (dir_st.st_dev, dir_st.st_ino)
                    if ident not in seen_dirs:
                        seen_dirs.add(ident)
                        stack.append((entry.path, entry_key))
                elif entry.name.lower().endswith(suffixes) and entry.is_file():
                    out[entry_key] = (entry.path, entry.stat())
            except OSError as exc:
                warnings.once(("stat", entry.path), "cannot read %s (%s); skipping it", entry_key, exc.strerror or exc)
