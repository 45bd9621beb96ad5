"""``seminar-tf``: the one command-line entry point.

Subcommands import their modules lazily: building the parser imports only light modules (``seminar_tf.config``,
``seminar_tf.cli_args``, numpy at most), so ``seminar-tf --help`` and ``seminar-tf COMMAND --help`` load neither
TensorFlow nor Beam; a handler imports what it runs. Nothing is parsed at import time.

Errors: an expected user error (``UsageError``: exit 2; ``CliError``, a missing or unreadable file, a ValueError of
bad input: exit 1) prints ``seminar-tf COMMAND: message`` on stderr without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from typing import Callable, List, Optional

import seminar_tf  # noqa: F401  (selects tf-keras before anything imports TensorFlow)
from seminar_tf import config as config_lib  # a leaf: no TensorFlow or Beam
from seminar_tf.cli_args import CliError, UsageError  # noqa: F401  (the CLI's error types, raised by handlers)

LOG = logging.getLogger("seminar_tf")


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- dataclass flags
# Flags are made from the config dataclasses by one mechanism (``config.add_dataclass_arguments``).
# Training flags of pretrain / finetune (``TrainConfig`` fields; unset = the preset's)
TRAIN_FLAGS = {"epochs": "override the preset's number of epochs",
               "batch_size": "override the preset's global batch size",
               "steps_per_epoch": "override steps per epoch (the preset's: one pass over the split)"}
# ``ModelConfig`` fields finetune takes as flags (any other: --set model.FIELD=VALUE); unset = the preset's
FINETUNE_MODEL_FLAGS = {"top_k": "K pairs the GSU keeps"}
EM3_FLAGS = {
    "fusion_queries": "Fusion-Q-Former: N learnable queries fuse each item's text/image channels into N channels "
                      "(0 = off)",
    "fusion_layers": "Fusion-Q-Former layers, cross-attention + transformer block each",
    "content_id_weight": "weight W of the content-ID contrastive loss, in-batch InfoNCE both ways between an item's "
                         "content and ID embeddings (0 = off)",
    "content_id_temperature": "temperature T of the content-ID loss",
    "lora_rank": "LoRA adapters of rank R on the content encoders after the PSU restore; their base weights stay "
                 "frozen (0 = off); refuses --freeze content",
    "lora_alpha": "LoRA scaling alpha A, scale A/R (0 = the rank)",
    "lora_targets": "comma-separated content sub-layers to adapt, e.g. text_encoder,image_encoder/mlp_output "
                    "(empty = every content encoder)",
}


# ---------------------------------------------------------------------------------------------- world
def _add_world(sub) -> None:
    from seminar_tf.config import WorldConfig

    p = sub.add_parser(
        "world",
        help="generate the synthetic world (raw items/events/users files with planted structure)",
        description="Writes the raw format (docs/design.md §2) of a synthetic world with planted topics, misaligned "
        "image/text channels, long-term interests visible only far back, search and browse events and "
        "impression labels from a known click model. Deterministic for a seed.",
    )
    p.add_argument("--out", required=True, help="output directory for items/events/users files and world_truth")
    config_lib.add_dataclass_arguments(p, WorldConfig)
    config_lib.add_set_argument(p, "world")
    p.set_defaults(handler=_run_world, takes_extra=False)


def _run_world(args, extra) -> int:
    from seminar_tf.data.world import WorldConfig, generate_world

    try:
        config = config_lib.dataclass_from_args(WorldConfig, args)
        config.validate()  # the flags' values, named as flags before --set applies
    except ValueError as error:
        raise UsageError(f"{error}; see seminar-tf world --help") from None
    try:
        config = config_lib.override_section(config, "world", args.set)
    except ValueError as error:
        raise UsageError(str(error)) from None
    summary = generate_world(config, args.out, progress=_progress)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- build
def _add_build(sub) -> None:
    from seminar_tf import cli_args

    p = sub.add_parser(
        "build",
        help="run the Beam pipeline: raw files -> vocabularies, item table, TFRecords, stats, dead letters",
        description="Apache Beam job (same as `python -m beam_pipelines.build_dataset`). Unknown flags are "
        "passed to Beam's PipelineOptions, e.g. --runner=DataflowRunner --project=... --region=...; "
        "the local default runner is FnApiRunner.",
    )
    cli_args.add_build_arguments(p)
    p.add_argument("--json", action="store_true", help="print the full stats.json instead of the summary")
    p.set_defaults(handler=_run_build, takes_extra=True)


def _run_build(args, extra) -> int:
    from seminar_tf import cli_args

    try:
        config = cli_args.build_config_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _check_input_dir(args.input, "--input")
    from beam_pipelines import build_dataset

    stats = build_dataset.build_dataset(args.input, args.output, config, pipeline_args=extra, progress=_progress)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    else:
        _print_build_summary(stats, args.output)
    return 0


def _check_input_dir(path: str, flag: str) -> None:
    """A local ``path`` that is missing, not a directory or empty fails before Beam starts (remote URLs pass)."""
    if "://" in path:
        return
    if not os.path.exists(path):
        raise CliError(f"{flag} {path}: no such directory; give the raw directory `seminar-tf world --out` wrote "
                       "(items.*, events.*, optional users.*)")
    if not os.path.isdir(path):
        raise CliError(f"{flag} {path}: not a directory; give the directory holding items.* and events.*")
    if not os.listdir(path):
        raise CliError(f"{flag} {path}: empty directory; it needs items.* and events.* files "
                       f"(e.g. seminar-tf world --out {path})")


DEAD_LETTER_WARN_SHARE = 0.01  # build warns when more of a table's rows than this go to dead letters


def _counts(mapping: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "none"


def build_warnings(stats: dict, output: str) -> List[str]:
    """``WARNING:`` lines of a build: an empty split of a sample kind, a table with over 1 % dead-lettered rows."""
    from seminar_tf import schema

    warnings = []
    for kind, splits in stats["samples"].items():
        for split, count in splits.items():
            if not count:
                warnings.append(f"WARNING: {kind}/{split} is empty: no {kind} sample fell in the {split} split; more "
                                f"users or events, a lower --min-history or other --valid-fraction/--test-fraction "
                                f"fill it ({split} metrics and early stopping need it)")
    for table, read in stats["rows_read"].items():
        dead = stats["dead_letters"].get(table, {})
        if read and sum(dead.values()) > DEAD_LETTER_WARN_SHARE * read:
            warnings.append(f"WARNING: {table}: {sum(dead.values())} of {read} rows "
                            f"({100.0 * sum(dead.values()) / read:.1f}%) went to dead letters ({_counts(dead)}); "
                            f"see {os.path.join(output, schema.DEAD_LETTER_DIR)}")
    return warnings


def _print_build_summary(stats: dict, output: str) -> None:
    """A short human summary of a build's stats.json on stdout; its warnings on stderr."""
    from seminar_tf import schema

    dead = {t: sum(reasons.values()) for t, reasons in stats["dead_letters"].items()}
    reasons = "; ".join(f"{t}: {_counts(r)}" for t, r in stats["dead_letters"].items() if r)
    lines = [
        f"rows read: {_counts(stats['rows_read'])}",
        f"rows ok: {_counts(stats['rows_ok'])}",
        f"dead-lettered: {_counts({t: n for t, n in dead.items() if n})}" + (f" ({reasons})" if reasons else ""),
    ]
    for kind, splits in stats["samples"].items():
        short = sum(stats.get("too_short_history", {}).get(kind, {}).values())
        ordered = {split: splits[split] for split in [*schema.SPLITS, *sorted(set(splits) - set(schema.SPLITS))]
                   if split in splits}
        lines.append(f"{kind} samples: {_counts(ordered)}" + (f" (too short history: {short})" if short else ""))
    timelines = stats.get("timelines") or {}
    if timelines:
        lines.append(f"timelines: {timelines.get('users', 0)} users, {timelines.get('steps', 0)} steps")
    sizes = {k: v for k, v in stats.get("vocab_sizes", {}).items() if isinstance(v, int)}
    lines.append(f"vocabularies: {_counts(sizes)}; channels: {', '.join(stats.get('channels', []))}")
    lines.append(f"wrote {output} ({schema.STATS_FILE}, {schema.METADATA_FILE}; seminar-tf build --json prints "
                 f"the full {schema.STATS_FILE})")
    print("\n".join(lines), flush=True)
    for warning in build_warnings(stats, output):
        print(warning, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- training
def load_preset(args):
    """``--config`` with its ``--set`` overrides; a bad override exits naming the field."""
    try:
        return config_lib.load_config(args.config, getattr(args, "set", ()))
    except ValueError as error:
        raise UsageError(str(error)) from None


def _add_config_flag(p) -> None:
    p.add_argument("--config", default="demo",
                   help="preset name (test, demo, paper_kuaisar, paper_amazon, movielens) or a YAML/JSON file of "
                   "overrides {base: PRESET, model: {...}, pretrain: {...}, finetune: {...}} (default: demo)")
    config_lib.add_set_argument(p)
    config_lib.add_dataclass_arguments(p, config_lib.TrainConfig, fields=list(TRAIN_FLAGS), helps=TRAIN_FLAGS,
                                       from_preset=True)


def _train_overrides(train_config, args):
    return dataclasses.replace(train_config, **config_lib.given_fields(args, list(TRAIN_FLAGS)))


def _channels_without_query(data_dir: str, model_config) -> tuple:
    """``--no-query-channel``: the channels the model would use (the config's among the dataset's at
    ``data_dir``, all of them by default) minus "query"."""
    from seminar_tf import schema
    from seminar_tf.data import reader
    from seminar_tf.models import builders

    metadata = reader.load_metadata(data_dir)
    kept = tuple(c for c in builders.resolve_channels(model_config, metadata) if c != schema.QUERY_CHANNEL)
    if not kept:
        raise UsageError(f"--no-query-channel leaves no channel (model.channels {list(model_config.channels)}, "
                         f"dataset channels {metadata.channels}); set model.channels in --config to item channels")
    return kept


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="PSU pretraining (next pair + multi-modal alignment + query-item relevance)",
        description="Trains the Pretraining Search Unit on DATASET_DIR/pretrain with Keras fit: progress bars, "
        "checkpoints (a killed run resumes from its last epoch), TensorBoard logs, early stopping; the "
        "resolved config is saved as MODEL_DIR/config.json. Vertex AI's AIP_MODEL_DIR, AIP_CHECKPOINT_DIR "
        "and AIP_TENSORBOARD_LOG_DIR are honoured; TF_CONFIG selects MultiWorkerMirroredStrategy.")
    p.add_argument("--data", required=True, help="dataset directory written by `seminar-tf build`")
    p.add_argument("--model-dir", default=None, help="run directory (default: $AIP_MODEL_DIR)")
    p.add_argument("--no-alignment", action="store_true",
                   help="ablation: drop the multi-modal alignment loss (model.align_weight = 0)")
    p.add_argument("--no-relevance", action="store_true",
                   help="ablation: drop the query-item relevance loss (model.relevance_weight = 0)")
    p.add_argument("--no-query-channel", action="store_true",
                   help="ablation: train without the query channel (model.channels = the dataset's channels "
                        "minus query); fine-tune the run with --no-query-channel too")
    _add_config_flag(p)
    p.set_defaults(handler=_run_pretrain, takes_extra=False)


