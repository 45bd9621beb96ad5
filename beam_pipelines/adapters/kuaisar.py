"""KuaiSAR (Sun et al., CIKM 2023; the SEMINAR paper's search + recommendation dataset) -> raw format.

Input: the unzipped release (``KuaiSAR_v2.zip`` = KuaiSAR, ``KuaiSAR.zip`` = KuaiSAR-small; both have the same
files), each file optionally ``.gz``. Schemas as documented by the dataset authors
(github.com/Ethan00Si/KuaiSAR, ``pages/decriptions.md``); columns are found by header name, so their order
does not matter:

- ``rec_inter.csv``: user_id, item_id, playing_time (ms), duration_ms, time (Beijing time
  ``2023-05-22 15:53:20``), timestamp (Unix **milliseconds**, float such as ``1684742000123.0``), click,
  forward, like, follow, search, search_item_related.
- ``src_inter.csv``: user_id, search_session_id, search_session_time (Beijing time),
  search_session_timestamp (Unix ms), keyword (anonymized token ids, ``"[20, 34, 3]"``), search_source,
  item_id (an item shown in the session), click_cnt, item_type (VIDEO, IMAGE_ATLAS, USER, LIVE, ...).
- ``item_features.csv``: item_id, caption (anonymized token ids, ``"[1, 213, 24]"``), author_id (0 = padding),
  item_type, upload_time, upload_type, [music_id], first..fourth_level_category_id (0 = empty) and their
  Chinese / English names.
- ``user_features.csv``: user_id, search_active_level, rec_active_level (``reco_active_level`` in some
  copies), onehot_feat1, onehot_feat2 (every column other than user_id becomes a user attribute).
- ``social_network.csv`` is not used.

Mapping (docs/design.md §2):

- Every rec_inter row is an exposure: one ``impression`` event, query ``""``, ``label`` = the positive rule;
  a positive row is also a ``click`` event (a history behaviour). Positive rule ``click`` (default; the
  dataset authors recommend ``click`` to separate positives from negatives, ≈1:1) or ``long_view``
  (playing_time >= long_view_ratio * duration_ms).
- Every src_inter row is a search-result exposure: one ``impression`` event whose query is the session's
  keyword as text, ``label`` = click_cnt > 0; a clicked row is also a ``click`` event with that query. So a
  history pair is (query, item) for search clicks and ("", item) for recommendation clicks, as in the
  SEMINAR authors' preprocessing (which keeps click_cnt > 0 search rows and click > 0 rec rows).
- Token ids become text ``"w20 w34 w3"`` (prefix configurable): ``schema.tokenize`` keeps each one a token,
  and captions and keywords share the token vocabulary.
- Timestamps: the epoch-millisecond column, floored to int seconds; if it is empty or unparsable, the
  human-readable Beijing-time column (UTC+8). A non-positive time is ``bad_timestamp``.
- Items: title = caption text; attributes author_id, item_type, upload_type, music_id (if present) and the
  four category-id levels, as strings, padding ``0`` -> ``""``. Category names duplicate the ids and are
  dropped; upload_time is not an attribute.
- Users: user_id + every other column as a string attribute.
- An event item absent from item_features (search results such as USER or LIVE entries) gets an item row
  with empty title and attributes (``placeholder_items``, default on), because the pipeline's item
  vocabulary comes from the items table; with it off, such events are the pipeline's ``unknown_item``
  dead letters. ``search_item_types`` drops them at the source instead.

Skip reasons: ``malformed_row`` (field count differs from the header), ``missing_id``, ``duplicate_id``,
``bad_timestamp``, ``bad_label``, ``bad_keyword``, ``item_type_filtered``. A bad caption keeps the item with
an empty title and is counted under ``warnings``.

Usage: ``python -m beam_pipelines.adapters.kuaisar --input KuaiSAR_v2/ --output raw/``
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import datetime as _dt
import json
import math
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from beam_pipelines.adapters import (
    CLICK_EVENT,
    IMPRESSION_EVENT,
    InputCounts,
    OutputTables,
    epoch_seconds,
    find_input,
    iter_csv_rows,
    split_list_flag,
    write_stats,
)
from seminar_tf import schema

REC_FILE = "rec_inter.csv"
SRC_FILE = "src_inter.csv"
ITEM_FILE = "item_features.csv"
USER_FILE = "user_features.csv"

ITEM_ATTRIBUTE_COLUMNS = (
    "author_id",
    "item_type",
    "upload_type",
    "music_id",
    "first_level_category_id",
    "second_level_category_id",
    "third_level_category_id",
    "fourth_level_category_id",
)
ZERO_IS_PADDING = frozenset(
    ("author_id", "music_id", "first_level_category_id", "second_level_category_id",
     "third_level_category_id", "fourth_level_category_id")
)
REC_LABELS = ("click", "long_view")
_PANDAS_INDEX_COLUMNS = frozenset(("", "Unnamed: 0", "index"))
_FLOAT_INT_RE = re.compile(r"^-?\d+\.0+$")


@dataclasses.dataclass(frozen=True)
class KuaiSAROptions:
    """How KuaiSAR rows become events (defaults follow the dataset authors' advice)."""

    rec_label: str = "click"  # positive rule for recommendation rows: "click" or "long_view"
    long_view_ratio: float = 1.0  # long_view: playing_time >= ratio * duration_ms
    token_prefix: str = "w"  # anonymized token id 20 -> text "w20"
    search_item_types: Tuple[str, ...] = ()  # keep only these src_inter item_type values; () keeps all
    source_utc_offset_hours: float = 8.0  # the human-readable time columns are Beijing time
    placeholder_items: bool = True  # write an empty item row for event items absent from item_features

    def __post_init__(self) -> None:
        if self.rec_label not in REC_LABELS:
            raise ValueError(f"rec_label must be one of {REC_LABELS}, got {self.rec_label!r}")
        if self.long_view_ratio <= 0:
            raise ValueError(f"long_view_ratio must be > 0, got {self.long_view_ratio}")


def clean_id(value: Optional[str]) -> str:
    """An id as a string: stripped, and ``"123.0"`` (a pandas float column) -> ``"123"``."""
    text = (value or "").strip()
    if _FLOAT_INT_RE.match(text):
        text = text.split(".", 1)[0]
    return text


def parse_token_ids(value: Optional[str]) -> List[str]:
    """``"[20, 34, 3]"`` -> ``["20", "34", "3"]``; empty text -> ``[]``; anything else raises ValueError."""
    text = (value or "").strip()
    if not text:
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"not a token id list: {text[:40]!r}") from err
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)):
        raise ValueError(f"not a token id list: {text[:40]!r}")
    tokens = []
    for token in parsed:
        if isinstance(token, bool):
            raise ValueError(f"not a token id: {token!r}")
        number = float(token)
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"not an integer token id: {token!r}")
        tokens.append(str(int(number)))
    return tokens


