"""Command-line arguments of the commands whose modules import TensorFlow or Beam (``build``, ``export``).

A leaf like ``seminar_tf.config`` (the standard library, ``seminar_tf.config`` and ``seminar_tf.schema``; the export
flags add ``seminar_tf.quantization``'s, numpy), so ``seminar-tf COMMAND --help`` loads neither.
``beam_pipelines.build_dataset`` and ``seminar_tf.export`` register their flags from here.
"""

from __future__ import annotations

import argparse

from seminar_tf import config as config_lib
from seminar_tf.config import BuildConfig


class CliError(Exception):
    """An expected failure of a command (missing input, a run that is not there): its message, no traceback, exit 1."""

    exit_code = 1


class UsageError(CliError):
    """A bad flag value, ``--set`` key or combination of flags: its message, no traceback, exit 2."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------- build
BUILD_FLAG_HELP = {
    "max_history": "newest history steps a sample's history holds (timelines keep every step; the reader cuts)",
    "min_history": "samples with fewer history steps are not written (counted as too_short_history)",
    "history_events": "comma-separated event types that enter histories and pretrain targets",
    "sample_events": "comma-separated event types that become labelled CTR samples (label 0/1 required)",
    "num_negatives": "sampled negative (query, item) pairs per pretrain example",
    "pretrain_samples_per_user": "pretrain examples per user and split, evenly spaced over the user's history "
    "events of that split; 0 = one per history event",
    "valid_fraction": "share of events (newest before test) in valid, when events have no split column",
    "test_fraction": "share of newest events in test, when events have no split column",
    "item_min_count": "items with fewer events are left out of the vocabulary (their events: unknown_item)",
    "query_min_count": "queries seen fewer times map to OOV",
    "token_min_count": "title/query tokens seen fewer times map to OOV",
    "attribute_min_count": "item/user attribute values seen fewer times map to OOV",
    "user_min_count": "users with fewer train-split events map to the OOV user id (vocab/users.txt)",
    "num_shards": "TFRecord shards per output (0 = let the runner decide)",
    "ordered_shards": "with num_shards > 0: each record's shard and place in it follow from a hash of its bytes, so "
    "every build of the same input writes byte-identical files (training reads the same order, runs reproduce); "
    "a shard is then sorted on one worker, so it must fit in its memory",
    "image_dim": "image_embedding length (0 = the most common length in the items table)",
    "seed": "seed of the negative sampling (per-sample deterministic)",
}


def add_build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--input``, ``--output`` and one flag per ``BuildConfig`` field (defaults from the dataclass)."""
    parser.add_argument(
        "--input",
        required=True,
        help="raw directory with items.*, events.*, optional users.* "
        "(JSONL, JSONL.gz, CSV or Parquet; one file or <table>-* shards; any Beam filesystem)",
    )
    parser.add_argument(
        "--output", required=True, help="dataset directory to write (its previous dataset files " "are replaced)"
    )
    config_lib.add_dataclass_arguments(parser, BuildConfig, helps=BUILD_FLAG_HELP)  # the CLI's one flag mechanism
    config_lib.add_set_argument(parser, "build")
    return parser


def build_config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The flags' ``BuildConfig``, then ``--set build.FIELD=VALUE``; ValueError names a bad field or value."""
    config = config_lib.dataclass_from_args(BuildConfig, args)
    return config_lib.override_section(config, "build", getattr(args, "set", None) or [])


# ---------------------------------------------------------------------------------------------- export
DEFAULT_MAX_CANDIDATES = 1000  # most candidates per rank request of an export


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """The ``export`` subparser with its flags; the caller sets its handler."""
    p = subparsers.add_parser(
        "export", help="export a fine-tuned run as a versioned SavedModel for TF Serving",
        description="Writes EXPORT_BASE/<next version>/ (atomically: a hidden temporary directory renamed "
        "into place) with the signatures serving_default/ctr, rank, ctr_examples (Regress), ctr_classify "
        "(Classify), pretrain (when the run has a PSU) and encode_items. Inputs are raw string ids and raw "
        "query text; the vocabularies are assets inside the SavedModel. Inspect with `saved_model_cli show "
        "--dir EXPORT_BASE/<version> --all`.")
    p.add_argument("--model-dir", required=True, help="fine-tuned run directory (seminar-tf finetune --model-dir)")
    p.add_argument("--export-base", required=True, help="model base path; versions are written under it")
    p.add_argument("--data", default=None, help="dataset directory whose vocabularies to serve with (default: the "
                   "run's own copy of its dataset's metadata and vocabularies; no dataset is needed)")
    p.add_argument("--max-history", type=int, default=None,
                   help="longest history L a request may send (default: the run's training max_history)")
    p.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES,
                   help=f"most candidates N per rank request (default: {DEFAULT_MAX_CANDIDATES})")
    p.add_argument("--psu-dir", default=None,
                   help="PSU run for the pretrain signature (default: the run's --init-from, if any)")
    p.add_argument("--model-name", default="seminar", help="model name written into the warmup requests")
    from seminar_tf import quantization  # numpy, no TensorFlow

    quantization.add_gsu_arguments(p, what="of the served model", gsu_default="the run's",
                                   codebooks_default="the ones saved with the run's weights")
    p.add_argument("--no-content-cache", action="store_true",
                   help="do not precompute the vocabulary's content embeddings into the SavedModel (smaller "
                        "export for huge catalogs; every request then runs the content encoders over its history)")
    return p