def _run_pretrain(args, extra) -> int:
    from seminar_tf import experiment

    preset = load_preset(args)
    preset.pretrain = _train_overrides(preset.pretrain, args)
    changes = {}
    if args.no_alignment:
        changes["align_weight"] = 0.0
    if args.no_relevance:
        changes["relevance_weight"] = 0.0
    if args.no_query_channel:
        changes["channels"] = _channels_without_query(args.data, preset.model)
    preset.model = dataclasses.replace(preset.model, **changes)
    result = experiment.pretrain(args.data, args.model_dir, preset, progress=_progress)
    print(json.dumps({k: v[-1] for k, v in result["history"].items()}, indent=2, default=float))
    return 0


def _add_finetune(sub) -> None:
    from seminar_tf import quantization

    p = sub.add_parser(
        "finetune", help="SEMINAR CTR/PSR fine-tuning (GSU -> top-K -> ESU -> tower), restoring PSU weights",
        description="Trains the SEMINAR model on DATASET_DIR/ctr. With --init-from, the PSU run's content "
        "weights (embeddings, encoders, W_m) initialise the model. Same checkpointing/resume/TensorBoard/"
        "Vertex/TF_CONFIG behaviour as pretrain; early stopping on validation AUC.")
    p.add_argument("--data", required=True, help="dataset directory written by `seminar-tf build`")
    p.add_argument("--model-dir", default=None, help="run directory (default: $AIP_MODEL_DIR)")
    p.add_argument("--init-from", default=None, help="PSU run directory to restore content weights from")
    quantization.add_gsu_arguments(p, what="to train with", gsu_default="the preset's",
                                   codebooks_default="the --init-from run's")
    config_lib.add_dataclass_arguments(p, config_lib.ModelConfig, fields=list(FINETUNE_MODEL_FLAGS),
                                       helps=FINETUNE_MODEL_FLAGS, from_preset=True)
    p.add_argument("--freeze", default="", help="comma-separated parts to keep fixed: content, projections")
    p.add_argument("--no-history", action="store_true", help="baseline without the user history")
    p.add_argument("--model", default=None, choices=["seminar", "din", "sim_hard", "sim_soft", "eta", "twin", "qin"],
                   help="architecture: SEMINAR or a baseline in the same framework (default: the preset's, seminar)")
    p.add_argument("--no-pretrain", action="store_true",
                   help="train from scratch (the 'SEMINAR without pretraining' ablation); refuses --init-from")
    p.add_argument("--no-query-channel", action="store_true",
                   help="ablation: no query channel (model.channels = the dataset's channels minus query); "
                        "--init-from a PSU run trained with --no-query-channel")
    em3 = p.add_argument_group("EM3 options (architecture seminar only; model.FIELD, any other via --set)")
    config_lib.add_dataclass_arguments(em3, config_lib.ModelConfig, fields=list(EM3_FLAGS), helps=EM3_FLAGS,
                                       from_preset=True)
    _add_config_flag(p)
    p.set_defaults(handler=_run_finetune, takes_extra=False)


