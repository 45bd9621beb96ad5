"""Raw tables -> dataset directory (docs/design.md §1-§3): vocabularies, item/query tables, one timeline per user,
pretrain and CTR samples per split, dead letters, stats.json and metadata.json.

Usage:
    python -m beam_pipelines.build_dataset --input RAW_DIR --output DATASET_DIR [--runner ...] [beam options]

Runs on FnApiRunner unless ``--runner`` says otherwise (Dataflow/Flink/Spark take the same code; ship the
package to workers with ``--setup_file``). Every input row ends up either in the dataset or in
``dead_letter/`` with a reason, and stats.json keeps ``rows_read == rows_ok + sum(dead letters)`` per table.

Stages: read + parse (dead letter: unparseable_row) -> validate rows (missing_field:*, bad_timestamp, ...)
-> items: embedding dimension, duplicates -> item vocabulary (item_min_count) -> events: split (column or
global time cutoffs) + unknown_item -> query/token/attribute vocabularies -> group events per user ->
point-in-time histories -> per-user timelines (SequenceExamples) and samples (Examples cutting a timeline at the
sample's time); stats and metadata are written by the pipeline itself, so they are exact on every runner (no reliance
on metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from seminar_tf import schema
from seminar_tf.cli_args import add_build_arguments, build_config_from_args
from seminar_tf.config import BuildConfig  # noqa: F401  (defined in the leaf config module)

from beam_pipelines import raw_io
from beam_pipelines import transforms as tx

logger = logging.getLogger("beam_pipelines.build_dataset")  # not "__main__" under python -m

DEFAULT_RUNNER = "FnApiRunner"
DEAD = raw_io.DEAD_LETTER_TAG


# ----------------------------------------------------------------------------------------------------------
# Command line
# The flags live in the light seminar_tf.cli_args (no Beam import) so `seminar-tf build --help` stays fast.


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m beam_pipelines.build_dataset",
        description="Build a seminar-tf dataset directory (vocabularies, item/query tables, per-user timelines, "
        "pretrain and CTR TFRecords, dead letters, stats.json, metadata.json) from raw items/events/users tables.",
        epilog="Any other argument goes to Beam's PipelineOptions, e.g. --runner=DataflowRunner --project=... "
        "--region=... --temp_location=gs://... --setup_file=./setup.py, or --direct_num_workers=2 "
        "--direct_running_mode=multi_processing. Without --runner the pipeline runs on FnApiRunner.",
    )
    add_build_arguments(parser)
    args, pipeline_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("beam_pipelines").setLevel(logging.INFO)  # Beam's import already configured the root
    try:
        config = build_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    stats = build_dataset(args.input, args.output, config, pipeline_args)
    keys = ("rows_read", "rows_ok", "dead_letters", "samples", "timelines", "channels")
    print(json.dumps({k: stats[k] for k in keys}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Pipeline
def pipeline_options(pipeline_args: Optional[Sequence[str]]) -> PipelineOptions:
    """Beam options from the extra arguments; FnApiRunner when no runner is given."""
    options = PipelineOptions(list(pipeline_args or []))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return options


def build_dataset(
    input_dir: str, output_dir: str, config: BuildConfig, pipeline_args: Optional[List[str]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Runs the pipeline to completion and returns the stats it wrote to ``<output_dir>/stats.json``.

    ``progress`` gets one line per stage: reading (the input files found), building samples (the pipeline runs:
    parse, validate, vocabularies, timelines, samples, each written as it is made), writing (stats.json and
    metadata.json are there) and done with the wall time."""
    started = time.time()
    report = progress or (lambda message: None)
    files = {table: raw_io.find_table_files(input_dir, table) for table in schema.RAW_TABLES}
    for table in ("items", "events"):
        if files[table] is None:
            raise FileNotFoundError(f"no {table}.<jsonl|jsonl.gz|csv|parquet> or {table}-* files in {input_dir}; "
                                    "`seminar-tf world --out DIR` writes a raw directory")
    for table, found in files.items():
        if found:
            logger.info("input %s: %d %s file(s)", table, len(found.paths), found.fmt)
    report("build 1/3 reading " + input_dir + ": " + ", ".join(
        f"{table} ({len(found.paths)} {found.fmt} file{'s' if len(found.paths) != 1 else ''})"
        for table, found in files.items() if found))
    removed = raw_io.delete_matching(
        [
            FileSystems.join(output_dir, d, "*")
            for d in (
                schema.VOCAB_DIR,
                schema.ITEM_TABLE_DIR,
                schema.QUERY_TABLE_DIR,
                schema.PRETRAIN_DIR,
                schema.CTR_DIR,
                schema.TIMELINE_DIR,
                schema.DEAD_LETTER_DIR,
            )
        ]
        + [FileSystems.join(output_dir, schema.STATS_FILE), FileSystems.join(output_dir, schema.METADATA_FILE)]
    )
    if removed:
        logger.info("removed %d files of a previous dataset in %s", removed, output_dir)
    options = pipeline_options(pipeline_args)
    runner = options.view_as(StandardOptions).runner
    logger.info("building %s -> %s on %s with %s", input_dir, output_dir, runner, config)
    pipeline = beam.Pipeline(options=options)
    _construct(pipeline, files, output_dir, config)
    report(f"build 2/3 building samples on {runner}: parse, validate, vocabularies, timelines, pretrain/ctr samples "
           f"(written to {output_dir} as they are made)")
    result = pipeline.run()
    result.wait_until_finish()
    _remove_empty_temp_dirs(output_dir)
    report(f"build 3/3 writing finished: TFRecords, vocabularies, dead letters, {schema.STATS_FILE} and "
           f"{schema.METADATA_FILE} under {output_dir}")
    stats = json.loads(raw_io.read_text_file(FileSystems.join(output_dir, schema.STATS_FILE)))
    report(f"build done in {time.time() - started:.1f}s")
    logger.info("rows read %s, ok %s; dead letters %s", stats["rows_read"], stats["rows_ok"], stats["dead_letters"])
    logger.info("samples %s; too short %s; timelines %s", stats["samples"], stats["too_short_history"],
                stats["timelines"])
    logger.info("vocabularies %s; channels %s", stats["vocab_sizes"], stats["channels"])
    return stats


