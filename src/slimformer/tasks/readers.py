"""Read rows of text files (GLUE TSV, CSV, TSV, JSON lines) with line numbers for error messages."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from slimformer.errors import DataFileError

Row = tuple[int, list[Any]]
"""(1-based line number where the row starts, the values of the requested columns in request order)."""

# A long QNLI or MNLI passage can exceed csv's default 128 KiB field limit; a few MiB is plenty.
csv.field_size_limit(16 * 1024 * 1024)


def file_format(path: Path) -> str:
    """ "csv", "tsv" or "jsonl", from the file name's extension."""
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
    if suffix not in formats:
        raise DataFileError(
            path,
            f"unknown file type {suffix or '(no extension)'!r}: expected .csv, .tsv or .jsonl (JSON lines)",
        )
    return formats[suffix]


def _bad_utf8_line(path: Path) -> int | None:
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return data.count(b"\n", 0, error.start) + 1
    return None


def _records(path: Path, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """Every non-blank record with the line it starts on; decoding and csv errors become DataFileError."""
    line = 0
    try:
        # utf-8-sig drops a byte-order mark (MRPC's header starts with one) and is plain UTF-8 otherwise.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE)
            for fields in reader:
                start, line = line + 1, reader.line_num
                if fields and any(field.strip() for field in fields):
                    yield start, fields
    except UnicodeDecodeError as error:
        # The decoder reads ahead of the csv reader, so locate the bad byte in the raw file instead.
        raise DataFileError(path, f"is not UTF-8 text ({error.reason})", line=_bad_utf8_line(path)) from error
    except csv.Error as error:
        raise DataFileError(
            path, f"is not valid {'CSV' if delimiter == ',' else 'TSV'}: {error}", line=line + 1
        ) from error
    except OSError as error:
        raise DataFileError(path, f"cannot be read: {error.strerror or error}") from error


def _column_indices(path: Path, header: list[str], columns: Sequence[str | int]) -> list[int]:
    names = [name.strip() for name in header]
    missing = [str(c) for c in columns if isinstance(c, str) and c not in names]
    if missing:
        raise DataFileError(
            path,
            f"missing required column(s) {', '.join(map(repr, missing))}; "
            f"the header has: {', '.join(map(repr, names))}",
            line=1,
        )
    return [c if isinstance(c, int) else names.index(c) for c in columns]


def read_delimited(
    path: Path,
    columns: Sequence[str | int],
    *,
    delimiter: str,
    quoted: bool,
    has_header: bool = True,
    exact_width: bool = False,
) -> Iterator[Row]:
    """The requested columns of every data row of a CSV or TSV file.

    ``columns`` are header names, or 0-based indices when the file has no header. Fields beyond the last
    requested one are ignored unless ``exact_width`` (then every row must have as many fields as the header:
    in a CSV file an extra field usually means an unquoted comma that has shifted the columns).
    """
    records = _records(path, delimiter, csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    indices = [int(c) for c in columns] if not has_header else []
    width = 0
    if has_header:
        first = next(records, None)
        if first is None:
            raise DataFileError(path, "is empty: expected a header line and at least one data row")
        header = first[1]
        indices = _column_indices(path, header, columns)
        width = len(header)
    needed = max(indices) + 1
    separator = "comma" if delimiter == "," else "tab"
    for line, fields in records:
        if exact_width and len(fields) != width:
            raise DataFileError(
                path,
                f"has {len(fields)} {separator}-separated fields but the header has {width}"
                + ("; quote fields that contain commas" if delimiter == "," else ""),
                line=line,
            )
        if len(fields) < needed:
            raise DataFileError(
                path,
                f"has {len(fields)} {separator}-separated field(s), expected at least {needed}",
                line=line,
            )
        yield line, [fields[i] for i in indices]


def read_jsonl(path: Path, columns: Sequence[str]) -> Iterator[Row]:
    """The requested keys of every object in a JSON-lines file (one JSON object per line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"is not UTF-8 text ({error.reason})", line=_bad_utf8_line(path)) from error
    except OSError as error:
        raise DataFileError(path, f"cannot be read: {error.strerror or error}") from error
    # split("\n"), not splitlines(): the latter also breaks at characters such as U+2028 inside a string.
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataFileError(
                path, f"is not valid JSON lines: {error.msg} at column {error.colno}", line=line
            ) from error
        if not isinstance(item, dict):
            raise DataFileError(path, f"expected one JSON object per line, found a {type(item).__name__}", line=line)
        missing = [c for c in columns if c not in item]
        if missing:
            raise DataFileError(
                path,
                f"missing required key(s) {', '.join(map(repr, missing))}; the object has: "
                f"{', '.join(map(repr, item)) or 'no keys'}",
                line=line,
            )
        yield line, [item[c] for c in columns]