def _run_finetune(args, extra) -> int:
    from seminar_tf import experiment

    preset = load_preset(args)
    preset.finetune = _train_overrides(preset.finetune, args)
    frozen = {f.strip() for f in args.freeze.split(",") if f.strip()}
    unknown = frozen - {"content", "projections"}
    if unknown:
        raise UsageError(f"--freeze: unknown parts {sorted(unknown)}; choose from content, projections")
    changes = dict(freeze_content="content" in frozen or preset.model.freeze_content,
                   freeze_projections="projections" in frozen or preset.model.freeze_projections)
    if args.gsu:
        changes["gsu"] = args.gsu
    if args.pq_rerank:
        changes["pq_rerank"] = args.pq_rerank
    if args.codebooks and (args.gsu or preset.model.gsu) == "exact":
        raise UsageError("--codebooks is for --gsu pq_adc|pq_sdc; add one of those or drop --codebooks")
    if args.no_history:
        changes["use_history"] = False
    if args.model:
        changes["architecture"] = args.model
    if args.no_pretrain and args.init_from:
        raise UsageError("--no-pretrain and --init-from contradict each other; drop one")
    if args.no_query_channel:
        changes["channels"] = _channels_without_query(args.data, preset.model)
    changes.update(config_lib.given_fields(args, [*FINETUNE_MODEL_FLAGS, *EM3_FLAGS]))
    preset.model = dataclasses.replace(preset.model, **changes)
    try:
        preset.model.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    result = experiment.finetune(args.data, args.model_dir, preset, init_from=args.init_from, progress=_progress,
                                 codebooks=args.codebooks)
    print(json.dumps({k: v[-1] for k, v in result["history"].items()}, indent=2, default=float))
    return 0


