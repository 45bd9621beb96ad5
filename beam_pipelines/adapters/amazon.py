"""Amazon reviews (McAuley lab; the SEMINAR paper's Movies & TV set) -> raw format.

Input: a directory with review files and metadata files, JSON lines, optionally ``.gz``; files named
``meta_*`` are metadata, every other ``*.json[l][.gz]`` holds reviews (or name them explicitly). Three
releases, recognised per line, so they can even be mixed:

- 2014 (jmcauley.ucsd.edu/data/amazon): ``reviews_Movies_and_TV_5.json.gz`` lines ``{"reviewerID",
  "asin", "reviewerName", "helpful", "reviewText", "overall", "summary", "unixReviewTime" (s),
  "reviewTime": "09 13, 2009"}``; ``meta_Movies_and_TV.json.gz`` lines are Python dict literals
  (``{'asin': ..., 'title', 'price', 'imUrl', 'related', 'salesRank', 'brand', 'categories': [[...]]}``),
  not JSON, so a line that is not JSON is read with ``ast.literal_eval``.
- 2018 (nijianmo.github.io/amazon): reviews add ``verified``, ``style``, ``vote``, ``image``; metadata is
  JSON with ``asin, title, brand, main_cat, category: [...], description, feature, rank, price, date,
  imageURL, imageURLHighRes, also_buy, also_view, details`` (``main_cat`` is sometimes an ``<img ... alt=X>``
  tag; X is used).
- 2023 (amazon-reviews-2023.github.io): reviews ``{rating, title, text, images, asin, parent_asin, user_id,
  timestamp (ms), helpful_vote, verified_purchase}``; metadata ``{main_category, title, average_rating,
  rating_number, features, description, price, images, videos, store, categories, details, parent_asin,
  bought_together}``. The item id is ``parent_asin`` (what the metadata is keyed by).

Mapping (docs/design.md §2):

- Splits follow the paper's leave-one-out protocol: each user's interactions sorted by time (ties in read
  order); the last is ``test``, the second last ``valid``, the others ``train``. Every event carries its
  split (the pipeline then uses the split column instead of time cut-offs; it asks for a split on every
  event once one has it).
- Every review is a ``click`` event (a history behaviour, and a pretraining target of its split): user,
  item, time in int seconds, query ``""`` (the dataset has no search). Duplicate (user, item, time) reviews
  are skipped.
- Labelled samples: each interaction but the first (which has no history) is also a positive
  ``impression`` of its split; ``train_samples=False`` keeps only the valid/test ones. The impression has
  the same timestamp as its click, so the point-in-time history (strictly earlier) never contains it.
- Negatives are explicit, so the raw data alone defines the CTR task: each positive impression gets
  ``negatives`` label-0 impressions at the same time and split, items drawn uniformly from the reviewed
  catalogue among items this user never reviewed, with ``random.Random(f"{seed}:{user_id}")`` (the same
  output for the same input, whatever the file order of other users).
- Items: one row per reviewed item: title (HTML entities unescaped) and attributes ``brand`` (2023:
  ``store``), ``main_category`` and ``category`` (the most specific category listed); a reviewed item
  without metadata gets a row with empty title and attributes (the pipeline's item vocabulary comes from
  the items table, so this keeps its events). Metadata of items nobody reviewed is
  skipped (``not_in_reviews``) unless ``all_metadata``. Image URLs are not kept (nothing is downloaded),
  so the dataset has no image channel. No users table (the release has no profiles).

Skip reasons: ``blank_line``, ``malformed_line`` (neither JSON nor a Python dict literal), ``unknown_schema``,
``missing_id``, ``bad_timestamp``, ``bad_rating`` / ``below_min_rating`` (only with ``min_rating``),
``duplicate_review``, ``duplicate_id``, ``not_in_reviews``.

Memory: input files are streamed, but the per-user interaction lists and the item catalogue are held in
memory (two ints per review) to find each user's last interactions and to sample negatives; the events are
written, user by user, after the last review file is read. Measured ≈170 bytes a review (63 MB peak for
300 k reviews), so ≈0.6 GB for the 3.4 M reviews of Movies & TV 2018 5-core.

Usage: ``python -m beam_pipelines.adapters.amazon --input amazon_movies_tv/ --output raw/``
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import datetime as _dt
import html
import json
import os
import random
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from beam_pipelines.adapters import (
    CLICK_EVENT,
    IMPRESSION_EVENT,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALID_SPLIT,
    InputCounts,
    OutputTables,
    epoch_seconds,
    open_text,
    split_list_flag,
    write_stats,
)
from seminar_tf import schema

ITEM_ATTRIBUTES = ("brand", "main_category", "category")
_JSON_NAME_RE = re.compile(r"\.jsonl?(\.gz)?$")
_IMG_ALT_RE = re.compile(r"""alt=["']([^"']*)["']""")
_SPACE_RE = re.compile(r"\s+")
_TIME_BITS = 33  # seconds < 2**33 (year 2242), packed with the item index into one int per review
_TIME_MASK = (1 << _TIME_BITS) - 1


@dataclasses.dataclass(frozen=True)
class AmazonOptions:
    """How reviews become labelled samples (see the module docstring for the protocol)."""

    negatives: int = 1  # label-0 impressions sampled per positive impression
    seed: int = 0
    min_rating: Optional[float] = None  # skip reviews rated lower; None keeps every review
    train_samples: bool = True  # False: only the valid/test (last two) samples per user
    all_metadata: bool = False  # True: also write items nobody reviewed
    reviews_files: Tuple[str, ...] = ()  # explicit review files (default: discovered in input_dir)
    meta_files: Tuple[str, ...] = ()  # explicit metadata files (default: discovered in input_dir)

    def __post_init__(self) -> None:
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")


def discover_files(input_dir: str) -> Tuple[List[str], List[str]]:
    """(review files, metadata files) among ``*.json``, ``*.jsonl`` (+ ``.gz``) in ``input_dir``, sorted."""
    reviews, meta = [], []
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        if not os.path.isfile(path) or not _JSON_NAME_RE.search(name):
            continue
        (meta if name.startswith("meta_") else reviews).append(path)
    return reviews, meta


def parse_record(line: str) -> dict:
    """One JSON line, or one Python dict literal (2014 metadata); ValueError if neither is a dict."""
    text = line.strip()
    record = None
    if not text.startswith("{'"):
        try:
            record = json.loads(text)
        except ValueError:
            record = None
    if record is None:
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            raise ValueError("neither JSON nor a Python literal") from err
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    return record


def _text(value) -> str:
    if not isinstance(value, str):
        return ""
    return _SPACE_RE.sub(" ", html.unescape(value)).strip()


def review_fields(record: dict) -> Tuple[str, str, str, object, object]:
    """(schema version, user id, item id, raw rating, time in int seconds); time raises ValueError."""
    if "reviewerID" in record:
        version = "2018" if ("verified" in record or "vote" in record or "style" in record) else "2014"
        user_id, item_id, rating = record.get("reviewerID"), record.get("asin"), record.get("overall")
        if record.get("unixReviewTime") not in (None, ""):
            seconds = epoch_seconds(record["unixReviewTime"])
        else:  # "09 13, 2009", a UTC day
            day = _dt.datetime.strptime(str(record.get("reviewTime", "")).strip(), "%m %d, %Y")
            seconds = int(day.replace(tzinfo=_dt.timezone.utc).timestamp())
    elif "user_id" in record:
        version = "2023"
        user_id, item_id = record.get("user_id"), record.get("parent_asin") or record.get("asin")
        rating = record.get("rating")
        seconds = epoch_seconds(record.get("timestamp"))
    else:
        raise KeyError("unknown_schema")
    return version, _id(user_id), _id(item_id), rating, seconds


def _id(value) -> str:
    return value.strip() if isinstance(value, str) else ("" if value is None else str(value))


def meta_fields(record: dict) -> Tuple[str, str, dict]:
    """(schema version, item id, item row without the id) from one metadata record."""
    if "parent_asin" in record:
        version, item_id = "2023", _id(record.get("parent_asin"))
        categories = record.get("categories") or []
        brand, main_category = record.get("store"), record.get("main_category")
    elif "main_cat" in record or "category" in record or "imageURLHighRes" in record:
        version, item_id = "2018", _id(record.get("asin"))
        categories = record.get("category") or []
        brand, main_category = record.get("brand"), record.get("main_cat")
        if isinstance(main_category, str) and main_category.lstrip().startswith("<"):
            alt = _IMG_ALT_RE.search(main_category)
            main_category = alt.group(1) if alt else ""
    else:
        version, item_id = "2014", _id(record.get("asin"))
        nested = record.get("categories") or []
        categories = nested[0] if nested and isinstance(nested[0], list) else nested
        brand, main_category = record.get("brand"), None
    categories = [_text(c) for c in categories if _text(c)] if isinstance(categories, list) else []
    main_category = _text(main_category) or (categories[0] if categories else "")
    row = {
        schema.TITLE: _text(record.get("title")),
        "brand": _text(brand),
        "main_category": main_category,
        "category": categories[-1] if categories else "",
    }
    return version, item_id, row


class _Catalog:
    """Interned item ids and each user's interactions, one int per review: ``item_index << 33 | seconds``."""

    def __init__(self) -> None:
        self.item_ids: List[str] = []
        self.item_index: Dict[str, int] = {}
        self.user_interactions: Dict[str, List[int]] = {}
        self._user_seen: Dict[str, set] = {}

    def add(self, user_id: str, item_id: str, seconds: int) -> bool:
        """Records one review; False if (user, item, time) was already recorded."""
        index = self.item_index.get(item_id)
        if index is None:
            index = self.item_index[item_id] = len(self.item_ids)
            self.item_ids.append(item_id)
        packed = (index << _TIME_BITS) | seconds
        seen = self._user_seen.setdefault(user_id, set())
        if packed in seen:
            return False
        seen.add(packed)
        self.user_interactions.setdefault(user_id, []).append(packed)
        return True

    @staticmethod
    def unpack(packed: int) -> Tuple[int, int]:
        """(seconds, item index)."""
        return packed & _TIME_MASK, packed >> _TIME_BITS


