"""Reading the raw tables (docs/design.md §2) with Beam IO, on any filesystem Beam supports.

A table is one file ``<table>.<ext>`` or shards ``<table>-*.<ext>`` in the input directory; the formats are
JSONL (``.jsonl``, ``.jsonl.gz``), CSV (``.csv``, ``.csv.gz``; one header row per file, lists as JSON array
strings or space-separated) and Parquet (``.parquet``). ``ReadRawTable`` turns a table into raw row dicts
plus ``unparseable_row`` dead letters; validating the values is ``transforms``' job. CSV is read line by line
(splittable ``ReadAllFromText``), so a quoted field holding a line break is dead-lettered, not joined.

Imports only the standard library and Beam (light for Dataflow workers).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
from typing import Dict, List, Optional, Sequence

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.filesystems import FileSystems

logger = logging.getLogger(__name__)

# Longest suffix first: ".jsonl.gz" must win over ".gz".
FORMAT_SUFFIXES = (
    (".jsonl.gz", "jsonl"),
    (".jsonl", "jsonl"),
    (".csv.gz", "csv"),
    (".csv", "csv"),
    (".parquet", "parquet"),
)
DEAD_LETTER_TAG = "dead_letter"

# Dead-letter reasons (the reason string of every dead letter the pipeline writes).
UNPARSEABLE_ROW = "unparseable_row"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_ITEM = "unknown_item"
BAD_EMBEDDING = "bad_embedding"  # image_embedding that is not a list of finite floats
BAD_EMBEDDING_DIM = "bad_embedding_dim"
BAD_LABEL = "bad_label"
BAD_SPLIT = "bad_split"
UNUSED_EVENT_TYPE = "unused_event_type"
DUPLICATE_ITEM = "duplicate_item"
DUPLICATE_USER = "duplicate_user"


def missing_field(name: str) -> str:
    return f"missing_field:{name}"


def bad_field(name: str) -> str:
    """A present value of an unusable type or shape (an id that is a list, or holds a line break)."""
    return f"bad_field:{name}"


@dataclasses.dataclass(frozen=True)
class TableFiles:
    """The files of one raw table: its name, format (``jsonl``/``csv``/``parquet``) and sorted paths."""

    table: str
    fmt: str
    paths: tuple
    csv_headers: tuple = ()  # one header (tuple of column names) per path, CSV only


def file_format(path: str) -> Optional[str]:
    lowered = path.lower()
    for suffix, fmt in FORMAT_SUFFIXES:
        if lowered.endswith(suffix):
            return fmt
    return None


def find_table_files(input_dir: str, table: str) -> Optional[TableFiles]:
    """The files of ``table`` in ``input_dir`` (``<table>.<ext>`` or ``<table>-*.<ext>``); None if absent.

    Raises ValueError when one table comes in more than one format.
    """
    patterns = [FileSystems.join(input_dir, f"{table}.*"), FileSystems.join(input_dir, f"{table}-*")]
    paths = sorted({m.path for result in FileSystems.match(patterns) for m in result.metadata_list})
    by_format: Dict[str, List[str]] = {}
    for path in paths:
        fmt = file_format(path)
        if fmt is None:
            logger.warning("ignoring %s: not one of %s", path, [s for s, _ in FORMAT_SUFFIXES])
            continue
        by_format.setdefault(fmt, []).append(path)
    if not by_format:
        return None
    if len(by_format) > 1:
        raise ValueError(f"table {table!r} in {input_dir} comes in several formats: {by_format}")
    ((fmt, fmt_paths),) = by_format.items()
    headers = tuple(tuple(read_csv_header(p)) for p in fmt_paths) if fmt == "csv" else ()
    return TableFiles(table, fmt, tuple(fmt_paths), headers)


def read_csv_header(path: str) -> List[str]:
    """Column names from the first line of a CSV file (compression inferred from the suffix)."""
    with FileSystems.open(path) as handle:
        first = handle.readline()
    text = first.decode("utf-8-sig").rstrip("\r\n")
    if not text.strip():
        raise ValueError(f"{path}: empty CSV header")
    return [name.strip() for name in next(csv.reader([text]))]


# ----------------------------------------------------------------------------------------------------------
# Raw values -> cleaned Python values
def clean_value(value):
    """None for missing values: None, NaN, and strings that are empty after stripping."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def clean_row(row: dict) -> dict:
    return {str(key).strip(): clean_value(value) for key, value in row.items()}


