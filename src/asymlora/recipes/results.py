"""The paper's tables from the run folders of ``asymlora run``.

Rows are ``<strategy> r=<r>``, columns the tasks' headline metrics (in recipe order);
cells are mean ± std over seeds (sample std, ddof = 1; the std is omitted for one
seed), in percent. GLUE gets an ``Avg`` column: the mean over tasks of the per-task
means (only for rows that have every task). One table per recipe.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asymlora.errors import MissingFileError, UserError
from asymlora.fileio import atomic_write_text

__all__ = ["collect", "build_tables", "to_markdown", "to_csv", "load_tables", "write_tables"]


def collect(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every result.json under the given directories (sorted, de-duplicated by path)."""
    seen: dict[str, dict] = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise MissingFileError(f"{d} does not exist")
        files = [d] if d.is_file() else sorted(d.rglob("result.json"))
        for f in files:
            key = str(f.resolve())
            if key in seen:
                continue
            try:
                with open(f, encoding="utf-8") as fh:
                    rec = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{f}: not valid JSON: {err}") from err
            for k in ("recipe", "task", "strategy", "r", "seed", "columns"):
                if not isinstance(rec, dict) or k not in rec:
                    raise UserError(f"{f}: not an `asymlora run` result (missing {k!r})")
            seen[key] = rec
    return list(seen.values())


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var)


def build_tables(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{recipe: {"columns": [...], "rows": {label: {col: (mean, std, n)}}, "table": str}} (values in %)."""
    by_recipe: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_recipe[rec["recipe"]].append(rec)
    tables: dict[str, dict[str, Any]] = {}
    for name, recs in by_recipe.items():
        col_key: dict[str, tuple] = {}
        avg_cols: list[str] = []
        cells: dict[str, dict[str, list[float]]] = OrderedDict()
        row_key: dict[str, tuple] = {}
        for rec in recs:
            label = f"{rec['strategy']} r={rec['r']}"
            s_idx = rec.get("strategy_index", math.inf)
            row_key[label] = min(row_key.get(label, (math.inf,)), (s_idx, len(row_key), rec["r"]))
            row = cells.setdefault(label, OrderedDict())
            t_idx = rec.get("task_index", math.inf)
            for j, (col, v) in enumerate(rec["columns"].items()):
                col_key.setdefault(col, (t_idx, len(col_key), j))
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    row.setdefault(col, []).append(100.0 * float(v))
            for col in rec.get("avg_columns", []):
                if col not in avg_cols:
                    avg_cols.append(col)
        # columns in recipe task order, rows in recipe strategy order then rank (first-seen order otherwise)
        columns = sorted(col_key, key=lambda c: (col_key[c][0], col_key[c][1] if col_key[c][0] == math.inf
                                                 else 0, col_key[c][2]))
        rows: dict[str, dict[str, tuple[float, float | None, int]]] = OrderedDict()
        for label in sorted(cells, key=lambda lab: (row_key[lab][0], row_key[lab][2]) if row_key[lab][0] != math.inf
                            else (math.inf, row_key[lab][1])):
            rows[label] = {c: (*_mean_std(v), len(v)) for c, v in cells[label].items() if v}
        if avg_cols:
            columns.append("Avg")
            for summary in rows.values():
                if all(c in summary for c in avg_cols):
                    means = [summary[c][0] for c in avg_cols]
                    summary["Avg"] = (sum(means) / len(means), None, min(summary[c][2] for c in avg_cols))
        tables[name] = {"columns": columns, "rows": rows, "table": recs[0].get("table", "")}
    return tables


def _cell(v: tuple[float, float | None, int] | None, digits: int) -> str:
    if v is None:
        return "–"
    m, s, _ = v
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def to_markdown(tables: dict[str, dict[str, Any]], digits: int = 2) -> str:
    out = io.StringIO()
    for name, t in tables.items():
        title = f"### {name}" + (f" — {t['table']}" if t["table"] else "")
        out.write(title + "\n\n")
        cols = t["columns"]
        out.write("| method | " + " | ".join(cols) + " |\n")
        out.write("|---|" + "|".join("---:" for _ in cols) + "|\n")
        for label, row in t["rows"].items():
            out.write(f"| {label} | " + " | ".join(_cell(row.get(c), digits) for c in cols) + " |\n")
        n_seeds = sorted({v[2] for row in t["rows"].values() for v in row.values()})
        out.write(f"\nmean ± std over seeds (n = {', '.join(map(str, n_seeds))}), in %.\n\n")
    return out.getvalue()


def to_csv(tables: dict[str, dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["recipe", "method", "column", "mean", "std", "n_seeds"])
    for name, t in tables.items():
        for label, row in t["rows"].items():
            for c in t["columns"]:
                if c in row:
                    m, s, n = row[c]
                    w.writerow([name, label, c, f"{m:.6f}", "" if s is None else f"{s:.6f}", n])
    return out.getvalue()


def load_tables(dirs: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """The tables of every ``result.json`` under ``dirs``. No result at all is the caller's
    mistake (a folder that ``asymlora run`` did not write): a :class:`UserError`."""
    dirs = list(dirs)
    records = collect(dirs)
    if not records:
        raise UserError(f"no result.json under {' '.join(map(str, dirs))}: give the --output-dir of `asymlora run`")
    return build_tables(records)


def write_tables(tables: dict[str, dict[str, Any]], folder: str | os.PathLike, digits: int = 2) -> list[Path]:
    """``folder/results.md`` and ``folder/results.csv`` (atomic writes); returns both paths."""
    md, table_csv = Path(folder) / "results.md", Path(folder) / "results.csv"
    atomic_write_text(md, to_markdown(tables, digits))
    atomic_write_text(table_csv, to_csv(tables))
    return [md, table_csv]
