"""Probes of a run's item content embeddings, with no fine-tuning: what did pretraining put in each channel?

``seminar-tf probe --model-dir RUN (--label-attribute NAME | --truth WORLD_DIR)`` encodes every item of the run's
vocabulary with the run's content encoder (a PSU run's restored content, or a fine-tuned run's) and reports:

* per pair of item channels (text, image, attributes), the **cross-modal recall@1**: how often an item's own
  channel-b embedding is the nearest, by cosine, to its channel-a embedding among ``candidates`` other items'.
  This is what L_align (docs/design.md §4, the chunked CLIP loss) trains;
* per pair, the **label separation**: the mean cross-channel cosine of two items with the same label minus that of
  two items with different labels (does the cross-channel score carry the label?);
* per channel and for the fused item (the sum of the L2-normalised channels), the **neighbour purity**: the share
  of each item's ``k`` nearest neighbours (cosine, itself excluded) that carry its label.

Labels are an item attribute of the dataset (``--label-attribute category_id``, the genre on MovieLens) or, on the
synthetic world, the planted topic of each item (``--truth``: the world's directory with ``world_truth.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from seminar_tf import schema

DEFAULT_NEIGHBOURS = 10
DEFAULT_CANDIDATES = 127
DEFAULT_MAX_ITEMS = 5000  # the probes hold [N, N] score matrices


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cross_modal_recall(a: np.ndarray, b: np.ndarray, candidates: int = DEFAULT_CANDIDATES, seed: int = 0) -> float:
    """Share of items i whose cos(a_i, b_i) beats cos(a_i, b_j) for ``candidates`` random other items j (R@1 among
    candidates + 1; chance = 1 / (candidates + 1)). ``a``, ``b``: [N, d], row i = item i in two channels."""
    a, b = _normalise(np.asarray(a, np.float64)), _normalise(np.asarray(b, np.float64))
    n = len(a)
    if n < 2:
        raise ValueError(f"cross_modal_recall needs at least 2 items, got {n}")
    candidates = min(candidates, n - 1)
    rng = np.random.default_rng(seed)
    # j = (i + offset) mod n with offsets drawn from 1..n-1 without replacement: never item i itself
    offsets = np.stack([rng.choice(np.arange(1, n), candidates, replace=False) for _ in range(n)])
    others = (np.arange(n)[:, None] + offsets) % n
    own = np.sum(a * b, axis=-1)
    rival = np.einsum("nd,nkd->nk", a, b[others])
    return float(np.mean(own > rival.max(axis=1)))


def label_separation(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    """Mean cos(a_i, b_j) over pairs i != j with the same label minus the mean over pairs with different labels."""
    a, b = _normalise(np.asarray(a, np.float64)), _normalise(np.asarray(b, np.float64))
    scores = a @ b.T
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None, :]
    if not same.any() or not different.any():
        raise ValueError("label_separation needs two items with the same label and two with different labels")
    return float(scores[same].mean() - scores[different].mean())


def neighbour_purity(embeddings: np.ndarray, labels: np.ndarray, k: int = DEFAULT_NEIGHBOURS) -> float:
    """Share of each item's k nearest neighbours (cosine, itself excluded) that have its label, averaged."""
    e = _normalise(np.asarray(embeddings, np.float64))
    labels = np.asarray(labels)
    k = min(k, len(e) - 1)
    if k < 1:
        raise ValueError(f"neighbour_purity needs at least 2 items, got {len(e)}")
    scores = e @ e.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(labels[nearest] == labels[:, None]))


def probe_channels(channels: Dict[str, np.ndarray], labels: np.ndarray, k: int = DEFAULT_NEIGHBOURS,
                   candidates: int = DEFAULT_CANDIDATES, seed: int = 0) -> dict:
    """The three probes on item channels {name: [N, d]} (rows = the same N items) with labels [N]."""
    names = sorted(channels)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs[f"{a}-{b}"] = {
                "recall_at_1": cross_modal_recall(channels[a], channels[b], candidates, seed),
                "label_separation": label_separation(channels[a], channels[b], labels)}
    fused = sum(_normalise(np.asarray(channels[name], np.float64)) for name in names)
    purity = {name: neighbour_purity(channels[name], labels, k) for name in names}
    purity["fused"] = neighbour_purity(fused, labels, k)
    values, counts = np.unique(labels, return_counts=True)
    return {"items": int(len(labels)), "labels": int(len(values)), "neighbours": int(min(k, len(labels) - 1)),
            "candidates": int(min(candidates, len(labels) - 1)), "channels": names, "pairs": pairs,
            "purity": purity, "purity_by_chance": float(np.sum((counts / counts.sum()) ** 2))}


