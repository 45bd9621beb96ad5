"""Adapters: a public dataset's own files -> the project's raw format directory (docs/design.md §2).

Each adapter module (``kuaisar``, ``amazon``) has ``convert(input_dir, output_dir, *, max_rows=None, ...)``
returning counts, and ``main(argv=None)`` for ``python -m beam_pipelines.adapters.<name>``. They are plain
Python and stream their inputs line by line (``.gz`` too), so they run on a laptop or a single VM before the
Beam pipeline takes over.

Output: ``items.jsonl``, ``events.jsonl`` and (when the dataset has profiles) ``users.jsonl`` with the column
names of ``seminar_tf.schema``, plus ``adapter_stats.json`` (the counts ``convert`` returns). Attribute values
are strings; a missing attribute is the empty string.

Accounting: for every input file ``read == converted + sum(skipped.values())``, where ``converted`` counts
input rows that produced output (one input row may produce several output rows, e.g. a click and an
impression) and ``skipped`` maps a reason to a count. Helpers shared by the adapters live here.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence

from seminar_tf import schema

STATS_FILE = "adapter_stats.json"
CLICK_EVENT = schema.DEFAULT_HISTORY_EVENTS[0]  # "click": a history behaviour
IMPRESSION_EVENT = schema.DEFAULT_SAMPLE_EVENTS[0]  # "impression": a labelled sample
TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT = schema.SPLITS
JSONL = "jsonl"
_MS_THRESHOLD = 1e11  # an epoch value this large is milliseconds (1e11 s is the year 5138)


def open_text(path: str) -> io.TextIOBase:
    """Opens a UTF-8 text file for reading, gunzipping ``*.gz``; ``newline=""`` as the ``csv`` module wants
    (line endings are kept, so callers strip them)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "rt", encoding="utf-8", newline="")


def find_input(input_dir: str, names: Sequence[str], required: bool = True) -> Optional[str]:
    """The first of ``names`` (each also tried with ``.gz``) present in ``input_dir``."""
    for name in names:
        for candidate in (name, name + ".gz"):
            path = os.path.join(input_dir, candidate)
            if os.path.isfile(path):
                return path
    if required:
        raise FileNotFoundError(f"none of {list(names)} (or .gz) found in {input_dir}")
    return None


def epoch_seconds(value) -> int:
    """Integer seconds from an epoch number in seconds or milliseconds (a float string such as
    ``"1684742000123.0"`` included). Raises ValueError on anything else."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not an epoch time: {value!r}")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"not an epoch time: {value!r}")
    if abs(number) >= _MS_THRESHOLD:
        return int(number // 1000)
    return int(number)


def raise_csv_field_limit() -> None:
    """KuaiSAR's full release has a few very long quoted fields; the csv default (128 KiB) rejects them."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def iter_csv_rows(path: str, max_rows: Optional[int]) -> Iterator[tuple]:
    """Yields ``(row_dict_or_None, raw)`` per data row; ``None`` when the row's field count differs from the
    header's (a malformed row). Stops after ``max_rows`` rows."""
    raise_csv_field_limit()
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        for count, fields in enumerate(reader):
            if max_rows is not None and count >= max_rows:
                return
            if len(fields) != len(header):
                yield None, fields
            else:
                yield dict(zip(header, fields)), fields


class InputCounts:
    """Per-input-file accounting: ``read == converted + sum(skipped.values())``."""

    def __init__(self) -> None:
        self.read = 0
        self.converted = 0
        self.skipped: Dict[str, int] = collections.Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict:
        return {"read": self.read, "converted": self.converted, "skipped": dict(sorted(self.skipped.items()))}


class JsonlWriter:
    """Writes one raw-format table as JSON lines, to ``<table>.jsonl.tmp`` renamed into place on close."""

    def __init__(self, output_dir: str, table: str) -> None:
        self.path = os.path.join(output_dir, f"{table}.{JSONL}")
        self._tmp = self.path + ".tmp"
        self._handle = open(self._tmp, "w", encoding="utf-8")
        self.rows = 0

    def write(self, row: dict) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.rows += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class OutputTables:
    """The output tables of one conversion; closes (renames into place) all of them or none."""

    def __init__(self, output_dir: str, tables: Sequence[str]) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.writers = {table: JsonlWriter(output_dir, table) for table in tables}

    def __getitem__(self, table: str) -> JsonlWriter:
        return self.writers[table]

    def __enter__(self) -> "OutputTables":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for writer in self.writers.values():
            if exc_type is None:
                writer.close()
            else:
                writer.abort()

    def counts(self) -> Dict[str, int]:
        return {table: writer.rows for table, writer in self.writers.items()}


def write_stats(output_dir: str, stats: dict) -> None:
    with open(os.path.join(output_dir, STATS_FILE), "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def split_list_flag(text: str) -> List[str]:
    """``"A,B"`` -> ``["A", "B"]``; empty text -> ``[]``."""
    return [part.strip() for part in text.split(",") if part.strip()]
