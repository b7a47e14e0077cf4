"""A malformed ``--data`` table is refused, not guessed: each check names the file, the row (as
a spreadsheet counts it: the header is row 1) and what was expected, in one line.

- the file must be UTF-8 (no byte is replaced in silence);
- every CSV/TSV row has as many fields as the header (an unquoted comma in a text shifts the
  columns: quote such fields);
- no row has a blank text or a blank label;
- two labels that differ only in spelling (``1``, ``1.0``, `` 1``; ``pos``, ``pos ``) are refused:
  the file must write each class one way (labels are never silently merged or split);
- at least two classes, and each class with enough rows for the train, validation and test
  splits (``check_split_sizes``).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from asymlora.errors import UserError

__all__ = ["read_utf8", "csv_rows", "check_cells", "check_split_sizes"]


def read_utf8(path: str) -> str:
    """The file's text; a byte that is not UTF-8 is refused with its line."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"--data {path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
                        "UTF-8") from None


def csv_rows(path: str, text: str, delimiter: str) -> list[dict[str, str]]:
    """The rows of a CSV/TSV text as dicts by header; a row with another number of fields than
    the header is refused (a shifted column is never read as data)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                sep = "tab" if delimiter == "\t" else "comma"
                raise UserError(f"--data {path}: row {reader.line_num} has {len(fields)} fields, the header has "
                                f"{len(header)} ({', '.join(header)}): a {sep} inside an unquoted text shifts the "
                                "columns; quote such fields")
            rows.append(dict(zip(header, fields)))
    except csv.Error as err:
        raise UserError(f"--data {path}: row {reader.line_num} is not valid {'TSV' if delimiter == chr(9) else 'CSV'}: "
                        f"{err}") from None
    return rows


def _spelling(label: str) -> str:
    """What two spellings of one label have in common: stripped, case-folded, a number as a number."""
    s = label.strip().casefold()
    try:
        return repr(float(s))
    except ValueError:
        return s


def check_cells(path: str, texts: Sequence[Any], labels: Sequence[Any], first_row: int = 2) -> None:
    """Refuse a blank text or label, and labels that differ only in spelling (rows counted from
    ``first_row``: 2 for a table with a header)."""
    seen: dict[str, tuple[str, int]] = {}
    for i, (text, label) in enumerate(zip(texts, labels)):
        row = first_row + i
        if label is None or str(label).strip() == "":
            raise UserError(f"--data {path}: row {row} has a blank label; every row needs a class")
        if text is None or str(text).strip() == "":
            raise UserError(f"--data {path}: row {row} has a blank text")
        raw = str(label)
        key = _spelling(raw)
        if key in seen and seen[key][0] != raw:
            other, other_row = seen[key]
            raise UserError(f"--data {path}: labels {other!r} (row {other_row}) and {raw!r} (row {row}) differ only "
                            "in spelling; write each class one way")
        seen.setdefault(key, (raw, row))


def check_split_sizes(name: str, labels: Sequence[int], label_names: Sequence[str], sizes: Sequence[int]) -> None:
    """Every class needs a row in train, validation and test (3 rows at least), and neither
    validation nor test may be empty."""
    for c, label in enumerate(label_names):
        n = sum(1 for v in labels if v == c)
        if n < 3:
            raise UserError(f"--data {name}: class {label!r} has {n} row(s); each class needs at least 3 (one each for "
                            "training, validation and test)")
    for part, size in zip(("validation", "test"), sizes[1:]):
        if size == 0:
            raise UserError(f"--data {name}: {len(labels)} rows leave the {part} split empty; give more rows")
