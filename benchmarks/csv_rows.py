"""One CSV file from a list of dict rows (the first row's keys are the columns), for the benchmark scripts."""

from __future__ import annotations

import csv
import os


def write_rows(path: str, rows: list[dict]) -> str:
    """Writes `rows` to `path` (its folder made if missing); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_results(stem: str, rows: list[dict], meta: dict) -> str:
    """`stem`.csv (the rows) and `stem`.json (meta and rows); prints and returns what it wrote."""
    import json

    write_rows(stem + ".csv", rows)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {stem}.csv/.json")
    return stem
