"""Tables like ctr's (Go tabwriter: columns padded with spaces), without heavy imports."""

from __future__ import annotations

import sys
from typing import Iterable, Sequence, TextIO


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO | None = None) -> None:
    """Print `rows` under `headers`, each column as wide as its widest cell plus one space."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out.write(" ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n")


def human_size(size: float) -> str:
    """Bytes as ctr prints them (e.g. 1.9 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size} B"


def human_duration(seconds: float) -> str:
    """Uptime as 1h2m3s / 4.2s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"