def _counts_for(inputs: Dict[str, InputCounts], path: str) -> InputCounts:
    name = os.path.basename(path)
    while name in inputs:
        name += "+"
    return inputs.setdefault(name, InputCounts())


def _read_reviews(path, catalog, options, max_rows, counts, versions) -> None:
    with open_text(path) as handle:
        for line_number, line in enumerate(handle):
            if max_rows is not None and line_number >= max_rows:
                break
            counts.read += 1
            if not line.strip():
                counts.skip("blank_line")
                continue
            try:
                record = parse_record(line)
            except ValueError:
                counts.skip("malformed_line")
                continue
            try:
                version, user_id, item_id, rating, seconds = review_fields(record)
            except KeyError:
                counts.skip("unknown_schema")
                continue
            except (ValueError, TypeError, OverflowError):
                counts.skip("bad_timestamp")
                continue
            if not user_id or not item_id:
                counts.skip("missing_id")
                continue
            if not 0 < seconds <= _TIME_MASK:
                counts.skip("bad_timestamp")
                continue
            if options.min_rating is not None:
                try:
                    if float(rating) < options.min_rating:
                        counts.skip("below_min_rating")
                        continue
                except (TypeError, ValueError):
                    counts.skip("bad_rating")
                    continue
            if not catalog.add(user_id, item_id, seconds):
                counts.skip("duplicate_review")
                continue
            versions[f"reviews_{version}"] += 1
            counts.converted += 1