def tokens_to_text(tokens: Sequence[str], prefix: str) -> str:
    return " ".join(prefix + token for token in tokens)


def event_seconds(epoch_text: Optional[str], local_time_text: Optional[str], utc_offset_hours: float) -> int:
    """Int seconds from the epoch-ms column, else from the local-time column; ValueError if neither works."""
    seconds = None
    if epoch_text and epoch_text.strip():
        try:
            seconds = epoch_seconds(epoch_text.strip())
        except ValueError:
            seconds = None
    if seconds is None and local_time_text and local_time_text.strip():
        parsed = _dt.datetime.fromisoformat(local_time_text.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_dt.timezone(_dt.timedelta(hours=utc_offset_hours)))
        seconds = int(parsed.timestamp())
    if seconds is None:
        raise ValueError("no usable timestamp")
    if seconds <= 0:
        raise ValueError(f"timestamp {seconds} is not after the epoch")
    return seconds


def _flag(value: Optional[str]) -> int:
    number = float((value or "").strip())
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise ValueError(f"not a count/flag: {value!r}")
    return int(number)


def _event(user_id: str, timestamp: int, item_id: str, query: str, label: Optional[int]) -> dict:
    row = {
        schema.USER_ID: user_id,
        schema.TIMESTAMP: timestamp,
        schema.ITEM_ID: item_id,
        schema.QUERY: query,
        schema.EVENT: IMPRESSION_EVENT if label is not None else CLICK_EVENT,
    }
    if label is not None:
        row[schema.LABEL] = label
    return row