def _add_evaluate(sub) -> None:
    from seminar_tf import quantization

    p = sub.add_parser(
        "evaluate", help="AUC, GAUC, logloss on the CTR test split; HIT/NDCG@1,5,10,50 and MRR (leave-last-out)",
        description="Scores DATASET_DIR/ctr/test (AUC, GAUC, logloss) and the ranking protocol on "
        "DATASET_DIR/pretrain/test: each true next pair against 99 sampled items the user never touched. A "
        "popularity baseline is reported beside the model. Writes JSON and a Markdown table. --split valid scores "
        "the valid split instead (its report is written beside the test one, never over it).")
    p.add_argument("--model-dir", required=True, help="fine-tuned run directory")
    p.add_argument("--data", default=None, help="dataset directory (default: the one the run was trained on)")
    p.add_argument("--out", default=None, help="report directory (default: MODEL_DIR/eval)")
    p.add_argument("--num-negatives", type=int, default=99, help="sampled negatives per positive (default: 99)")
    p.add_argument("--split", choices=["valid", "test"], default="test",
                   help="which split to score (default: test); choose hyper-parameters on valid, read test once")
    quantization.add_gsu_arguments(p, what="to evaluate with", gsu_default="the run's",
                                   codebooks_default="the ones saved with the run's weights")
    p.set_defaults(handler=_run_evaluate, takes_extra=False)


def _run_evaluate(args, extra) -> int:
    from seminar_tf import experiment

    metrics = experiment.evaluate(args.model_dir, args.data, args.out, num_negatives=args.num_negatives,
                                  progress=_progress, gsu=args.gsu, codebooks=args.codebooks,
                                  pq_rerank=args.pq_rerank, split=args.split)
    _print_metrics_table(metrics)
    return 0


def _print_metrics_table(metrics: dict) -> None:
    """The model and popularity rows of ``experiment.evaluate`` as a Markdown table, then what was scored."""
    from seminar_tf.evaluate import format_markdown_table

    columns = ["auc", "gauc", "logloss", "hit@1", "hit@5", "hit@10", "hit@50", "ndcg@5", "ndcg@10", "ndcg@50", "mrr"]
    rows = [{"model": name, **{c: metrics[name].get(c) for c in columns}} for name in ("model", "popularity")
            if isinstance(metrics.get(name), dict)]
    print(format_markdown_table(rows, ["model"] + columns))
    context = [f"{key} {metrics[key]}" for key in ("split", "gsu", "run", "data") if metrics.get(key) is not None]
    if context:
        print("; ".join(context))


# ---------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job end to end on the embedded synthetic world",
        description="world -> Beam pipeline (FnApiRunner) -> PSU pretraining -> SEMINAR fine-tuning from "
        "the PSU -> evaluation (metrics table beside a popularity baseline) -> SavedModel export -> local "
        "gRPC server ranking a sample user's candidates through the official stub, all under --work-dir.",
    )
    p.add_argument("--work-dir", default="runs/demo", help="directory for every artifact (default: runs/demo)")
    p.add_argument("--preset", default="demo", help="named preset for world and pipeline sizes: demo | test")
    config_lib.add_set_argument(p)
    p.set_defaults(handler=_run_demo, takes_extra=False)


