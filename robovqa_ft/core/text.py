"""How figures read for people, in logs, `robovqa-status`, the report and the model
card: durations and markdown tables."""

from __future__ import annotations

from collections.abc import Sequence


def duration(seconds: float) -> str:
    """42s, 5m12s, 3h05m, 2d04h."""
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def markdown_table(header: str | Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table of `rows` under the column names `header` (a list, or the names
    joined by " | ")."""
    if isinstance(header, str):
        header = header.split(" | ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
