"""PQ on runs: ``seminar-tf fit-codebooks`` (codebooks + codes from a run's final content embeddings).

The codebook math and file format are ``seminar_tf.quantization`` (docs/design.md §5), which knows no runs; this
module reads runs through ``seminar_tf.experiment``, imported by ``fit_run`` so that registering the command
(``add_cli``) loads no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Dict, Optional

from seminar_tf.quantization import (CODEBOOKS_FILE, SUMMARY_FILE, CodebookConfig, _rounded, quantize_vocabulary,
                                     save_codebooks)


def fit_run(model_dir: str, config: CodebookConfig, data_dir: Optional[str] = None, out: Optional[str] = None,
            progress: Optional[Callable[[str], None]] = None) -> Dict:
    """``seminar-tf fit-codebooks``: codebooks + codes from a run's final content embeddings.

    ``model_dir``: a fine-tuning run (its best weights) or a pretraining run (its PSU content checkpoint).
    Writes ``out`` (default ``MODEL_DIR/codebooks.npz``) and ``codebooks.json`` beside it; returns the summary.
    """
    import tensorflow as tf

    from seminar_tf import experiment

    content, preset, data_dir, stage = experiment.load_content(model_dir, data_dir)
    codebooks = quantize_vocabulary(content, config, progress)
    codebooks.source = model_dir
    path = out or os.path.join(experiment.run_model_dir(model_dir), CODEBOOKS_FILE)
    save_codebooks(codebooks, path)
    summary = {
        "codebooks": path, "source": model_dir, "stage": stage, "data": data_dir, "kind": config.kind,
        "channels": codebooks.channels, "num_subspaces": codebooks.num_subspaces,
        "num_centroids": codebooks.num_centroids, "bits": 4 if codebooks.num_centroids <= 16 else 8,
        "dim": codebooks.dim, "num_items": content.num_items, "num_queries": content.num_queries,
        "bytes_per_history_position": int(len(codebooks.channels) * codebooks.num_subspaces
                                          * (4 if codebooks.num_centroids <= 16 else 8) // 8),
        "reconstruction_error": _rounded(codebooks.reconstruction_error),
        "config": dataclasses.asdict(config),
    }
    with tf.io.gfile.GFile(os.path.join(os.path.dirname(path) or ".", SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    if progress:
        progress(f"fit-codebooks: wrote {path}")
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """Registers ``seminar-tf fit-codebooks`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "fit-codebooks",
        help="fit PQ codebooks (k-means per channel and sub-space) on a run's final embeddings; code the vocabulary",
        description="Embeds every item and query of the vocabulary with the run's content encoder (a finetune "
        "run's best weights, or a pretrain run's PSU content checkpoint), fits faiss k-means codebooks per "
        "channel and sub-space, codes every item and query (uint8; 4-bit when --centroids <= 16) and writes "
        "MODEL_DIR/codebooks.npz with a JSON summary (relative reconstruction error per channel). Then: "
        "seminar-tf finetune --gsu pq_adc --codebooks MODEL_DIR.")
    p.add_argument("--model-dir", required=True,
                   help="run directory (finetune or pretrain) whose final embeddings to quantize")
    p.add_argument("--data", default=None, help="dataset directory (default: the run's own copy of its dataset's "
                   "metadata; the tables are in the weights, so no dataset is needed)")
    p.add_argument("--out", default=None, help="output .npz path (default: MODEL_DIR/codebooks.npz)")
    p.add_argument("--subspaces", type=int, default=8, help="S (N_bit): sub-vectors per channel (default: 8)")
    p.add_argument("--centroids", type=int, default=256,
                   help="C centroids per channel and sub-space, at most 256; <= 16 gives 4-bit codes (default: 256)")
    p.add_argument("--iterations", type=int, default=25, help="k-means iterations (default: 25)")
    p.add_argument("--seed", type=int, default=0, help="k-means / random codebook seed (default: 0)")
    p.add_argument("--random", action="store_true",
                   help="random frozen codebooks (as in the authors' public code) instead of k-means, a baseline")
    p.set_defaults(handler=_run_fit_codebooks, takes_extra=False)


def _run_fit_codebooks(args, extra) -> int:
    import sys

    config = CodebookConfig(num_subspaces=args.subspaces, num_centroids=args.centroids, iterations=args.iterations,
                            seed=args.seed, kind="random" if args.random else "trained")
    summary = fit_run(args.model_dir, config, data_dir=args.data, out=args.out,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