def _run_demo(args, extra) -> int:
    from beam_pipelines.build_dataset import build_dataset
    from seminar_tf.data.world import generate_world

    try:
        preset = config_lib.apply_overrides(config_lib.get_preset(args.preset), args.set)
    except ValueError as error:
        raise UsageError(str(error)) from None
    raw_dir = os.path.join(args.work_dir, "raw")
    data_dir = os.path.join(args.work_dir, "dataset")
    started = time.time()
    _progress(f"[1/6] synthetic world -> {raw_dir}")
    world = generate_world(preset.world, raw_dir, progress=_progress)
    _progress(f"      {json.dumps({k: v for k, v in world.items() if isinstance(v, (int, float))})}")
    _progress(f"[2/6] Beam pipeline (FnApiRunner) -> {data_dir}")
    stats = build_dataset(raw_dir, data_dir, preset.build, pipeline_args=["--runner=FnApiRunner"], progress=_progress)
    _print_build_summary(stats, data_dir)
    from seminar_tf import experiment

    psu_dir = os.path.join(args.work_dir, "psu")
    ctr_dir = os.path.join(args.work_dir, "ctr")
    _progress(f"[3/6] PSU pretraining -> {psu_dir}")
    experiment.pretrain(data_dir, psu_dir, preset, progress=_progress)
    _progress(f"[4/6] SEMINAR fine-tuning from the PSU -> {ctr_dir}")
    experiment.finetune(data_dir, ctr_dir, preset, init_from=psu_dir, progress=_progress)
    _progress("[5/6] evaluation")
    metrics = experiment.evaluate(ctr_dir, data_dir, progress=_progress)
    _print_metrics_table(metrics)
    from seminar_tf import export

    export_base = os.path.join(args.work_dir, "export", "seminar")
    _progress(f"[6/6] SavedModel export -> {export_base}; rank a sample user through the local gRPC server")
    export.export_model(ctr_dir, export_base, data_dir=data_dir, progress=_progress)
    print(export.rank_sample_user(export_base, data_dir, progress=_progress))
    _progress(f"demo finished in {time.time() - started:.0f}s; artifacts under {args.work_dir}")
    return 0


# ---------------------------------------------------------------------------------------------- bench
MOVIELENS_MODELS = "seminar,din,sim_hard,sim_soft,eta,twin,no_history"  # bench movielens --models default
LONGSEQ_MODELS = "seminar,din"  # bench longseq --models default
LONGSEQ_VARIANTS = "model.aux_scope=history"  # bench longseq --variants default (LongSeqBenchConfig's)
LIFELONG_MODELS = "seminar_no_pretrain,sim_hard,sim_soft,eta,twin,din"  # bench lifelong --models default