def _remove_empty_temp_dirs(output_dir: str) -> None:
    """Local runs with a fixed shard count leave empty ``beam-temp-*`` directories behind; drop them."""
    if FileSystems.get_scheme(output_dir) not in (None, "file") or not os.path.isdir(output_dir):
        return
    for entry in os.scandir(output_dir):
        if entry.is_dir():
            for sub in os.scandir(entry.path):
                if sub.is_dir() and sub.name.startswith("beam-temp-") and not os.listdir(sub.path):
                    os.rmdir(sub.path)


class _SetUnion(beam.CombineFn):
    """Union of iterables of strings -> sorted list."""

    def create_accumulator(self):
        return set()

    def add_input(self, accumulator, element):
        accumulator.update(element)
        return accumulator

    def merge_accumulators(self, accumulators):
        return set().union(*accumulators)

    def extract_output(self, accumulator):
        return sorted(accumulator)


def _sum_pairs(values):
    first = second = 0
    for a, b in values:
        first += a
        second += b
    return first, second


def _write_vocabulary(vocab, path):
    raw_io.write_text_file(path, "".join(f"{entry}\n" for entry in vocab[0]))
    logger.info("wrote %s (%d entries)", path, len(vocab[0]))


def _write_attribute_vocabularies(vocabs, directory, file_name):
    for name, vocab in vocabs.items():
        _write_vocabulary(vocab, FileSystems.join(directory, file_name(name)))


