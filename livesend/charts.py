"""Small charts of a metric over steps: a Unicode sparkline (any text target) and a Mermaid
`xychart-beta` line chart (Markdown targets that render Mermaid: GitHub and GitLab)."""

from __future__ import annotations

import math
from typing import Optional

BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 20
CHART_POINTS = 40


def _buckets(values: list, width: int) -> list:
    """`values` squeezed to at most `width` points: the mean of each bucket (None when it has no number)."""
    n = len(values)
    if n <= width:
        return list(values)
    out = []
    for i in range(width):
        bucket = [v for v in values[i * n // width:(i + 1) * n // width] if v is not None]
        out.append(sum(bucket) / len(bucket) if bucket else None)
    return out


def sparkline(values: list, width: int = SPARK_WIDTH) -> str:
    """`▁▂▄▇█`-style line of the values (None: a gap, shown as a space); "" when there is no number."""
    points = _buckets(values, width)
    finite = [v for v in points if v is not None]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    out = []
    for v in points:
        if v is None:
            out.append(" ")
        elif hi == lo:
            out.append(BLOCKS[3])
        else:
            out.append(BLOCKS[min(7, max(0, round((v - lo) / (hi - lo) * 7)))])
    return "".join(out)


def plain_number(value: float, digits: int = 6) -> str:
    """A decimal without exponent (Mermaid's xychart grammar has none): about `digits` significant digits."""
    if value == 0:
        return "0"
    places = max(0, min(12, digits - 1 - math.floor(math.log10(abs(value)))))
    text = f"{value:.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _resample(steps: list, values: list, n: int) -> Optional[tuple]:
    """(first step, last step, n values at evenly spaced steps), linearly interpolated between the
    finite points, or None when fewer than two finite points span more than one step."""
    points = [(s, v) for s, v in zip(steps, values) if v is not None]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    first, last = points[0][0], points[-1][0]
    n = max(2, min(n, len(points)))
    out, j = [], 0
    for i in range(n):
        x = first + (last - first) * i / (n - 1)
        while j + 1 < len(points) - 1 and points[j + 1][0] <= x:
            j += 1
        (x0, y0), (x1, y1) = points[j], points[j + 1]
        out.append(y0 if x1 == x0 else y0 + (y1 - y0) * min(1.0, max(0.0, (x - x0) / (x1 - x0))))
    return first, last, out


def mermaid_line_chart(title: str, steps: list, values: list, points: int = CHART_POINTS) -> Optional[str]:
    """A fenced ```mermaid xychart-beta block of one metric over steps, or None when there is not
    enough to draw."""
    sampled = _resample(steps, values, points)
    if sampled is None:
        return None
    first, last, ys = sampled
    label = " ".join(title.replace('"', "'").replace("`", "'").split())
    return "\n".join([
        "```mermaid",
        "xychart-beta",
        f'    title "{label}"',
        f'    x-axis "step" {first} --> {last}',
        f"    line [{', '.join(plain_number(y) for y in ys)}]",
        "```",
    ])