def _names(text: str) -> tuple:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks that write rerunnable reports under benchmarks/",
        description="Runs a benchmark and writes a Markdown + JSON report. 'pipeline': Beam pipeline "
        "throughput (raw events/s) at several sizes on FnApiRunner. 'pq': product-quantization recall and "
        "speed (exact vs ADC vs SDC vs faiss). 'serving': load test of the rank signature through the local "
        "gRPC server. 'movielens': SEMINAR and the baselines on MovieLens (RecBole's ml-100k or --input), "
        "OUT/movielens/REPORT.md + movielens.json; not part of 'all'. 'longseq': the project at lifelong length "
        "(world, build and fine-tuning at L=10^3 and 10^4, each a child process of the CLI: peak RSS, bytes per CTR "
        "sample, epoch time), OUT/longseq.md + longseq.json; not part of 'all'. 'lifelong': does the far history pay "
        "(SEMINAR at L=10^2, 10^3, 10^4 and the long-sequence baselines on the lifelong world against its own "
        "oracle), OUT/lifelong/lifelong.md + lifelong.json; not part of 'all'. 'all': pipeline, pq and serving.",
    )
    p.add_argument("which", choices=["pipeline", "pq", "serving", "movielens", "longseq", "lifelong", "all"],
                   help="which benchmark to run")
    p.add_argument("--out", default="benchmarks", help="directory for the reports (default: benchmarks)")
    p.add_argument("--sizes", default="100000,1000000",
                   help="pipeline: comma-separated target raw event counts (default: 100000,1000000)")
    p.add_argument("--work-dir", default=None,
                   help="scratch directory for generated data and runs (default: runs/bench; movielens: "
                        "runs/bench/movielens; longseq: runs/bench/longseq, whose world is reused when its "
                        "parameters match; lifelong: runs/bench/lifelong, likewise)")
    p.add_argument("--preset", default="test",
                   help="pq: synthetic world + training preset of the trained-embedding parts: test (minutes) | "
                        "demo (the committed report; about an hour on 2 cores) (default: test)")
    ml = p.add_argument_group("movielens (--config, --set, --seeds, --epochs, --pretrain-epochs, --resume, --note: "
                              "lifelong too)")
    ml.add_argument("--input", default=None,
                    help="MovieLens directory the adapter reads (default: RecBole 1.2.1's ml-100k, from the wheel "
                         "that pip downloads into --cache-dir)")
    ml.add_argument("--cache-dir", default="~/.cache/seminar-tf/recbole",
                    help="where the RecBole wheel and the extracted ml-100k files go (default: %(default)s)")
    ml.add_argument("--config", default=None,
                    help="preset or YAML/JSON config of the build section and the rows (default: movielens; "
                         "lifelong: demo)")
    config_lib.add_set_argument(ml)
    ml.add_argument("--seeds", type=int, default=3, help="seeds per row (default: 3)")
    ml.add_argument("--models", default=None,
                    help=f"comma-separated rows of seminar_tf.report.ROWS (default: {MOVIELENS_MODELS}); the "
                         "popularity reference is always reported; longseq: finetune --model architectures "
                         f"(default: {LONGSEQ_MODELS}); lifelong: the rows beside SEMINAR at the longest length "
                         f"(default: {LIFELONG_MODELS})")
    ml.add_argument("--epochs", type=int, default=None,
                    help="fine-tuning epochs (default: the config's; longseq: 3, the last one is timed)")
    ml.add_argument("--pretrain-epochs", type=int, default=None, help="PSU pretraining epochs (default: the config's)")
    ml.add_argument("--num-negatives", type=int, default=99,
                    help="sampled negatives per positive of HIT/NDCG@10 (default: 99)")
    ml.add_argument("--label-threshold", type=float, default=4.0, help="label = rating >= this (default: 4.0)")
    ml.add_argument("--resume", action="store_true",
                    help="reuse the built dataset (WORK/dataset) and finished cells")
    ml.add_argument("--note", default="", help="a paragraph the report prints under its header (e.g. which commit "
                    "trained the cells --resume reuses)")
    ls = p.add_argument_group("longseq and lifelong (also --models, --epochs, --work-dir)")
    ls.add_argument("--users", type=int, default=120, help="users of the world (default: %(default)s)")
    ls.add_argument("--items", type=int, default=20_000, help="items of the world (default: %(default)s)")
    ls.add_argument("--mean-history", type=int, default=10_000,
                    help="mean history events per user; each lies in [0.8, 1.2] x this (default: %(default)s)")
    ls.add_argument("--impressions-per-user", type=int, default=None,
                    help="labelled impressions per user (default: 40; lifelong: 400)")
    ls.add_argument("--lengths", default=None,
                    help="comma-separated max_history values (longseq: one build and training cells each, default "
                         "1000,10000; lifelong: SEMINAR's rows, default 100,1000,10000)")
    ls.add_argument("--variants", default=None,
                    help="comma-separated SECTION.FIELD=VALUE settings, each one more SEMINAR training cell at the "
                         "longest L beside the preset's ('' for none; default: "
                         f"{LONGSEQ_VARIANTS})")
    ls.add_argument("--batch-size", type=int, default=64,
                    help="batch of the timed training cells, 2 steps per epoch (default: %(default)s)")
    ls.add_argument("--peak-batch-size", type=int, default=256,
                    help="batch of the one-step peak-memory run per model at the longest L (default: %(default)s)")
    ls.add_argument("--child-timeout", type=float, default=4 * 3600.0,
                    help="seconds before a child command is killed and its row marked failed (default: %(default)s)")
    p.set_defaults(handler=_run_bench, takes_extra=False)


def _add_render(sub) -> None:
    p = sub.add_parser(
        "render",
        help="re-render a benchmark report's Markdown from its JSON",
        description="Every benchmark report is a JSON stamped with the commit, the command and the machine; its "
        "Markdown is rendered from that JSON alone. This writes the Markdown of REPORT_JSON (benchmarks/pq.json -> "
        "pq.md, serving.json -> serving.md, pipeline.json -> pipeline.md, movielens.json and a report's "
        "report.json -> REPORT.md beside it).")
    p.add_argument("reports", nargs="+", metavar="REPORT_JSON", help="report JSON files written by bench / report")
    p.set_defaults(handler=_run_render, takes_extra=False)


def _run_render(args, extra) -> int:
    from seminar_tf.bench import stamp

    for path in args.reports:
        try:
            print(stamp.render_file(path))
        except (OSError, ValueError, KeyError) as error:
            raise CliError(f"{path}: {error}") from None
    return 0


def _lengths(text: str) -> tuple:
    return tuple(int(float(s)) for s in text.split(",") if s.strip())


