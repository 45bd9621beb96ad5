"""MovieLens (GroupLens; ml-100k, ml-1m, ml-10m, ml-latest, and RecBole's atomic copies) -> raw format.

Input: one directory holding one release, each file optionally ``.gz``. The layout is detected from the files
present (two layouts in one directory is an error):

- ``ml-100k`` (``u.data``): ``u.data`` tab-separated ``user id, item id, rating, timestamp``, no header;
  ``u.item`` ``|``-separated, latin-1: ``movie id|title|release date (01-Jan-1995)|video release date|IMDb
  URL|`` + 19 genre flags 0/1 in the order unknown, Action, Adventure, Animation, Children's, Comedy, Crime,
  Documentary, Drama, Fantasy, Film-Noir, Horror, Musical, Mystery, Romance, Sci-Fi, Thriller, War, Western
  (``u.genre``, lines ``name|index``, overrides the names when present); ``u.user`` ``user id|age|gender|
  occupation|zip code``. The other files of the release (``u1.base``, ``u.info``, ...) are not read.
- ``ml-1m`` / ``ml-10m`` (``ratings.dat``): ``UserID::MovieID::Rating::Timestamp``; ``movies.dat``
  ``MovieID::Title (Year)::Genre1|Genre2``; ``users.dat`` (ml-1m only, so its presence names the layout)
  ``UserID::Gender::Age::Occupation::Zip-code``, age and occupation are the release's codes (``18``,
  ``12``), kept as they are; ``tags.dat`` (ml-10m) ``UserID::MovieID::Tag::Timestamp``.
- ``ml-latest`` / ``ml-latest-small`` / ml-20m / ml-25m (``ratings.csv``): csv with headers ``userId,movieId,
  rating,timestamp`` (half-star ratings), ``movies.csv`` ``movieId,title,genres`` (titles with commas are
  quoted), ``tags.csv`` ``userId,movieId,tag,timestamp``. No users table.
- ``recbole`` (``<name>.inter``): RecBole atomic files, tab-separated, typed headers (``user_id:token
  item_id:token rating:float timestamp:float``); ``<name>.item`` (``item_id, movie_title, release_year,
  class`` or ``genre``: space-separated genres), ``<name>.user`` (``user_id, age, gender, occupation,
  zip_code``). Columns are found by the name before the colon; any other item / user column becomes a string
  attribute under its name. Other atomic files (``.kg``, ``.link``) are not read.

Text: every file is read as bytes and decoded per line, UTF-8 first and latin-1 when that fails (ml-100k and
ml-1m are latin-1, ml-10m and later UTF-8, a few ml-10m lines are not), so ``open_text`` (strict UTF-8) is
not used.

Mapping (docs/design.md §2):

- Items (``items.jsonl``): one row per movie of the movies file, ``{item_id, title, genres, genre, year}``:
  the title without its trailing year (``"Toy Story (1995)"`` -> ``"Toy Story"``), ``genres`` every genre
  joined with ``|`` in file order, ``genre`` the first one, ``year`` the 4-digit release year (ml-100k: of
  the release date, else of the title; RecBole: of ``release_year``, else of the title; otherwise of the
  title) or ``""``. The placeholders ``unknown`` (ml-100k) and ``(no genres listed)`` (ml-latest) are no
  genre. Values are strings, a missing one ``""``. A rated movie absent from the movies file gets a row with
  empty attributes (``items_without_metadata``; the pipeline's item vocabulary comes from the items table, so
  this keeps its ratings) instead of being skipped.
- Users (``users.jsonl``, layouts with profiles): ``{user_id, age, gender, occupation}`` (+ RecBole's extra
  columns); the zip code is dropped. A rating user without a profile gets OOV user attributes downstream.
- Events (``events.jsonl``): every rating is one labelled sample ``{user_id, timestamp (int seconds),
  item_id, query, event: "impression", label, rating, split}``: ``label`` is 1 when ``rating >=
  label_threshold`` (default 4.0), ``rating`` the float rating. Build the dataset with ``--history-events
  impression,click`` so that each rating also enters the user's later histories (point in time: only
  strictly earlier ones), its rating being the step's feedback token. ``query`` is ``""`` except in layouts
  with tags: a rating whose (user, movie) was tagged by that user gets all those tags, in time order (ties
  in file order), joined with ``" "``. A tag whose (user, movie) has no rating is skipped
  (``tag_without_rating``).
- Splits, written on every event:
  ``user_fraction`` (default): each user's ratings sorted by time, ties in file order; the last
  ``round(test_fraction * n)`` are ``test``, the ``round(valid_fraction * n)`` before them ``valid``, the
  rest ``train``; a user with n >= 3 ratings gets at least 1 of each nonzero fraction, one with n < 3 only
  ``train``. ``round`` is Python's: half to even, of the exact decimal product (``Fraction``), so 2.5 -> 2
  and 3.5 -> 4. With 0.1 / 0.1 this gives 9,988 test (and 9,988 valid) ratings on ml-100k, matching the
  reference count; rounding halves up (``int(x + 0.5)``) would give 10,037.
  ``time``: global cut-offs over all ratings: with N ratings sorted by time, the timestamp at position
  ``N - round(test_fraction * N)`` starts ``test`` and the one ``round(valid_fraction * N)`` before starts
  ``valid``; a rating at or after a cut-off is in that split (so ties at a cut-off all go to the later
  split). The cut-offs are in the stats (``time_cutoffs``).

Skip reasons: ``blank_line``, ``malformed_line`` (wrong field count), ``missing_id``, ``bad_rating`` (not a
finite number >= 0), ``bad_timestamp`` (not a positive epoch time), ``duplicate_id`` (items, users),
``empty_tag``, ``tag_without_rating``. For each input file ``read == converted + sum(skipped)``; a header
line is not counted, and ``max_rows`` limits the data rows read from each file (but ``u.genre``).

Memory: files are streamed; the ratings file is read twice (first pass: each user's timestamps, 8 bytes a
rating, to place the split boundaries; second pass: write the events in file order). Item ids, user ids,
profiles and tag queries are held in memory.

Usage: ``python -m beam_pipelines.adapters.movielens --input ml-1m/ --output raw/ [--label-threshold 4]
[--split user_fraction|time] [--valid-fraction 0.1 --test-fraction 0.1] [--max-rows N]``
"""