class _DatasetGraph:
    """Adds the build's stages to one pipeline (the order of the module docstring), one method per stage.

    ``v`` collects the PCollections each stage produces for the later ones; ``counts`` (counter PCollections) and
    ``dead_letters`` (per table) are gathered by every stage and written by the last two.
    """

    def __init__(self, p: beam.Pipeline, files: Dict[str, Optional[raw_io.TableFiles]], out: str,
                 config: BuildConfig):
        self.p, self.files, self.out, self.config = p, files, out, config
        self.counts = []  # PCollections of (counter key tuple, count)
        self.dead_letters: Dict[str, list] = {}
        self.v = SimpleNamespace()

    # ---------------------------------------------------------------------------------------------- helpers
    def count(self, pcoll, label, keys):
        """Counts ``keys(element)`` (a list of counter keys) over pcoll."""
        self.counts.append(pcoll | f"Count{label}" >> beam.ParDo(tx.CountKeys(keys)))

    def read_table(self, table, validate):
        read = self.p | f"Read{table.title()}" >> raw_io.ReadRawTable(self.files[table])
        checked = read["rows"] | f"Validate{table.title()}" >> beam.ParDo(validate).with_outputs(DEAD, main="ok")
        self.dead_letters[table] = [read["dead_letters"], checked[DEAD]]
        self.count(read["rows"], f"{table}Read", lambda _, t=table: [("rows_read", t)])
        self.count(read["dead_letters"], f"{table}Unparseable", lambda _, t=table: [("rows_read", t)])
        columns = read["rows"] | f"{table}Columns" >> beam.CombineGlobally(_SetUnion())
        return checked.ok, columns

    def deduplicate(self, records, table, key_field, reason):
        kept = (
            records
            | f"Key{table}" >> beam.Map(lambda r: (r[key_field], r))
            | f"Group{table}" >> beam.GroupByKey()
            | f"Dedup{table}" >> beam.FlatMap(tx.keep_first_row(table, key_field, reason)).with_outputs(DEAD, main="ok")
        )
        self.dead_letters[table].append(kept[DEAD])
        return kept.ok

    # ----------------------------------------------------------------------------------------------- stages
    def items(self) -> None:
        """Items: validate, embedding dimension, duplicates."""
        v = self.v
        parsed_items, v.item_columns = self.read_table("items", tx.ValidateRows("items"))
        v.image_dim = (
            parsed_items
            | "EmbeddingLengths" >> beam.Map(lambda r: len(r["embedding"] or ()))
            | "CountLengths" >> beam.combiners.Count.PerElement()
            | "GatherLengths" >> beam.combiners.ToList()
            | "ImageDim" >> beam.Map(tx.image_dim_from_lengths, self.config.image_dim)
        )
        dim_checked = parsed_items | "CheckEmbeddingDim" >> beam.ParDo(
            tx.check_embedding_dim, _singleton(v.image_dim)
        ).with_outputs(DEAD, main="ok")
        self.dead_letters["items"].append(dim_checked[DEAD])
        v.valid_items = self.deduplicate(dim_checked.ok, "items", "item_id", raw_io.DUPLICATE_ITEM)
        self.count(v.valid_items, "ItemsOk", tx.item_counter_keys)

    def events(self) -> None:
        """Events: validate, split (column or global time cutoffs), item vocabulary, unknown items."""
        v, config = self.v, self.config
        parsed_events, v.event_columns = self.read_table(
            "events", tx.ValidateRows("events", config.history_events, config.sample_events)
        )
        explicit_splits = (
            parsed_events
            | "HasSplit" >> beam.Filter(lambda r: r["split"] is not None)
            | "CountSplit" >> beam.combiners.Count.Globally()
        )
        valid_fraction, test_fraction = config.valid_fraction, config.test_fraction

        def split_info(timestamp_counts, num_explicit):
            if num_explicit:
                return {"mode": "column", "valid_from": None, "test_from": None}
            valid_from, test_from = tx.time_split_cutoffs(timestamp_counts, valid_fraction, test_fraction)
            return {"mode": "time", "valid_from": valid_from, "test_from": test_from}

        v.splits = (
            parsed_events
            | "Timestamps" >> beam.Map(lambda r: r["timestamp"])
            | "CountTimestamps" >> beam.combiners.Count.PerElement()
            | "GatherTimestamps" >> beam.combiners.ToList()
            | "SplitInfo" >> beam.Map(split_info, _singleton(explicit_splits))
        )
        v.item_vocab = (
            (
                v.valid_items | "ItemInTable" >> beam.Map(lambda r: (r["item_id"], (1, 0))),
                parsed_events | "ItemEvent" >> beam.Map(lambda r: (r["item_id"], (0, 1))),
            )
            | "FlattenItemCounts" >> beam.Flatten()
            | "SumItemCounts" >> beam.CombinePerKey(_sum_pairs)
            | "OnlyTableItems" >> beam.Filter(lambda kv: kv[1][0] > 0)
            | "ItemEventCounts" >> beam.Map(lambda kv: (kv[0], kv[1][1]))
            | "ItemVocabulary" >> tx.BuildVocabulary(schema.RESERVED, config.item_min_count)
        )
        v.item_index = v.item_vocab | "ItemIndex" >> beam.Map(tx.vocabulary_index)
        assigned = parsed_events | "SplitAndItem" >> beam.ParDo(
            tx.AssignSplitAndItem(), _singleton(v.splits), _singleton(v.item_index)
        ).with_outputs(DEAD, main="ok")
        self.dead_letters["events"].append(assigned[DEAD])
        v.valid_events = assigned.ok
        self.count(v.valid_events, "EventsOk", tx.event_counter_keys)

    def vocabularies(self) -> None:
        """Query, token and item attribute vocabularies."""
        v, config = self.v, self.config
        v.query_vocab = (
            v.valid_events
            | "Queries" >> beam.FlatMap(lambda r: [(r["query"], 1)] if r["query"] else [])
            | "QueryVocabulary" >> tx.BuildVocabulary(schema.QUERY_RESERVED, config.query_min_count)
        )
        v.query_index = v.query_vocab | "QueryIndex" >> beam.Map(tx.vocabulary_index)
        v.vocab_items = v.valid_items | "InVocabulary" >> beam.FlatMap(
            lambda r, index: [(index[r["item_id"]], r)] if r["item_id"] in index else [], _singleton(v.item_index)
        )
        self.count(v.vocab_items, "VocabItems", tx.vocabulary_item_counter_keys)
        first_query = len(schema.QUERY_RESERVED)
        v.token_vocab = (
            (
                v.vocab_items | "TitleTokens" >> beam.FlatMap(lambda ir: [(t, 1) for t in ir[1]["title_tokens"]]),
                v.query_vocab
                | "QueryTokens" >> beam.FlatMap(
                    lambda q: [(t, 1) for text in q[0][first_query:] for t in tx.query_tokens(text)]),
            )
            | "FlattenTokens" >> beam.Flatten()
            | "TokenVocabulary" >> tx.BuildVocabulary(schema.RESERVED, config.token_min_count)
        )
        v.token_index = v.token_vocab | "TokenIndex" >> beam.Map(tx.vocabulary_index)
        item_attribute_names = (
            v.valid_items
            | "ItemAttributeNames" >> beam.Map(lambda r: list(r["attrs"]))
            | "UnionItemAttributes" >> beam.CombineGlobally(_SetUnion())
        )
        v.item_attribute_vocabs = (
            v.vocab_items
            | "ItemAttributeValues" >> beam.FlatMap(lambda ir: tx.attribute_value_pairs(ir[1]))
            | "ItemAttributeVocabularies"
            >> tx.BuildAttributeVocabularies(item_attribute_names, config.attribute_min_count)
        )
        v.item_attribute_indexes = v.item_attribute_vocabs | "ItemAttributeIndexes" >> beam.Map(tx.attribute_indexes)

    def users(self) -> None:
        """Users (when the raw input has a users table): validate, duplicates, attribute vocabularies."""
        v, p = self.v, self.p
        if self.files["users"] is None:
            v.user_columns = p | "NoUserColumns" >> beam.Create([[]])
            v.user_attribute_vocabs = p | "NoUserAttributes" >> beam.Create([{}])
            v.user_attributes = p | "NoUsers" >> beam.Create([])
            return
        parsed_users, v.user_columns = self.read_table("users", tx.ValidateRows("users"))
        valid_users = self.deduplicate(parsed_users, "users", "user_id", raw_io.DUPLICATE_USER)
        self.count(valid_users, "UsersOk", lambda _: [("rows_ok", "users")])
        user_attribute_names = (
            valid_users
            | "UserAttributeNames" >> beam.Map(lambda r: list(r["attrs"]))
            | "UnionUserAttributes" >> beam.CombineGlobally(_SetUnion())
        )
        v.user_attribute_vocabs = (
            valid_users
            | "UserAttributeValues" >> beam.FlatMap(tx.attribute_value_pairs)
            | "UserAttributeVocabularies"
            >> tx.BuildAttributeVocabularies(user_attribute_names, self.config.attribute_min_count)
        )
        user_attribute_indexes = v.user_attribute_vocabs | "UserAttributeIndexes" >> beam.Map(tx.attribute_indexes)
        v.user_attributes = valid_users | "UserAttributes" >> beam.Map(
            lambda r, indexes: (r["user_id"], {n: tx.lookup(i, r["attrs"].get(n)) for n, i in indexes.items()}),
            _singleton(user_attribute_indexes),
        )

    def ids_and_feedback(self) -> None:
        """User ids (train-split events only: an id first seen in valid/test would get an untrained embedding, OOV
        is the trained fallback) and history feedback tokens."""
        v = self.v
        v.user_vocab = (
            v.valid_events
            | "TrainUsers" >> beam.FlatMap(lambda r: [(r["user_id"], 1)] if r["split"] == "train" else [])
            | "UserVocabulary" >> tx.BuildVocabulary(schema.RESERVED, self.config.user_min_count)
        )
        first_user = len(schema.RESERVED)
        v.user_index = v.user_vocab | "UserIndex" >> beam.FlatMap(
            lambda u: list(zip(u[0], range(len(u[0]))))[first_user:])
        v.feedback_vocab = (
            v.valid_events
            | "FeedbackTokens" >> beam.FlatMap(lambda r: [(r["feedback"], 1)] if r["roles"] & tx.HISTORY_ROLE else [])
            | "FeedbackVocabulary" >> tx.BuildVocabulary(schema.RESERVED, 1)
        )
        v.feedback_index = v.feedback_vocab | "FeedbackIndex" >> beam.Map(tx.vocabulary_index)

    def samples(self) -> None:
        """Group events per user: one timeline record per user, sample records (timeline cut-offs) per kind and
        split."""
        v, config, join = self.v, self.config, FileSystems.join
        user_events = v.valid_events | "CompactEvents" >> beam.Map(
            tx.compact_event, _singleton(v.query_index), _singleton(v.feedback_index))

        def sampling_counts(items, queries, num_browse):
            query_counts = list(queries[1])
            query_counts[schema.EMPTY_QUERY_INDEX] = num_browse
            return {"item_counts": items[1], "query_counts": query_counts}

        num_browse = (
            v.valid_events
            | "BrowseEvents" >> beam.Filter(lambda r: not r["query"])
            | "CountBrowse" >> beam.combiners.Count.Globally()
        )
        sampling = v.item_vocab | "SamplingCounts" >> beam.Map(
            sampling_counts, _singleton(v.query_vocab), _singleton(num_browse))
        tags = [tx.output_tag(kind, split) for kind in schema.EXAMPLE_KINDS for split in schema.SPLITS]
        built = (
            {"events": user_events, "users": v.user_attributes, "user_index": v.user_index}
            | "GroupPerUser" >> beam.CoGroupByKey()
            | "BuildSamples"
            >> beam.ParDo(
                tx.BuildUserSamples(config.max_history, config.min_history, config.pretrain_samples_per_user,
                                    config.num_negatives, config.seed),
                _singleton(sampling),
                _singleton(v.user_attribute_vocabs | "UserAttributeList" >> beam.Map(sorted)),
            ).with_outputs(tx.COUNTER_TAG, tx.TIMELINE_TAG, *tags)
        )
        self.counts.append(built[tx.COUNTER_TAG])
        timelines = join(self.out, schema.TIMELINE_DIR, schema.TIMELINE_DIR)
        built[tx.TIMELINE_TAG] | "WriteTimelines" >> _write_tfrecords(timelines, config)
        for kind in schema.EXAMPLE_KINDS:
            for split in schema.SPLITS:
                examples = built[tx.output_tag(kind, split)]
                examples | f"Write_{kind}_{split}" >> _write_tfrecords(join(self.out, kind, split), config)

    def tables(self) -> None:
        """The item and query tables (content the model stores as weights)."""
        v, join, config = self.v, FileSystems.join, self.config
        (
            v.vocab_items
            | "ItemExamples"
            >> beam.Map(
                lambda ir, tokens, attrs, dim: tx.item_example(ir[0], ir[1], tokens, attrs, dim),
                _singleton(v.token_index),
                _singleton(v.item_attribute_indexes),
                _singleton(v.image_dim),
            )
            | "WriteItemTable" >> _write_tfrecords(join(self.out, schema.ITEM_TABLE_DIR, "items"), config)
        )
        first_query = len(schema.QUERY_RESERVED)
        (
            v.query_vocab
            | "QueryEntries" >> beam.FlatMap(lambda q: list(enumerate(q[0]))[first_query:])
            | "QueryExamples" >> beam.Map(lambda iq, tokens: tx.query_example(iq[0], iq[1], tokens),
                                          _singleton(v.token_index))
            | "WriteQueryTable" >> _write_tfrecords(join(self.out, schema.QUERY_TABLE_DIR, "queries"), config)
        )

    def vocabulary_files(self) -> None:
        v, join = self.v, FileSystems.join
        vocab_dir = join(self.out, schema.VOCAB_DIR)
        v.item_vocab | "WriteItemVocab" >> beam.Map(_write_vocabulary, join(vocab_dir, schema.ITEM_VOCAB))
        v.query_vocab | "WriteQueryVocab" >> beam.Map(_write_vocabulary, join(vocab_dir, schema.QUERY_VOCAB))
        v.token_vocab | "WriteTokenVocab" >> beam.Map(_write_vocabulary, join(vocab_dir, schema.TOKEN_VOCAB))
        v.user_vocab | "WriteUserVocab" >> beam.Map(_write_vocabulary, join(vocab_dir, schema.USER_VOCAB))
        v.feedback_vocab | "WriteFeedbackVocab" >> beam.Map(_write_vocabulary, join(vocab_dir, schema.FEEDBACK_VOCAB))
        for label, vocabs, file_name in (
            ("WriteItemAttrVocabs", v.item_attribute_vocabs, schema.item_attribute_vocab),
            ("WriteUserAttrVocabs", v.user_attribute_vocabs, schema.user_attribute_vocab),
        ):
            vocabs | label >> beam.Map(_write_attribute_vocabularies, vocab_dir, file_name)

    def dead_letter_files(self) -> None:
        for table, pcolls in self.dead_letters.items():
            letters = pcolls | f"FlattenDead{table}" >> beam.Flatten()
            self.count(letters, f"Dead{table}", lambda d: [("dead_letters", d["table"], d["reason"])])
            (
                letters
                | f"DeadJson{table}" >> beam.Map(raw_io.dead_letter_json)
                | f"WriteDead{table}"
                >> beam.io.WriteToText(FileSystems.join(self.out, schema.DEAD_LETTER_DIR, table),
                                       file_name_suffix=".jsonl")
            )

    def stats(self) -> None:
        """stats.json and metadata.json, once everything they count is known (after every other stage)."""
        v = self.v
        counters = (
            self.counts
            | "FlattenCounts" >> beam.Flatten()
            | "SumCounts" >> beam.CombinePerKey(sum)
            | "CountsDict" >> beam.combiners.ToDict()
        )
        sizes = v.item_vocab | "VocabSizes" >> beam.Map(
            _vocab_sizes,
            *map(_singleton, (v.query_vocab, v.token_vocab, v.item_attribute_vocabs, v.user_attribute_vocabs,
                              v.user_vocab, v.feedback_vocab)),
        )
        tables = {t: (f.fmt, list(f.paths)) for t, f in self.files.items() if f is not None}
        (
            self.p
            | "StatsTrigger" >> beam.Create([None])
            | "WriteStats"
            >> beam.ParDo(
                _WriteStats(self.out, self.config, tables),
                *map(_singleton, (counters, sizes, v.image_dim, v.splits, v.item_columns, v.event_columns,
                                  v.user_columns)),
            )
        )