def _read_meta(path, catalog, options, max_rows, counts, versions, items, written) -> None:
    with open_text(path) as handle:
        for line_number, line in enumerate(handle):
            if max_rows is not None and line_number >= max_rows:
                break
            counts.read += 1
            if not line.strip():
                counts.skip("blank_line")
                continue
            try:
                version, item_id, row = meta_fields(parse_record(line))
            except ValueError:
                counts.skip("malformed_line")
                continue
            if not item_id:
                counts.skip("missing_id")
                continue
            if item_id in written:
                counts.skip("duplicate_id")
                continue
            if item_id not in catalog.item_index and not options.all_metadata:
                counts.skip("not_in_reviews")
                continue
            written.add(item_id)
            versions[f"meta_{version}"] += 1
            items.write({schema.ITEM_ID: item_id, **row})
            counts.converted += 1


def _sample_negatives(rng: random.Random, catalog_size: int, touched: set, count: int) -> List[int]:
    """``count`` distinct item indices outside ``touched``, uniform over the catalogue (fewer if impossible)."""
    available = catalog_size - len(touched)
    count = min(count, max(available, 0))
    chosen: List[int] = []
    picked = set()
    tries = 0
    while len(chosen) < count and tries < 50 * count + 100:
        tries += 1
        index = rng.randrange(catalog_size)
        if index in touched or index in picked:
            continue
        picked.add(index)
        chosen.append(index)
    if len(chosen) < count:  # dense users: enumerate what is left
        rest = [i for i in range(catalog_size) if i not in touched and i not in picked]
        chosen.extend(rng.sample(rest, count - len(chosen)))
    return chosen