class _Converter:
    def __init__(self, options: KuaiSAROptions, max_rows: Optional[int]) -> None:
        self.options = options
        self.max_rows = max_rows
        self.inputs: Dict[str, InputCounts] = {}
        self.events = collections.Counter()
        self.warnings = collections.Counter()
        self.item_ids = set()
        self.item_columns: List[str] = []  # attribute columns present in item_features
        self.items_without_features: Dict[str, None] = {}  # insertion-ordered set

    def _counts(self, name: str) -> InputCounts:
        return self.inputs.setdefault(name, InputCounts())

    def items(self, path: str, out) -> None:
        counts = self._counts(ITEM_FILE)
        for row, _ in iter_csv_rows(path, self.max_rows):
            counts.read += 1
            if row is None:
                counts.skip("malformed_row")
                continue
            if not self.item_columns:
                self.item_columns = [c for c in ITEM_ATTRIBUTE_COLUMNS if c in row]
            item_id = clean_id(row.get("item_id"))
            if not item_id:
                counts.skip("missing_id")
                continue
            if item_id in self.item_ids:
                counts.skip("duplicate_id")
                continue
            try:
                title = tokens_to_text(parse_token_ids(row.get("caption")), self.options.token_prefix)
            except ValueError:
                title = ""
                self.warnings["bad_caption"] += 1
            item = {schema.ITEM_ID: item_id, schema.TITLE: title}
            for column in self.item_columns:
                value = clean_id(row[column])
                if column in ZERO_IS_PADDING and value == "0":
                    value = ""
                item[column] = value
            self.item_ids.add(item_id)
            out.write(item)
            counts.converted += 1

    def users(self, path: str, out) -> None:
        counts = self._counts(USER_FILE)
        seen = set()
        for row, _ in iter_csv_rows(path, self.max_rows):
            counts.read += 1
            if row is None:
                counts.skip("malformed_row")
                continue
            user_id = clean_id(row.get("user_id"))
            if not user_id:
                counts.skip("missing_id")
                continue
            if user_id in seen:
                counts.skip("duplicate_id")
                continue
            seen.add(user_id)
            user = {schema.USER_ID: user_id}
            for column, value in row.items():
                if column != "user_id" and column not in _PANDAS_INDEX_COLUMNS:
                    user[column] = clean_id(value)
            out.write(user)
            counts.converted += 1

    def _write_pair(self, out, user_id: str, timestamp: int, item_id: str, query: str, label: int) -> None:
        if label:
            out.write(_event(user_id, timestamp, item_id, query, None))
            self.events["click"] += 1
        out.write(_event(user_id, timestamp, item_id, query, label))
        self.events["impression"] += 1
        self.events["impression_positive"] += label
        self.events["search_rows" if query else "browse_rows"] += 1
        if item_id not in self.item_ids:
            self.warnings["event_item_without_features"] += 1
            self.items_without_features[item_id] = None

    def placeholder_items(self, out) -> None:
        for item_id in self.items_without_features:
            out.write({schema.ITEM_ID: item_id, schema.TITLE: "", **{c: "" for c in self.item_columns}})

    def rec(self, path: str, out) -> None:
        counts = self._counts(REC_FILE)
        opts = self.options
        for row, _ in iter_csv_rows(path, self.max_rows):
            counts.read += 1
            if row is None:
                counts.skip("malformed_row")
                continue
            user_id, item_id = clean_id(row.get("user_id")), clean_id(row.get("item_id"))
            if not user_id or not item_id:
                counts.skip("missing_id")
                continue
            try:
                timestamp = event_seconds(row.get("timestamp"), row.get("time"), opts.source_utc_offset_hours)
            except ValueError:
                counts.skip("bad_timestamp")
                continue
            try:
                if opts.rec_label == "click":
                    label = _flag(row.get("click"))
                    if label > 1:
                        raise ValueError("click must be 0/1")
                else:
                    playing, duration = float(row.get("playing_time") or ""), float(row.get("duration_ms") or "")
                    if not duration > 0 or not playing >= 0:
                        raise ValueError("need playing_time >= 0 and duration_ms > 0")
                    label = int(playing >= opts.long_view_ratio * duration)
            except ValueError:
                counts.skip("bad_label")
                continue
            self._write_pair(out, user_id, timestamp, item_id, "", label)
            counts.converted += 1

    def src(self, path: str, out) -> None:
        counts = self._counts(SRC_FILE)
        opts = self.options
        keep_types = frozenset(opts.search_item_types)
        for row, _ in iter_csv_rows(path, self.max_rows):
            counts.read += 1
            if row is None:
                counts.skip("malformed_row")
                continue
            user_id, item_id = clean_id(row.get("user_id")), clean_id(row.get("item_id"))
            if not user_id or not item_id:
                counts.skip("missing_id")
                continue
            if keep_types and (row.get("item_type") or "").strip() not in keep_types:
                counts.skip("item_type_filtered")
                continue
            try:
                timestamp = event_seconds(
                    row.get("search_session_timestamp"), row.get("search_session_time"),
                    opts.source_utc_offset_hours,
                )
            except ValueError:
                counts.skip("bad_timestamp")
                continue
            try:
                tokens = parse_token_ids(row.get("keyword"))
            except ValueError:
                tokens = []
            if not tokens:
                counts.skip("bad_keyword")
                continue
            try:
                label = int(_flag(row.get("click_cnt")) > 0)
            except ValueError:
                counts.skip("bad_label")
                continue
            self._write_pair(out, user_id, timestamp, item_id, tokens_to_text(tokens, opts.token_prefix), label)
            counts.converted += 1