def truth_topics(world_dir: str, item_vocabulary: Sequence[str]) -> np.ndarray:
    """The synthetic world's planted topic of each vocabulary entry (-1 where the world has no such item)."""
    from seminar_tf.data import world

    truth = world.load_truth(world_dir)["items"]
    topic = dict(zip(truth["item_id"], truth["topic"]))
    return np.array([int(topic.get(name, -1)) for name in item_vocabulary])


def probe_run(model_dir: str, data_dir: Optional[str] = None, label_attribute: Optional[str] = None,
              truth_dir: Optional[str] = None, k: int = DEFAULT_NEIGHBOURS, candidates: int = DEFAULT_CANDIDATES,
              max_items: int = DEFAULT_MAX_ITEMS, seed: int = 0) -> dict:
    """Encodes the items of a run (its vocabulary, PAD/OOV and unlabelled items left out; a random ``max_items`` of
    them when there are more) and probes their channels (module docstring)."""
    import tensorflow as tf

    from seminar_tf import experiment
    from seminar_tf.data import reader
    from seminar_tf.models import seminar_builders

    if (label_attribute is None) == (truth_dir is None):
        raise ValueError("probe: give exactly one of --label-attribute NAME (an item attribute of the dataset) and "
                         "--truth WORLD_DIR (the synthetic world's directory with world_truth.json)")
    content, _, _, stage = experiment.load_content(model_dir, data_dir)
    contract = experiment.contract_dir(model_dir, data_dir)
    first = len(schema.RESERVED)
    items = np.arange(first, content.num_items)
    if truth_dir is not None:
        labels = truth_topics(truth_dir, reader.load_vocabulary(contract, schema.ITEM_VOCAB))[first:]
        source = "planted topic (world_truth.json)"
    else:
        column = seminar_builders.attribute_column(reader.load_metadata(contract), label_attribute)
        labels = content.attributes.numpy()[first:, column]
        source = f"item attribute {label_attribute!r}"
    keep = labels >= 0 if truth_dir is not None else labels >= first  # known topic / a real attribute value
    items, labels = items[keep], labels[keep]
    if len(items) > max_items:
        chosen = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
        items, labels = items[chosen], labels[chosen]
    if len(items) < 2:
        raise ValueError(f"probe: fewer than 2 items of {model_dir!r} have a label ({source})")
    channels = {name: [] for name in content.item_channels}
    for start in range(0, len(items), 4096):
        encoded = content.encode_items(tf.constant(items[start:start + 4096], tf.int64))
        for name in channels:
            channels[name].append(encoded[name].numpy())
    result = probe_channels({name: np.concatenate(parts) for name, parts in channels.items()}, labels, k,
                            candidates, seed)
    result.update(model_dir=model_dir, stage=stage, label=source)
    return result


def markdown(result: dict) -> str:
    """The probe as two Markdown tables (channel pairs; neighbour purity)."""
    lines = [f"Content probe of `{result['model_dir']}` ({result['stage']} run), {result['items']} items, labels: "
             f"{result['label']} ({result['labels']} values).", "",
             f"| channel pair | cross-modal recall@1 (1 of {result['candidates'] + 1}) | label separation |",
             "|---|---|---|"]
    lines += [f"| {pair} | {v['recall_at_1']:.3f} | {v['label_separation']:.3f} |"
              for pair, v in result["pairs"].items()]
    lines += ["", f"| channel | neighbour purity@{result['neighbours']} |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in result["purity"].items()]
    lines += [f"| (chance) | {result['purity_by_chance']:.3f} |"]
    return "\n".join(lines) + "\n"


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", help="probe a run's item content embeddings: cross-modal recall, label separation, neighbour purity",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a pretrain (PSU) or finetune run directory")
    p.add_argument("--data", default=None, help="dataset directory (default: the run's own copy of its contract)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--label-attribute", default=None,
                        help="an item attribute of the dataset as the label (e.g. category_id, genre)")
    labels.add_argument("--truth", default=None, help="the synthetic world's directory (world_truth.json): its "
                        "planted item topics as the label")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS, help="k of the neighbour purity")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                   help="other items each item's own channel competes with in the cross-modal recall")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS,
                   help="probe a random sample of this many items when the run has more ([N, N] scores in memory)")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    p.set_defaults(handler=_run_cli, takes_extra=False)


def _run_cli(args, extra) -> int:
    try:
        result = probe_run(args.model_dir, args.data, args.label_attribute, args.truth, args.neighbours,
                           args.candidates, args.max_items)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(markdown(result), end="")
    return 0