def _split_of(position: int, n: int) -> str:
    """Leave-one-out split of a user's ``position``-th of ``n`` interactions (time order)."""
    return TEST_SPLIT if position == n - 1 else (VALID_SPLIT if position == n - 2 else TRAIN_SPLIT)


def _write_events(catalog: _Catalog, options: AmazonOptions, events, stats: collections.Counter) -> None:
    """Per user, time order: every interaction as a click, then the labelled impressions (module docstring)."""
    catalog_size = len(catalog.item_ids)
    for user_id, interactions in catalog.user_interactions.items():
        ordered = sorted(map(_Catalog.unpack, interactions), key=lambda pair: pair[0])  # ties keep read order
        n = len(ordered)

        def write(position: int, item_index: int, label: Optional[int]) -> None:
            seconds = ordered[position][0]
            split = _split_of(position, n)
            row = {
                schema.USER_ID: user_id,
                schema.TIMESTAMP: seconds,
                schema.ITEM_ID: catalog.item_ids[item_index],
                schema.QUERY: "",
                schema.EVENT: CLICK_EVENT if label is None else IMPRESSION_EVENT,
            }
            if label is None:
                stats["click"] += 1
            else:
                row[schema.LABEL] = label
                stats["impression"] += 1
                stats["impression_positive"] += label
                stats[f"impression_{split}"] += 1
            row[schema.SPLIT] = split
            events.write(row)

        for position, (_, index) in enumerate(ordered):
            write(position, index, None)
        if n < 2:
            stats["users_without_samples"] += 1
            continue
        touched = {index for _, index in ordered}
        rng = random.Random(f"{options.seed}:{user_id}")
        first = 1 if options.train_samples else max(1, n - 2)
        for position in range(first, n):
            write(position, ordered[position][1], 1)
            negatives = _sample_negatives(rng, catalog_size, touched, options.negatives)
            stats["negatives_unavailable"] += options.negatives - len(negatives)
            for negative in negatives:
                write(position, negative, 0)


