"""``seminar-tf``: the one command-line entry point.

Subcommands import their modules lazily, so ``seminar-tf --help`` and the Beam job do not pay for
TensorFlow model code they do not use. Nothing is parsed at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, List, Optional

import seminar_tf  # noqa: F401  (selects tf-keras before anything imports TensorFlow)
from seminar_tf import config as config_lib  # a leaf: no TensorFlow or Beam

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
    from seminar_tf.data.world import WorldConfig

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
        config = config_lib.override_section(config_lib.dataclass_from_args(WorldConfig, args), "world", args.set)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    summary = generate_world(config, args.out, progress=_progress)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- build
def _add_build(sub) -> None:
    from beam_pipelines import build_dataset

    p = sub.add_parser(
        "build",
        help="run the Beam pipeline: raw files -> vocabularies, item table, TFRecords, stats, dead letters",
        description="Apache Beam job (same as `python -m beam_pipelines.build_dataset`). Unknown flags are "
        "passed to Beam's PipelineOptions, e.g. --runner=DataflowRunner --project=... --region=...; "
        "the local default runner is FnApiRunner.",
    )
    build_dataset.add_arguments(p)
    p.set_defaults(handler=_run_build, takes_extra=True)


def _run_build(args, extra) -> int:
    from beam_pipelines import build_dataset

    try:
        config = build_dataset.config_from_args(args)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    stats = build_dataset.build_dataset(args.input, args.output, config, pipeline_args=extra)
    _print_build_summary(stats)
    return 0


def _print_build_summary(stats: dict) -> None:
    print(json.dumps({k: stats[k] for k in sorted(stats) if k != "config"}, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------- training
def load_preset(args):
    """``--config`` with its ``--set`` overrides; a bad override exits naming the field."""
    try:
        return config_lib.load_config(args.config, getattr(args, "set", ()))
    except ValueError as error:
        raise SystemExit(str(error)) from None


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
        raise SystemExit(f"--no-query-channel leaves no channel (model.channels {list(model_config.channels)}, "
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
        raise SystemExit(f"--freeze: unknown parts {sorted(unknown)}; choose from content, projections")
    changes = dict(freeze_content="content" in frozen or preset.model.freeze_content,
                   freeze_projections="projections" in frozen or preset.model.freeze_projections)
    if args.gsu:
        changes["gsu"] = args.gsu
    if args.pq_rerank:
        changes["pq_rerank"] = args.pq_rerank
    if args.codebooks and (args.gsu or preset.model.gsu) == "exact":
        raise SystemExit("--codebooks is for --gsu pq_adc|pq_sdc; add one of those or drop --codebooks")
    if args.no_history:
        changes["use_history"] = False
    if args.model:
        changes["architecture"] = args.model
    if args.no_pretrain and args.init_from:
        raise SystemExit("--no-pretrain and --init-from contradict each other; drop one")
    if args.no_query_channel:
        changes["channels"] = _channels_without_query(args.data, preset.model)
    changes.update(config_lib.given_fields(args, [*FINETUNE_MODEL_FLAGS, *EM3_FLAGS]))
    preset.model = dataclasses.replace(preset.model, **changes)
    try:
        preset.model.validate()
    except ValueError as error:
        raise SystemExit(f"finetune: {error}") from None
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
    from seminar_tf.evaluate import format_markdown_table

    columns = ["auc", "gauc", "logloss", "hit@1", "hit@5", "hit@10", "hit@50", "ndcg@5", "ndcg@10", "ndcg@50", "mrr"]
    rows = []
    for name in ("model", "popularity"):
        row = {"model": name}
        row.update({c: (round(metrics[name][c], 4) if isinstance(metrics[name].get(c), float) else metrics[name].get(c))
                    for c in columns})
        rows.append(row)
    print(format_markdown_table(rows, ["model"] + columns))


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
        raise SystemExit(str(error)) from None
    raw_dir = os.path.join(args.work_dir, "raw")
    data_dir = os.path.join(args.work_dir, "dataset")
    started = time.time()
    _progress(f"[1/6] synthetic world -> {raw_dir}")
    world = generate_world(preset.world, raw_dir, progress=_progress)
    _progress(f"      {json.dumps({k: v for k, v in world.items() if isinstance(v, (int, float))})}")
    _progress(f"[2/6] Beam pipeline (FnApiRunner) -> {data_dir}")
    stats = build_dataset(raw_dir, data_dir, preset.build, pipeline_args=["--runner=FnApiRunner"])
    _print_build_summary(stats)
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
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks that write rerunnable reports under benchmarks/",
        description="Runs a benchmark and writes a Markdown + JSON report. 'pipeline': Beam pipeline "
        "throughput (raw events/s) at several sizes on FnApiRunner. 'pq': product-quantization recall and "
        "speed (exact vs ADC vs SDC vs faiss). 'serving': load test of the rank signature through the local "
        "gRPC server. 'movielens': SEMINAR and the baselines on MovieLens (RecBole's ml-100k or --input), "
        "OUT/movielens/REPORT.md + movielens.json; not part of 'all'. 'all': pipeline, pq and serving.",
    )
    p.add_argument("which", choices=["pipeline", "pq", "serving", "movielens", "all"], help="which benchmark to run")
    p.add_argument("--out", default="benchmarks", help="directory for the reports (default: benchmarks)")
    p.add_argument("--sizes", default="100000,1000000",
                   help="pipeline: comma-separated target raw event counts (default: 100000,1000000)")
    p.add_argument("--work-dir", default=None,
                   help="scratch directory for generated data and runs (default: runs/bench; movielens: "
                        "runs/bench/movielens)")
    p.add_argument("--preset", default="test",
                   help="pq: synthetic world + training preset of the trained-embedding parts: test (minutes) | "
                        "demo (the committed report; about an hour on 2 cores) (default: test)")
    ml = p.add_argument_group("movielens")
    ml.add_argument("--input", default=None,
                    help="MovieLens directory the adapter reads (default: RecBole 1.2.1's ml-100k, from the wheel "
                         "that pip downloads into --cache-dir)")
    ml.add_argument("--cache-dir", default="~/.cache/seminar-tf/recbole",
                    help="where the RecBole wheel and the extracted ml-100k files go (default: %(default)s)")
    ml.add_argument("--config", default="movielens",
                    help="preset or YAML/JSON config of the build section and the rows (default: movielens)")
    config_lib.add_set_argument(ml)
    ml.add_argument("--seeds", type=int, default=3, help="seeds per row (default: 3)")
    ml.add_argument("--models", default="seminar,din,sim_hard,sim_soft,eta,twin,no_history",
                    help="comma-separated rows of seminar_tf.report.ROWS (default: %(default)s); the popularity "
                         "reference is always reported")
    ml.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the config's)")
    ml.add_argument("--pretrain-epochs", type=int, default=None, help="PSU pretraining epochs (default: the config's)")
    ml.add_argument("--num-negatives", type=int, default=99,
                    help="sampled negatives per positive of HIT/NDCG@10 (default: 99)")
    ml.add_argument("--label-threshold", type=float, default=4.0, help="label = rating >= this (default: 4.0)")
    ml.add_argument("--resume", action="store_true",
                    help="reuse the built dataset (WORK/dataset/metadata.json) and finished cells")
    ml.add_argument("--note", default="", help="a paragraph the report prints under its header (e.g. which commit "
                    "trained the cells --resume reuses)")
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
            raise SystemExit(f"render {path}: {error}") from None
    return 0


def _run_bench(args, extra) -> int:
    which = ["pipeline", "pq", "serving"] if args.which == "all" else [args.which]
    work_dir = args.work_dir or "runs/bench"
    for name in which:
        _progress(f"bench {name}")
        if name == "movielens":
            import shlex

            from seminar_tf.bench import movielens as movielens_bench

            config = movielens_bench.MovieLensBenchConfig(
                input_dir=args.input, out_dir=args.out, work_dir=args.work_dir or "runs/bench/movielens",
                cache_dir=args.cache_dir, config=args.config, overrides=tuple(args.set), seeds=args.seeds,
                models=tuple(m.strip() for m in args.models.split(",") if m.strip()), epochs=args.epochs,
                pretrain_epochs=args.pretrain_epochs, num_negatives=args.num_negatives,
                label_threshold=args.label_threshold, resume=args.resume, note=args.note)
            if os.path.basename(sys.argv[0]).startswith("seminar-tf"):
                config.command = "seminar-tf " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            try:
                result = movielens_bench.run(config, progress=_progress)
            except ValueError as error:
                raise SystemExit(f"bench movielens: {error}") from None
            print(os.path.join(args.out, "movielens", "REPORT.md"))
            for check in result["checks"]:
                print(f"{check['status']}: {check['target']}")
            continue
        if name == "pipeline":
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
    from seminar_tf import export

    export.add_cli(sub)


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
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


# Import-time noise a user cannot act on, hidden unless --verbose (messages logged on the root logger).
_QUIET_ROOT_MESSAGES = ("apitools not found",)  # Beam's GCP IO on a machine without the GCP extras


def quiet_third_party_logs() -> None:
    """Hides TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features, CUDA stub) and Beam's apitools warning.
    Must run before TensorFlow is imported; errors still print. ``--verbose`` skips it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        # TensorFlow's C++ libraries log while they load, before absl's InitializeLog, ignoring
        # TF_CPP_MIN_LOG_LEVEL: import it with file descriptor 2 on /dev/null (a failed import still raises).
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            sys.stderr.flush()
            os.dup2(devnull, 2)
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    if _keep_actionable not in logging.getLogger().filters:
        logging.getLogger().addFilter(_keep_actionable)


def _keep_actionable(record: logging.LogRecord) -> bool:
    """Root-logger filter of ``quiet_third_party_logs``: drops the ``_QUIET_ROOT_MESSAGES``."""
    return not str(record.msg).startswith(_QUIET_ROOT_MESSAGES)


def main(argv: Optional[List[str]] = None) -> int:
    if "--verbose" not in (sys.argv[1:] if argv is None else argv):
        quiet_third_party_logs()  # before build_parser: its defaults import Beam and TensorFlow
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and not args.takes_extra:
        parser.error(f"unrecognized arguments for '{args.command}': {' '.join(extra)}")
    return int(args.handler(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