STAGES = ("items", "events", "vocabularies", "users", "ids_and_feedback", "samples", "tables", "vocabulary_files",
          "dead_letter_files", "stats")


def _singleton(pcoll):
    return beam.pvalue.AsSingleton(pcoll)


def _vocab_sizes(items, queries, tokens, item_attrs, user_attrs, users, feedback):
    return {
        "items": len(items[0]),
        "queries": len(queries[0]),
        "tokens": len(tokens[0]),
        "item_attributes": {n: len(v[0]) for n, v in item_attrs.items()},
        "user_attributes": {n: len(v[0]) for n, v in user_attrs.items()},
        "users": len(users[0]),
        "feedback": len(feedback[0]),
    }


def _construct(p: beam.Pipeline, files: Dict[str, Optional[raw_io.TableFiles]], out: str, config: BuildConfig) -> None:
    """Adds every stage to ``p`` in ``STAGES`` order (see the module docstring)."""
    graph = _DatasetGraph(p, files, out, config)
    for stage in STAGES:
        logger.debug("constructing: %s", stage)
        getattr(graph, stage)()


def _write_tfrecords(prefix: str, config: BuildConfig):
    if config.ordered_shards and config.num_shards > 0:
        return _OrderedShards(prefix, config.num_shards)
    return beam.io.WriteToTFRecord(
        prefix, file_name_suffix=schema.TFRECORD_SUFFIX, num_shards=config.num_shards,
        compression_type=CompressionTypes.GZIP
    )