def _run_lifelong(args) -> None:
    from seminar_tf.bench import lifelong as lifelong_bench

    try:
        config = lifelong_bench.LifelongBenchConfig(
            out_dir=args.out, work_dir=args.work_dir or "runs/bench/lifelong", users=args.users, items=args.items,
            mean_history=args.mean_history, impressions_per_user=args.impressions_per_user or 400,
            lengths=_lengths(args.lengths or "100,1000,10000"), long_rows=_names(args.models or LIFELONG_MODELS),
            config=args.config or "demo", overrides=tuple(args.set), seeds=args.seeds, epochs=args.epochs,
            pretrain_epochs=args.pretrain_epochs, resume=args.resume, timeout_s=args.child_timeout, note=args.note)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _run_checked_bench(lifelong_bench.run, config, os.path.join(args.out, "lifelong", "lifelong.md"))


def _run_checked_bench(run, config, markdown_path: str) -> None:
    """Runs a bench whose report carries ``checks`` (movielens, lifelong) with the command line as typed; prints
    the Markdown's path and one "status: target" line per check."""
    import shlex

    if os.path.basename(sys.argv[0]).startswith("seminar-tf"):
        config.command = "seminar-tf " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = run(config, progress=_progress)
    except ValueError as error:
        raise CliError(str(error)) from None
    print(markdown_path)
    for check in report["checks"]:
        print(f"{check['status']}: {check['target']}")


def _run_bench(args, extra) -> int:
    which = ["pipeline", "pq", "serving"] if args.which == "all" else [args.which]
    work_dir = args.work_dir or "runs/bench"
    for name in which:
        _progress(f"bench {name}")
        if name == "movielens":
            from seminar_tf.bench import movielens as movielens_bench

            config = movielens_bench.MovieLensBenchConfig(
                input_dir=args.input, out_dir=args.out, work_dir=args.work_dir or "runs/bench/movielens",
                cache_dir=args.cache_dir, config=args.config or "movielens", overrides=tuple(args.set),
                seeds=args.seeds, models=_names(args.models or MOVIELENS_MODELS), epochs=args.epochs,
                pretrain_epochs=args.pretrain_epochs, num_negatives=args.num_negatives,
                label_threshold=args.label_threshold, resume=args.resume, note=args.note)
            _run_checked_bench(movielens_bench.run, config, os.path.join(args.out, "movielens", "REPORT.md"))
            continue
        if name == "lifelong":
            _run_lifelong(args)
            continue
        if name == "longseq":
            from seminar_tf.bench import longseq as longseq_bench

            try:
                config = longseq_bench.LongSeqBenchConfig(
                    users=args.users, items=args.items, mean_history=args.mean_history,
                    impressions_per_user=args.impressions_per_user or 40,
                    lengths=_lengths(args.lengths or "1000,10000"),
                    models=_names(args.models or LONGSEQ_MODELS), batch_size=args.batch_size,
                    epochs=3 if args.epochs is None else args.epochs, peak_batch_size=args.peak_batch_size,
                    timeout_s=args.child_timeout,
                    seminar_variants=_names(LONGSEQ_VARIANTS if args.variants is None else args.variants))
            except ValueError as error:
                raise UsageError(str(error)) from None
            report = longseq_bench.run(config, out_dir=args.out, work_dir=args.work_dir or "runs/bench/longseq",
                                       progress=_progress)
        elif name == "pipeline":
            from seminar_tf.bench import pipeline as pipeline_bench

            sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
            report = pipeline_bench.run(sizes, out_dir=args.out, work_dir=os.path.join(work_dir, "pipeline"),
                                        progress=_progress)
        elif name == "pq":
            from seminar_tf.bench import pq as pq_bench

            report = pq_bench.run(args.out, os.path.join(work_dir, "pq", args.preset),
                                  config=pq_bench.PQBenchConfig(preset=args.preset), progress=_progress)
        else:
            from seminar_tf.bench import serving as serving_bench

            report = serving_bench.run(args.out, os.path.join(work_dir, "serving"), progress=_progress)
        print(report)
    return 0


# ---------------------------------------------------------------------------------------------- main
def _add_fit_codebooks(sub) -> None:
    from seminar_tf import pq_runs

    pq_runs.add_cli(sub)


def _add_export(sub) -> None:
    from seminar_tf import cli_args

    cli_args.add_export_parser(sub).set_defaults(handler=_handler("seminar_tf.export", "_run_export"),
                                                  takes_extra=False)


def _handler(module: str, name: str) -> Callable:
    """A handler that imports ``module`` (TensorFlow or Beam) only when its command runs."""

    def run(args, extra):
        return getattr(importlib.import_module(module), name)(args, extra)

    run.__qualname__ = f"{module}.{name}"
    return run