from __future__ import annotations

import argparse
import array
import collections
import csv
import fractions
import gzip
import json
import math
import os
import re
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from beam_pipelines.adapters import (
    IMPRESSION_EVENT,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALID_SPLIT,
    InputCounts,
    OutputTables,
    epoch_seconds,
    find_input,
    raise_csv_field_limit,
    write_stats,
)
from seminar_tf import schema

LAYOUTS = ("ml-100k", "ml-1m", "ml-10m", "ml-latest", "recbole")
SPLIT_MODES = ("user_fraction", "time")
ITEM_ATTRIBUTES = ("genres", "genre", "year")
USER_ATTRIBUTES = ("age", "gender", "occupation")
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRE = frozenset(("unknown", "(no genres listed)"))

_RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_TAG_COLUMNS = ("user_id", "item_id", "tag", "timestamp")
_CSV_ALIASES = {"userId": "user_id", "movieId": "item_id"}
# RecBole column names -> our item fields; every other item column is an extra attribute.
_ATOMIC_ITEM_FIELDS = {"item_id": "item_id", "movie_title": "title", "title": "title", "release_year": "year",
                       "year": "year", "class": "genres", "genre": "genres", "genres": "genres"}
_ATOMIC_USER_DROPPED = frozenset(("user_id", "zip_code"))
_TITLE_YEAR_RE = re.compile(r"\s*\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$")
_YEAR_RE = re.compile(r"(?<!\d)(\d{4})\s*$")
_SPACE_RE = re.compile(r"\s+")


# ------------------------------------------------------------------------------------------------ reading
def iter_lines(path: str) -> Iterator[str]:
    """Decoded lines of a (``.gz``) file, line endings kept: UTF-8, else latin-1, decided per line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            if number == 0 and text.startswith("\ufeff"):
                text = text[1:]
            yield text


class _Format:
    """How one file's lines become fields: ``sep`` (a delimiter, None = csv) and whether it has a header."""

    def __init__(self, sep: Optional[str], header: bool, typed_header: bool = False,
                 aliases: Optional[Dict[str, str]] = None) -> None:
        self.sep, self.header, self.typed_header, self.aliases = sep, header, typed_header, aliases or {}

    def records(self, path: str) -> Iterator[list]:
        """Field lists, one per line (csv: per record); ``[]`` for a blank line."""
        lines = iter_lines(path)
        if self.sep is None:
            raise_csv_field_limit()
            for fields in csv.reader(lines):
                yield fields if any(f.strip() for f in fields) else []
            return
        for line in lines:
            text = line.rstrip("\r\n")
            yield text.split(self.sep) if text.strip() else []

    def column_name(self, header_field: str) -> str:
        name = header_field.strip()
        if self.typed_header:  # RecBole atomic header "user_id:token"
            name = name.split(":", 1)[0]
        return self.aliases.get(name, name)