def convert(
    input_dir: str,
    output_dir: str,
    *,
    max_rows: Optional[int] = None,
    options: Optional[AmazonOptions] = None,
) -> dict:
    """Converts Amazon review + metadata files into ``items.jsonl`` and ``events.jsonl`` in ``output_dir``.

    max_rows: read at most this many lines from each input file. Returns the counts (also written to
    ``adapter_stats.json``): per input file read / converted / skipped by reason, rows per output table,
    events by kind and split, schema versions seen.
    """
    options = options or AmazonOptions()
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    found_reviews, found_meta = discover_files(input_dir)
    reviews_files = list(options.reviews_files) or found_reviews
    meta_files = list(options.meta_files) or found_meta
    if not reviews_files:
        raise FileNotFoundError(f"no review files (*.json, *.jsonl, .gz; not meta_*) in {input_dir}")

    catalog = _Catalog()
    inputs: Dict[str, InputCounts] = {}
    versions: collections.Counter = collections.Counter()
    events: collections.Counter = collections.Counter()
    with OutputTables(output_dir, ("items", "events")) as out:
        for path in reviews_files:
            _read_reviews(path, catalog, options, max_rows, _counts_for(inputs, path), versions)
        written = set()
        for path in meta_files:
            _read_meta(path, catalog, options, max_rows, _counts_for(inputs, path), versions, out["items"],
                       written)
        missing = [item_id for item_id in catalog.item_ids if item_id not in written]
        for item_id in missing:
            out["items"].write({schema.ITEM_ID: item_id, schema.TITLE: "", **{a: "" for a in ITEM_ATTRIBUTES}})
        _write_events(catalog, options, out["events"], events)
        outputs = out.counts()
    stats = {
        "dataset": "amazon",
        "input_dir": input_dir,
        "output_dir": output_dir,
        "max_rows": max_rows,
        "options": dataclasses.asdict(options),
        "inputs": {name: counts.as_dict() for name, counts in inputs.items()},
        "outputs": outputs,
        "events": dict(events),
        "schema_versions": dict(versions),
        "users": len(catalog.user_interactions),
        "reviewed_items": len(catalog.item_ids),
        "items_without_metadata": len(missing),
    }
    write_stats(output_dir, stats)
    return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipelines.adapters.amazon",
        description="Convert Amazon reviews (2014 / 2018 / 2023 releases: 5-core reviews + meta_* metadata, "
        "JSON lines, .gz accepted) into seminar-tf's raw format (items.jsonl, events.jsonl, "
        "adapter_stats.json). Reviews become click events; each user's later interactions become labelled "
        "impressions (leave-one-out splits) with sampled negatives.",
    )
    parser.add_argument("--input", required=True,
                        help="Directory with the review and meta_* files (*.json, *.jsonl, optionally .gz).")
    parser.add_argument("--output", required=True, help="Directory to write the raw-format tables into.")
    parser.add_argument("--reviews", default="",
                        help="Comma-separated review files to read instead of discovering them in --input.")
    parser.add_argument("--meta", default="",
                        help="Comma-separated metadata files to read instead of discovering meta_* in --input.")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="Read at most this many lines from each input file (default: all).")
    parser.add_argument("--negatives", type=int, default=1,
                        help="Label-0 impressions sampled per positive impression (default 1; 0 for none).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the negative sampling, combined with the user id (default 0).")
    parser.add_argument("--min-rating", type=float, default=None,
                        help="Skip reviews rated below this (default: keep all reviews as interactions).")
    parser.add_argument("--no-train-samples", action="store_true",
                        help="Emit labelled impressions only for each user's last two interactions "
                        "(valid/test), not for the earlier ones (train).")
    parser.add_argument("--all-metadata", action="store_true",
                        help="Also write items that no review mentions (default: only reviewed items).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options = AmazonOptions(
        negatives=args.negatives,
        seed=args.seed,
        min_rating=args.min_rating,
        train_samples=not args.no_train_samples,
        all_metadata=args.all_metadata,
        reviews_files=tuple(split_list_flag(args.reviews)),
        meta_files=tuple(split_list_flag(args.meta)),
    )
    stats = convert(args.input, args.output, max_rows=args.max_rows, options=options)
    json.dump(stats, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