def _add_serving(sub) -> None:
    from serving import cli as serving_cli

    serving_cli.add_cli(sub)


def _add_report(sub) -> None:
    from seminar_tf import report

    report.add_cli(sub)


def _add_probe(sub) -> None:
    from seminar_tf import probe

    probe.add_cli(sub)


_COMMANDS: List[Callable] = [_add_world, _add_build, _add_pretrain, _add_finetune, _add_evaluate, _add_fit_codebooks,
                             _add_export, _add_serving, _add_demo, _add_bench, _add_render, _add_report,
                             _add_probe]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seminar-tf",
        description="SEMINAR / EM3 lifelong multi-modal sequence recommendation: synthetic world, Beam "
        "pipeline, training, export and serving.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of seminar-tf, TensorFlow, tf-keras, Apache Beam and TFRS and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="log at DEBUG level (default: warnings and errors) and keep TensorFlow's load-time lines")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


# Distributions --version reports, read from their metadata (nothing is imported); the first one installed counts.
_VERSION_PACKAGES = (("tensorflow", ("tensorflow", "tensorflow-cpu", "tf-nightly")), ("tf-keras", ("tf-keras",)),
                     ("apache-beam", ("apache-beam",)), ("tensorflow-recommenders", ("tensorflow-recommenders",)))


def versions_text() -> str:
    """``--version``: one ``name version`` line per package, read with ``importlib.metadata``."""
    from importlib import metadata

    lines = [f"seminar-tf {seminar_tf.__version__}"]
    for name, distributions in _VERSION_PACKAGES:
        version = "not installed"
        for distribution in distributions:
            try:
                version = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
        lines.append(f"{name} {version}")
    lines.append(f"python {sys.version.split()[0]}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``: prints ``versions_text()`` and exits 0."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions_text())
        parser.exit()


# Import-time noise a user cannot act on, hidden unless --verbose (messages logged on the root logger).
_QUIET_ROOT_MESSAGES = ("apitools not found",)  # Beam's GCP IO on a machine without the GCP extras


def quiet_third_party_logs() -> None:
    """Hides TensorFlow's C++ log lines (oneDNN, CPU features, CUDA stub, the cuInit error of a machine without a GPU
    driver, oneDNN's int64 fallback notices at the first training step) and Beam's apitools warning; a failure still
    raises its Python exception. Must run before TensorFlow is imported (it imports nothing itself); ``--verbose``
    skips it, and an explicit TF_CPP_MIN_LOG_LEVEL in the environment wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    if _keep_actionable not in logging.getLogger().filters:
        logging.getLogger().addFilter(_keep_actionable)


class _QuietTensorFlowImport:
    """A ``sys.meta_path`` finder for the first ``import tensorflow``: it runs with file descriptor 2 on /dev/null
    (TensorFlow's C++ libraries log while they load, before absl's InitializeLog, ignoring TF_CPP_MIN_LOG_LEVEL), and
    so does the device platforms' initialisation (``list_physical_devices``: cuInit logs an E-level line when no GPU
    driver answers). A failed import still raises."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with _stderr_to_devnull():
                exec_module(module)
                module.config.list_physical_devices()

        spec.loader.exec_module = quiet_exec_module
        return spec


class _stderr_to_devnull:
    """File descriptor 2 on /dev/null inside the ``with`` block (C++ writes too, not only ``sys.stderr``)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


def _keep_actionable(record: logging.LogRecord) -> bool:
    """Root-logger filter of ``quiet_third_party_logs``: drops the ``_QUIET_ROOT_MESSAGES``."""
    return not str(record.msg).startswith(_QUIET_ROOT_MESSAGES)


# Errors a command reports as one line, without a traceback (``--debug`` shows it); anything else is a bug.
_EXPECTED_ERRORS = (CliError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def _error_message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.takes_extra:
        parser.error(f"unrecognized arguments for '{args.command}': {' '.join(extra)}")
    if not args.verbose:
        quiet_third_party_logs()  # before the handler imports TensorFlow or Beam
    # Warnings and errors only unless --verbose: the commands report progress with their own lines.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prefix = f"seminar-tf {args.command}"
    try:
        return int(args.handler(args, extra) or 0)
    except SystemExit as stop:  # a handler's own ``SystemExit(message)``: a runtime failure it explained
        if args.debug or stop.code is None or isinstance(stop.code, int):
            raise
        message = str(stop.code)
        print(message if message.startswith("seminar-tf ") else f"{prefix}: {message}", file=sys.stderr)
        return 1
    except _EXPECTED_ERRORS as error:
        if args.debug:
            raise
        print(f"{prefix}: {_error_message(error)}", file=sys.stderr)
        if not isinstance(error, (CliError, OSError)):
            print("(rerun with --debug for the traceback)", file=sys.stderr)
        return getattr(error, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
