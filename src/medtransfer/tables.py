"""The CSV tables the analysis writes and the report reads: one way to write them and one way to read them.

Floats are written as the shortest text that reads back as the same float, so a table can be recomputed from
exactly (a rounded value moves Pearson's r of a few close points by 1e-5); booleans as true/false; missing as ''.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else repr(value)
    return "" if value is None else str(value)


def write_table(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """Write `rows` (dicts; missing keys are empty cells) under the header `columns`, atomically."""
    from medtransfer.atomic_files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row.get(column)) for column in columns])
    atomic_write_text(path, buffer.getvalue())


def read_table(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))