def convert(
    input_dir: str,
    output_dir: str,
    *,
    max_rows: Optional[int] = None,
    options: Optional[KuaiSAROptions] = None,
) -> dict:
    """Converts a KuaiSAR directory into ``items.jsonl``, ``events.jsonl`` (+ ``users.jsonl``) in ``output_dir``.

    max_rows: read at most this many data rows from each input file (a quick look at a large release).
    Returns the counts (also written to ``adapter_stats.json``): per input file read / converted / skipped by
    reason, rows per output table, events by kind, warnings.
    """
    options = options or KuaiSAROptions()
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    item_path = find_input(input_dir, (ITEM_FILE,))
    rec_path = find_input(input_dir, (REC_FILE,))
    src_path = find_input(input_dir, (SRC_FILE,))
    user_path = find_input(input_dir, (USER_FILE,), required=False)
    tables = ["items", "events"] + (["users"] if user_path else [])
    converter = _Converter(options, max_rows)
    with OutputTables(output_dir, tables) as out:
        converter.items(item_path, out["items"])
        if user_path:
            converter.users(user_path, out["users"])
        converter.rec(rec_path, out["events"])
        converter.src(src_path, out["events"])
        if options.placeholder_items:
            converter.placeholder_items(out["items"])
        outputs = out.counts()
    stats = {
        "dataset": "kuaisar",
        "input_dir": input_dir,
        "output_dir": output_dir,
        "max_rows": max_rows,
        "options": dataclasses.asdict(options),
        "inputs": {name: counts.as_dict() for name, counts in converter.inputs.items()},
        "outputs": outputs,
        "events": dict(converter.events),
        "warnings": dict(converter.warnings),
        "items_without_features": len(converter.items_without_features),
    }
    write_stats(output_dir, stats)
    return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipelines.adapters.kuaisar",
        description="Convert the KuaiSAR search + recommendation dataset (rec_inter.csv, src_inter.csv, "
        "item_features.csv, optional user_features.csv; .gz accepted) into seminar-tf's raw format "
        "(items.jsonl, events.jsonl, users.jsonl, adapter_stats.json).",
    )
    parser.add_argument("--input", required=True, help="Directory holding the unzipped KuaiSAR csv files.")
    parser.add_argument("--output", required=True, help="Directory to write the raw-format tables into.")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="Read at most this many data rows from each input file (default: all).")
    parser.add_argument("--rec-label", choices=REC_LABELS, default="click",
                        help="Positive rule for recommendation rows: 'click' (the dataset's click flag, "
                        "default) or 'long_view' (playing_time >= ratio * duration_ms).")
    parser.add_argument("--long-view-ratio", type=float, default=1.0,
                        help="Watched share of the video that counts as a long view (default 1.0).")
    parser.add_argument("--token-prefix", default="w",
                        help="Prefix turning anonymized token ids into words, e.g. 20 -> 'w20' (default 'w').")
    parser.add_argument("--search-item-types", default="",
                        help="Comma-separated src_inter item_type values to keep, e.g. 'VIDEO,IMAGE_ATLAS' "
                        "(default: keep all).")
    parser.add_argument("--no-placeholder-items", action="store_true",
                        help="Do not write empty item rows for event items missing from item_features "
                        "(their events then become the pipeline's unknown_item dead letters).")
    parser.add_argument("--utc-offset-hours", type=float, default=8.0,
                        help="UTC offset of the human-readable time columns, used only when the epoch "
                        "column is empty (default 8, Beijing time).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options = KuaiSAROptions(
        rec_label=args.rec_label,
        long_view_ratio=args.long_view_ratio,
        token_prefix=args.token_prefix,
        search_item_types=tuple(split_list_flag(args.search_item_types)),
        source_utc_offset_hours=args.utc_offset_hours,
        placeholder_items=not args.no_placeholder_items,
    )
    stats = convert(args.input, args.output, max_rows=args.max_rows, options=options)
    json.dump(stats, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