TAB = _Format("\t", header=False)
PIPE = _Format("|", header=False)
DAT = _Format("::", header=False)
CSV = _Format(None, header=True, aliases=_CSV_ALIASES)
ATOMIC = _Format("\t", header=True, typed_header=True)


class _Table:
    """One input file of a layout: where it is, how it is split, its column names (from the header when the
    format has one)."""

    def __init__(self, path: str, fmt: _Format, columns: Sequence[str] = ()) -> None:
        self.path, self.fmt, self.columns = path, fmt, tuple(columns)
        if fmt.header:
            records = fmt.records(path)
            first = next(records, None)
            records.close()
            if not first:
                raise ValueError(f"{path}: no header line")
            self.columns = tuple(fmt.column_name(field) for field in first)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def require(self, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise ValueError(f"{self.path}: missing columns {missing} (has {list(self.columns)})")

    def rows(self, counts: InputCounts, max_rows: Optional[int]) -> Iterator[Dict[str, str]]:
        """Well-formed data rows as ``{column: stripped value}``; counts each row read and skips blank and
        malformed ones (field count differs from the columns')."""
        records = self.fmt.records(self.path)
        if self.fmt.header:
            next(records, None)
        for number, fields in enumerate(records):
            if max_rows is not None and number >= max_rows:
                return
            counts.read += 1
            if not fields:
                counts.skip("blank_line")
            elif len(fields) != len(self.columns):
                counts.skip("malformed_line")
            else:
                yield {column: value.strip() for column, value in zip(self.columns, fields)}


# ------------------------------------------------------------------------------------------------ layouts
class Layout:
    """The files of one release: ``ratings`` (required), ``items`` (required), ``users``, ``tags``,
    ``genres`` (ml-100k ``u.genre``), as ``_Table`` or None."""

    def __init__(self, name: str, ratings: _Table, items: _Table, users: Optional[_Table] = None,
                 tags: Optional[_Table] = None, genres: Optional[_Table] = None) -> None:
        self.name, self.ratings, self.items, self.users, self.tags, self.genres = (
            name, ratings, items, users, tags, genres)


def _atomic_name(input_dir: str) -> Optional[str]:
    names = sorted({entry[: -len(suffix)] for entry in os.listdir(input_dir)
                    for suffix in (".inter", ".inter.gz") if entry.endswith(suffix)
                    and os.path.isfile(os.path.join(input_dir, entry))})
    if len(names) > 1:
        raise ValueError(f"several RecBole .inter files in {input_dir}: {names}")
    return names[0] if names else None


def detect_layout(input_dir: str) -> Layout:
    """The layout of the release in ``input_dir`` (module docstring), from the files present."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"not a directory: {input_dir}")
    atomic = _atomic_name(input_dir)
    found = {
        "ml-100k": find_input(input_dir, ("u.data",), required=False),
        "dat": find_input(input_dir, ("ratings.dat",), required=False),
        "ml-latest": find_input(input_dir, ("ratings.csv",), required=False),
        "recbole": atomic,
    }
    present = [name for name, path in found.items() if path]
    if not present:
        raise FileNotFoundError(
            f"no MovieLens ratings file (u.data, ratings.dat, ratings.csv, <name>.inter; or .gz) in {input_dir}")
    if len(present) > 1:
        raise ValueError(f"several MovieLens layouts in {input_dir}: {present}")

    def optional(name: str) -> Optional[str]:
        return find_input(input_dir, (name,), required=False)

    kind = present[0]
    if kind == "ml-100k":
        genres = optional("u.genre")
        users = optional("u.user")
        return Layout(
            "ml-100k",
            _Table(found[kind], TAB, _RATING_COLUMNS),
            _Table(find_input(input_dir, ("u.item",)), PIPE),  # columns set once u.genre is read
            users=_Table(users, PIPE, ("user_id", "age", "gender", "occupation", "zip_code")) if users else None,
            genres=_Table(genres, PIPE, ("name", "index")) if genres else None,
        )
    if kind == "dat":
        users, tags = optional("users.dat"), optional("tags.dat")
        return Layout(
            "ml-1m" if users else "ml-10m",
            _Table(found[kind], DAT, _RATING_COLUMNS),
            _Table(find_input(input_dir, ("movies.dat",)), DAT, ("item_id", "title", "genres")),
            users=_Table(users, DAT, ("user_id", "gender", "age", "occupation", "zip_code")) if users else None,
            tags=_Table(tags, DAT, _TAG_COLUMNS) if tags else None,
        )
    if kind == "ml-latest":
        tags = optional("tags.csv")
        layout = Layout("ml-latest", _Table(found[kind], CSV), _Table(find_input(input_dir, ("movies.csv",)), CSV),
                        tags=_Table(tags, CSV) if tags else None)
        layout.items.require(("item_id", "title", "genres"))
        if layout.tags:
            layout.tags.require(_TAG_COLUMNS)
    else:
        users = optional(atomic + ".user")
        layout = Layout("recbole", _Table(find_input(input_dir, (atomic + ".inter",)), ATOMIC),
                        _Table(find_input(input_dir, (atomic + ".item",)), ATOMIC),
                        users=_Table(users, ATOMIC) if users else None)
        layout.items.require(("item_id",))
        if layout.users:
            layout.users.require(("user_id",))
    layout.ratings.require(_RATING_COLUMNS)
    return layout


# ------------------------------------------------------------------------------------------------ values
def clean_text(value: Optional[str]) -> str:
    return _SPACE_RE.sub(" ", value or "").strip()


def split_title(title: str) -> Tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; no trailing year -> ``(title, "")``. A year range
    ``(2006-2007)`` gives its first year."""
    title = clean_text(title)
    match = _TITLE_YEAR_RE.search(title)
    if not match or match.start() == 0:
        return title, ""
    return title[: match.start()], match.group(1)


def year_of(text: str) -> str:
    """The 4-digit year ending ``text`` (``"01-Jan-1995"``, ``"1995"``), else ``""``."""
    match = _YEAR_RE.search(clean_text(text))
    return match.group(1) if match else ""


def parse_rating(value: str) -> float:
    rating = float(value)
    if not math.isfinite(rating) or rating < 0:
        raise ValueError(f"bad rating {value!r}")
    return rating


def round_half_even(fraction: float, n: int) -> int:
    """``round(fraction * n)`` with Python's half-to-even rule on the exact decimal product."""
    return int(round(fractions.Fraction(repr(float(fraction))) * n))


def user_split_sizes(n: int, valid_fraction: float, test_fraction: float) -> Tuple[int, int]:
    """(valid, test) counts of one user's ``n`` ratings under ``user_fraction`` (module docstring)."""
    if n < 3:
        return 0, 0
    test = max(round_half_even(test_fraction, n), 1 if test_fraction > 0 else 0)
    valid = max(round_half_even(valid_fraction, n), 1 if valid_fraction > 0 else 0)
    test = min(test, n)
    return min(valid, n - test), test


def _kth_smallest(values: "array.array", k: int) -> int:
    """The ``k``-th (0-based) smallest of ``values`` without sorting them all: histogram of 2**16-second
    buckets, then a sort of the one bucket holding position ``k``."""
    buckets = collections.Counter(value >> 16 for value in values)
    seen = 0
    for bucket in sorted(buckets):
        if seen + buckets[bucket] > k:
            return sorted(value for value in values if value >> 16 == bucket)[k - seen]
        seen += buckets[bucket]
    raise IndexError(k)


# ------------------------------------------------------------------------------------------------ convert
class _Converter:
    def __init__(self, layout: Layout, label_threshold: float, split: str, valid_fraction: float,
                 test_fraction: float, max_rows: Optional[int]) -> None:
        self.layout = layout
        self.label_threshold = label_threshold
        self.split = split
        self.valid_fraction, self.test_fraction = valid_fraction, test_fraction
        self.max_rows = max_rows
        self.inputs: Dict[str, InputCounts] = {}
        self.item_ids = set()
        self.item_extras: List[str] = []
        self.items_without_metadata: Dict[str, None] = {}  # insertion-ordered set
        self.rated_items = set()
        self.tag_counts: Dict[Tuple[str, str], int] = {}
        self.tag_queries: Dict[Tuple[str, str], str] = {}
        self.rated_tag_pairs = set()
        self.user_bounds: Dict[str, tuple] = {}
        self.time_cutoffs: Dict[str, Optional[int]] = {}
        self.users = 0
        self.splits = collections.Counter({TRAIN_SPLIT: 0, VALID_SPLIT: 0, TEST_SPLIT: 0})
        self.labels = collections.Counter({"positive": 0, "negative": 0})
        self.ratings_with_query = 0

    def counts(self, table: _Table) -> InputCounts:
        return self.inputs.setdefault(table.name, InputCounts())

    # -------------------------------------------------------------------------------------------- items
    def _genre_names(self) -> Tuple[str, ...]:
        table = self.layout.genres
        if table is None:
            return ML100K_GENRES
        counts, names = self.counts(table), []
        for row in table.rows(counts, None):  # the genre names define u.item's columns: never cut short
            if not row["name"]:
                counts.skip("missing_id")
                continue
            names.append(row["name"])
            counts.converted += 1
        return tuple(names) or ML100K_GENRES

    def _item_row(self, row: Dict[str, str]) -> dict:
        name = self.layout.name
        extras = {}
        if name == "ml-100k":
            title, title_year = split_title(row["title"])
            genres = [g for g in self._genres if row["#" + g] == "1"]
            year = year_of(row["release_date"]) or title_year
        elif name == "recbole":
            fields: Dict[str, str] = {}
            for column, value in row.items():
                if column in _ATOMIC_ITEM_FIELDS:
                    fields.setdefault(_ATOMIC_ITEM_FIELDS[column], value)
                else:
                    extras[column] = value
            title, title_year = split_title(fields.get("title", ""))
            genres = fields.get("genres", "").split()
            year = fields.get("year", "")
            year = year if re.fullmatch(r"\d{4}", year) else title_year
        else:
            title, year = split_title(row["title"])
            genres = row["genres"].split("|")
        genres = [g for g in (clean_text(g) for g in genres) if g and g not in NO_GENRE]
        return {schema.ITEM_ID: row["item_id"], schema.TITLE: title, "genres": "|".join(genres),
                "genre": genres[0] if genres else "", "year": year, **extras}

    def items(self, out) -> None:
        table = self.layout.items
        if self.layout.name == "ml-100k":
            self._genres = self._genre_names()
            table.columns = ("item_id", "title", "release_date", "video_release_date", "imdb_url") + tuple(
                "#" + g for g in self._genres)
        elif self.layout.name == "recbole":
            self.item_extras = [c for c in table.columns if c not in _ATOMIC_ITEM_FIELDS]
        counts = self.counts(table)
        for row in table.rows(counts, self.max_rows):
            if not row["item_id"]:
                counts.skip("missing_id")
                continue
            if row["item_id"] in self.item_ids:
                counts.skip("duplicate_id")
                continue
            self.item_ids.add(row["item_id"])
            out.write(self._item_row(row))
            counts.converted += 1

    def placeholder_items(self, out) -> None:
        for item_id in self.items_without_metadata:
            out.write({schema.ITEM_ID: item_id, schema.TITLE: "", **{a: "" for a in ITEM_ATTRIBUTES},
                       **{c: "" for c in self.item_extras}})

    # -------------------------------------------------------------------------------------------- users
    def users_table(self, out) -> None:
        table = self.layout.users
        counts, seen = self.counts(table), set()
        for row in table.rows(counts, self.max_rows):
            user_id = row["user_id"]
            if not user_id:
                counts.skip("missing_id")
                continue
            if user_id in seen:
                counts.skip("duplicate_id")
                continue
            seen.add(user_id)
            user = {schema.USER_ID: user_id, **{a: row.get(a, "") for a in USER_ATTRIBUTES}}
            if self.layout.name == "recbole":
                user.update((c, v) for c, v in row.items() if c not in _ATOMIC_USER_DROPPED and c not in user)
            out.write(user)
            counts.converted += 1

    # -------------------------------------------------------------------------------------------- tags
    def tags(self) -> None:
        table = self.layout.tags
        counts = self.counts(table)
        tag_lists: Dict[Tuple[str, str], list] = {}
        for seq, row in enumerate(table.rows(counts, self.max_rows)):
            if not row["user_id"] or not row["item_id"]:
                counts.skip("missing_id")
                continue
            seconds = positive_seconds(row["timestamp"])
            if seconds is None:
                counts.skip("bad_timestamp")
                continue
            tag = clean_text(row["tag"])
            if not tag:
                counts.skip("empty_tag")
                continue
            tag_lists.setdefault((row["user_id"], row["item_id"]), []).append((seconds, seq, tag))
        for pair, tags in tag_lists.items():
            self.tag_queries[pair] = " ".join(tag for _, _, tag in sorted(tags))  # time, then file order
            self.tag_counts[pair] = len(tags)

    def finish_tags(self) -> None:
        """Tags whose (user, movie) was rated are converted (they are in its query), the others skipped."""
        counts = self.counts(self.layout.tags)
        for pair, number in self.tag_counts.items():
            if pair in self.rated_tag_pairs:
                counts.converted += number
            else:
                counts.skipped["tag_without_rating"] += number

    # -------------------------------------------------------------------------------------------- ratings
    def _ratings(self, counts: InputCounts) -> Iterator[Tuple[str, str, float, int]]:
        """(user, item, rating, seconds) of the valid rating rows, in file order; skips counted."""
        for row in self.layout.ratings.rows(counts, self.max_rows):
            user_id, item_id = row["user_id"], row["item_id"]
            if not user_id or not item_id:
                counts.skip("missing_id")
                continue
            try:
                rating = parse_rating(row["rating"])
            except ValueError:
                counts.skip("bad_rating")
                continue
            seconds = positive_seconds(row["timestamp"])
            if seconds is None:
                counts.skip("bad_timestamp")
                continue
            yield user_id, item_id, rating, seconds

    def plan_splits(self) -> None:
        """First pass over the ratings: where each split starts (per user, or global time cut-offs)."""
        per_user: Dict[str, array.array] = {}
        everything = array.array("q")
        for user_id, item_id, _, seconds in self._ratings(InputCounts()):
            if self.split == "time":
                everything.append(seconds)
            else:
                per_user.setdefault(user_id, array.array("q")).append(seconds)
            self.rated_items.add(item_id)
            if (user_id, item_id) in self.tag_queries:
                self.rated_tag_pairs.add((user_id, item_id))
        if self.split == "time":
            n = len(everything)
            valid, test = user_split_sizes(n, self.valid_fraction, self.test_fraction)
            self.time_cutoffs = {
                TEST_SPLIT: _kth_smallest(everything, n - test) if test else None,
                VALID_SPLIT: _kth_smallest(everything, n - test - valid) if valid else None,
            }
            return
        for user_id, times in per_user.items():
            n = len(times)
            valid, test = user_split_sizes(n, self.valid_fraction, self.test_fraction)
            if not valid and not test:
                continue
            order = sorted(range(n), key=times.__getitem__)  # stable: ties keep file order
            key = lambda position: (times[order[position]], order[position])  # noqa: E731
            self.user_bounds[user_id] = (key(n - test) if test else None,
                                         key(n - test - valid) if valid else None)

    def _split_of(self, user_id: str, seconds: int, seq: int) -> str:
        if self.split == "time":
            test_cut, valid_cut = self.time_cutoffs[TEST_SPLIT], self.time_cutoffs[VALID_SPLIT]
            if test_cut is not None and seconds >= test_cut:
                return TEST_SPLIT
            return VALID_SPLIT if valid_cut is not None and seconds >= valid_cut else TRAIN_SPLIT
        bounds = self.user_bounds.get(user_id)
        if bounds is None:
            return TRAIN_SPLIT
        test_key, valid_key = bounds
        if test_key is not None and (seconds, seq) >= test_key:
            return TEST_SPLIT
        return VALID_SPLIT if valid_key is not None and (seconds, seq) >= valid_key else TRAIN_SPLIT

    def events(self, out) -> None:
        """Second pass: one labelled impression per rating, in file order."""
        counts = self.counts(self.layout.ratings)
        seqs: Dict[str, int] = collections.Counter()
        for user_id, item_id, rating, seconds in self._ratings(counts):
            seq = seqs[user_id]
            seqs[user_id] += 1
            split = self._split_of(user_id, seconds, seq)
            label = int(rating >= self.label_threshold)
            query = self.tag_queries.get((user_id, item_id), "")
            out.write({
                schema.USER_ID: user_id,
                schema.TIMESTAMP: seconds,
                schema.ITEM_ID: item_id,
                schema.QUERY: query,
                schema.EVENT: IMPRESSION_EVENT,
                schema.LABEL: label,
                schema.RATING: rating,
                schema.SPLIT: split,
            })
            if item_id not in self.item_ids:
                self.items_without_metadata[item_id] = None
            self.splits[split] += 1
            self.labels["positive" if label else "negative"] += 1
            self.ratings_with_query += bool(query)
            counts.converted += 1
        self.users = len(seqs)


def convert(
    input_dir: str,
    output_dir: str,
    *,
    label_threshold: float = 4.0,
    split: str = "user_fraction",
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_rows: Optional[int] = None,
) -> dict:
    """Converts one MovieLens release in ``input_dir`` into ``items.jsonl``, ``events.jsonl`` (+ ``users.jsonl``)
    in ``output_dir`` (module docstring).

    label_threshold: a rating >= this is label 1. split: ``user_fraction`` or ``time``. max_rows: read at most
    this many data rows from each input file. Returns the counts (also written to ``adapter_stats.json``):
    ``layout``, per input file read / converted / skipped by reason, rows per output table, events per split
    and label.
    """
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction + test_fraction must be < 1, got {valid_fraction + test_fraction}")
    if not math.isfinite(label_threshold):
        raise ValueError(f"label_threshold must be finite, got {label_threshold}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    layout = detect_layout(input_dir)
    converter = _Converter(layout, label_threshold, split, valid_fraction, test_fraction, max_rows)
    tables = ["items", "events"] + (["users"] if layout.users else [])
    with OutputTables(output_dir, tables) as out:
        converter.items(out["items"])
        if layout.users:
            converter.users_table(out["users"])
        if layout.tags:
            converter.tags()
        converter.plan_splits()
        converter.events(out["events"])
        converter.placeholder_items(out["items"])
        if layout.tags:
            converter.finish_tags()
        outputs = out.counts()
    stats = {
        "dataset": "movielens",
        "layout": layout.name,
        "input_dir": input_dir,
        "output_dir": output_dir,
        "max_rows": max_rows,
        "options": {"label_threshold": label_threshold, "split": split, "valid_fraction": valid_fraction,
                    "test_fraction": test_fraction},
        "inputs": {name: counts.as_dict() for name, counts in converter.inputs.items()},
        "outputs": outputs,
        "splits": dict(converter.splits),
        "labels": dict(converter.labels),
        "users": converter.users,
        "rated_items": len(converter.rated_items),
        "items_without_metadata": len(converter.items_without_metadata),
        "items_without_ratings": len(converter.item_ids - converter.rated_items),
        "ratings_with_query": converter.ratings_with_query,
    }
    if split == "time":
        stats["time_cutoffs"] = converter.time_cutoffs
    write_stats(output_dir, stats)
    return stats


def positive_seconds(value) -> Optional[int]:
    """Epoch seconds (``epoch_seconds``) when they are a positive time, else None (a bad_timestamp skip)."""
    try:
        seconds = epoch_seconds(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipelines.adapters.movielens",
        description="Convert a MovieLens release (ml-100k u.*, ml-1m / ml-10m *.dat, ml-latest *.csv, or RecBole "
        "atomic <name>.inter/.item/.user; .gz accepted; the layout is detected) into seminar-tf's raw format "
        "(items.jsonl, events.jsonl, users.jsonl, adapter_stats.json). Every rating becomes one labelled "
        "impression; build the dataset with --history-events impression,click.",
    )
    parser.add_argument("--input", required=True, help="Directory holding one unzipped MovieLens release.")
    parser.add_argument("--output", required=True, help="Directory to write the raw-format tables into.")
    parser.add_argument("--label-threshold", type=float, default=4.0,
                        help="A rating >= this is a positive (label 1) sample (default 4).")
    parser.add_argument("--split", choices=SPLIT_MODES, default="user_fraction",
                        help="'user_fraction' (default): each user's last ratings in time are valid/test; "
                        "'time': global time cut-offs over all ratings.")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="Share of ratings (per user, or overall with --split time) in valid (default 0.1).")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="Share of ratings (per user, or overall with --split time) in test (default 0.1).")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="Read at most this many data rows from each input file (default: all).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    stats = convert(args.input, args.output, label_threshold=args.label_threshold, split=args.split,
                    valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, max_rows=args.max_rows)
    json.dump(stats, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