def shard_key(record: bytes, num_shards: int):
    """(shard, sort key) of a serialized record under ``ordered_shards``: both from a hash of its bytes alone."""
    digest = hashlib.blake2b(record, digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards, digest


def _keyed_by_shard(record: bytes, num_shards: int):
    shard, digest = shard_key(record, num_shards)
    return shard, (digest, record)


class _OrderedShards(beam.PTransform):
    """Writes ``PREFIX-0000i-of-0000N.tfrecord.gz`` like ``WriteToTFRecord``, but a record's shard and its place in
    the shard depend only on its bytes (``shard_key``), so two builds of the same input write identical files.
    Every shard file exists, empty or not; each is written under a temporary name and then renamed."""

    def __init__(self, prefix: str, num_shards: int):
        super().__init__()
        self._prefix, self._num_shards = prefix, num_shards

    def expand(self, records):
        n = self._num_shards
        keyed = records | "ShardKey" >> beam.Map(_keyed_by_shard, n)
        every = records.pipeline | "EveryShard" >> beam.Create([(i, None) for i in range(n)])
        return ({"records": keyed, "shard": every} | "GroupShards" >> beam.CoGroupByKey()
                | "WriteShard" >> beam.Map(self._write))

    def _write(self, element) -> str:
        from apache_beam.io.tfrecordio import _TFRecordUtil

        shard, groups = element
        n = self._num_shards
        path = f"{self._prefix}-{shard:05d}-of-{n:05d}{schema.TFRECORD_SUFFIX}"
        temporary = f"{path}.tmp"
        with FileSystems.create(temporary, compression_type=CompressionTypes.GZIP) as f:
            for _, record in sorted(groups["records"]):  # by (hash, bytes), each hashed once in ShardKey
                _TFRecordUtil.write_record(f, record)
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([temporary], [path])
        return path


class _WriteStats(beam.DoFn):
    """Writes stats.json and metadata.json from the pipeline's counters and facts (all side inputs)."""

    def __init__(self, out: str, config: BuildConfig, tables: dict):
        self._out = out
        self._config = config
        self._tables = tables

    def process(self, _, counters, sizes, image_dim, splits, item_columns, event_columns, user_columns):
        stats = assemble_stats(
            counters,
            sizes,
            image_dim,
            splits,
            self._config,
            self._tables,
            {"items": item_columns, "events": event_columns, "users": user_columns},
        )
        metadata = schema.DatasetMetadata(
            num_items=sizes["items"],
            num_queries=sizes["queries"],
            num_tokens=sizes["tokens"],
            item_attributes=sizes["item_attributes"],
            user_attributes=sizes["user_attributes"],
            image_dim=image_dim,
            has_image_pixels=False,
            channels=stats["channels"],
            max_history=self._config.max_history,
            num_negatives=self._config.num_negatives,
            num_users=sizes["users"],
            num_feedback=sizes["feedback"],
            history_layout=schema.TIMELINES_LAYOUT,
        )
        stats_text = json.dumps(stats, indent=2, sort_keys=True) + "\n"
        raw_io.write_text_file(FileSystems.join(self._out, schema.STATS_FILE), stats_text)
        raw_io.write_text_file(FileSystems.join(self._out, schema.METADATA_FILE), metadata.to_json() + "\n")
        logger.info("wrote %s and %s", schema.STATS_FILE, schema.METADATA_FILE)


def assemble_stats(
    counters: dict, sizes: dict, image_dim: int, splits: dict, config: BuildConfig, tables: dict, columns: dict
) -> dict:
    """The stats.json document from ``(key tuple) -> count`` counters and the pipeline's facts."""
    present = [t for t in schema.RAW_TABLES if t in tables]
    dead = {t: {} for t in present}
    for key, value in sorted(counters.items()):
        if key[0] == "dead_letters":
            dead[key[1]][key[2]] = value

    def per_kind(name):
        return {k: {s: counters.get((name, k, s), 0) for s in schema.SPLITS} for k in schema.EXAMPLE_KINDS}

    rows_ok = {t: counters.get(("rows_ok", t), 0) for t in present}
    facts = {
        "has_queries": counters.get(("events_with_query",), 0) > 0,
        "has_titles": counters.get(("items_with_title",), 0) > 0,
        "image_dim": image_dim,
        "has_image_pixels": False,
    }
    item_attributes = sorted(sizes["item_attributes"])
    return {
        "rows_read": {t: counters.get(("rows_read", t), 0) for t in present},
        "rows_ok": rows_ok,
        "dead_letters": dead,
        "samples": per_kind("samples"),
        "too_short_history": per_kind("too_short_history"),
        "timelines": {"users": counters.get(("timelines",), 0), "steps": counters.get(("timeline_steps",), 0)},
        "vocab_sizes": sizes,
        "channels": schema.channels_present(facts),
        "channel_facts": facts,
        "columns": {t: columns[t] for t in present},
        "item_attributes": item_attributes,
        "user_attributes": sorted(sizes["user_attributes"]),
        "image_dim": image_dim,
        "items": {
            "in_vocabulary": counters.get(("items_in_vocabulary",), 0),
            "below_min_count": rows_ok["items"] - counters.get(("items_in_vocabulary",), 0),
            "with_title": counters.get(("items_with_title",), 0),
            "with_image_embedding": counters.get(("items_with_image_embedding",), 0),
            "with_image": counters.get(("items_with_image",), 0),
        },
        "events": {
            "history": counters.get(("events_history",), 0),
            "sample": counters.get(("events_sample",), 0),
            "with_query": counters.get(("events_with_query",), 0),
            "browse": counters.get(("events_browse",), 0),
        },
        "split": splits,
        "input": {t: {"format": fmt, "files": paths} for t, (fmt, paths) in tables.items()},
        "config": dataclasses.asdict(config),
    }


if __name__ == "__main__":
    sys.exit(main())