def json_default(value):
    """``json.dumps`` fallback for dead-letter rows read from Parquet (bytes, datetimes)."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return str(value)


def dead_letter(table: str, reason: str, row, detail: str) -> dict:
    """One dead letter: ``{"table", "reason", "row" (original row dict or raw line), "detail"}``."""
    return {"table": table, "reason": reason, "row": row, "detail": detail}


def dead_letter_json(letter: dict) -> str:
    return json.dumps(letter, sort_keys=True, default=json_default, ensure_ascii=False)


class ParseRawRecords(beam.DoFn):
    """Raw record -> cleaned row dict; unparseable records go to the ``dead_letter`` output.

    Input elements: a JSONL line (bytes), a ``(path, line)`` pair for CSV, or a row dict for Parquet.
    Blank lines are not rows and are skipped without a trace.
    """

    def __init__(self, table: str, fmt: str, csv_headers: Optional[Dict[str, Sequence[str]]] = None):
        self._table = table
        self._fmt = fmt
        self._csv_headers = dict(csv_headers or {})

    def process(self, record):
        if self._fmt == "parquet":
            yield clean_row(record)
            return
        path, raw = record if self._fmt == "csv" else (None, record)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield self._dead(raw.decode("utf-8", "replace"), f"not UTF-8: {err}")
            return
        if not text.strip():
            return
        if self._fmt == "jsonl":
            try:
                row = json.loads(text)
            except ValueError as err:
                yield self._dead(text, f"invalid JSON: {err}")
                return
            if not isinstance(row, dict):
                yield self._dead(text, f"JSON line is a {type(row).__name__}, not an object")
                return
            yield clean_row(row)
            return
        header = self._header(path)
        try:
            fields = next(csv.reader([text.rstrip("\r")]))
        except (csv.Error, StopIteration) as err:
            yield self._dead(text, f"invalid CSV line: {err}")
            return
        if len(fields) != len(header):
            yield self._dead(text, f"CSV line has {len(fields)} fields, the header has {len(header)}")
            return
        yield clean_row(dict(zip(header, fields)))

    def _header(self, path):
        if path in self._csv_headers:
            return self._csv_headers[path]
        distinct = set(map(tuple, self._csv_headers.values()))
        if len(distinct) == 1:  # a runner that spells the path differently; all shards agree anyway
            return next(iter(distinct))
        raise KeyError(f"no CSV header known for {path!r}")

    def _dead(self, raw_text, detail):
        return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead_letter(self._table, UNPARSEABLE_ROW, raw_text, detail))


class ReadRawTable(beam.PTransform):
    """TableFiles -> ``{"rows": cleaned row dicts, "dead_letters": unparseable rows}``.

    Uses ``ReadAllFromText`` (JSONL, CSV with the header line of every file skipped) or
    ``ReadAllFromParquet`` over the table's files, so any Beam filesystem works.
    """

    def __init__(self, files: TableFiles):
        super().__init__()
        self._files = files

    def expand(self, pbegin):
        files = self._files
        paths = pbegin | "Paths" >> beam.Create(list(files.paths))
        if files.fmt == "parquet":
            raw = paths | "ReadParquet" >> beam.io.ReadAllFromParquet()
        elif files.fmt == "csv":
            raw = paths | "ReadCsv" >> beam.io.ReadAllFromText(
                skip_header_lines=1, with_filename=True, coder=BytesCoder()
            )
        else:
            raw = paths | "ReadJsonl" >> beam.io.ReadAllFromText(coder=BytesCoder())
        headers = dict(zip(files.paths, files.csv_headers))
        parsed = raw | "Parse" >> beam.ParDo(ParseRawRecords(files.table, files.fmt, headers)).with_outputs(
            DEAD_LETTER_TAG, main="rows"
        )
        return {"rows": parsed.rows, "dead_letters": parsed[DEAD_LETTER_TAG]}


def write_text_file(path: str, text: str) -> None:
    """Writes one whole (small) text file through Beam's filesystems (local, gs://, ...)."""
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))


def read_text_file(path: str) -> str:
    with FileSystems.open(path) as handle:
        return io.TextIOWrapper(handle, encoding="utf-8").read()


def delete_matching(patterns: Sequence[str]) -> int:
    """Deletes every file matching ``patterns``; returns how many."""
    paths = [m.path for result in FileSystems.match(list(patterns)) for m in result.metadata_list]
    if paths:
        FileSystems.delete(paths)
    return len(paths)


__all__ = [
    "TableFiles",
    "find_table_files",
    "read_csv_header",
    "ReadRawTable",
    "ParseRawRecords",
    "clean_value",
    "clean_row",
    "dead_letter",
    "dead_letter_json",
    "write_text_file",
    "read_text_file",
    "delete_matching",
]
