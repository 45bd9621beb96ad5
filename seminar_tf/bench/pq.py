"""`seminar-tf bench pq`: recall, speed and model quality of the product-quantized GSU (issue 4, docs/design.md §5).

Three parts, one report (``benchmarks/pq.md`` + ``pq.json``):

1. Model quality on the synthetic world (a preset's world → Beam build → PSU pretraining → exact CTR
   fine-tuning → ``fit-codebooks`` on that run → CTR fine-tuning with ``--gsu pq_adc`` from the same PSU):
   test AUC of the exact run with its exact GSU and, on the same weights, with pq_adc / pq_sdc (a paired
   comparison: only the GSU differs), plus the AUC of the run fine-tuned with pq_adc.
2. Top-K recall of PQ vs the exact GSU on the trained embeddings of that exact run: for real CTR test targets,
   histories of L (query, item) pairs (items uniform over the vocabulary, queries from the empirical history
   queries, browsing included); recall@K = share of the PQ top K whose exact score reaches the exact K-th score
   (ties count as hits). Trained vs random codebooks (the authors' public code uses random frozen ones), 8-bit
   (C=256) vs 4-bit (C=16), ADC vs SDC.
3. Speed, as ratios measured in one run, interleaved (each round times every method once; medians): exact
   GSU (gather the stored embeddings of the history from a catalog table + matmul) vs ADC (gather packed
   codes + per-target table lookups, or decode + matmul) vs SDC (the paper's formula) per request, for
   L ∈ lengths and N ∈ candidates; faiss ``IndexPQ`` ADC search over the same codes as a reference in ns per
   code; memory per history position.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from seminar_tf import schema
from seminar_tf.bench import stamp
from seminar_tf.bench.pq_report import markdown  # noqa: F401  (re-exported: stamp.RENDERERS)

COMMAND = "seminar-tf bench pq"


@dataclasses.dataclass
class PQBenchConfig:
    """Sizes of the PQ benchmark (defaults: a few minutes on 2 cores with the ``test`` preset)."""

    preset: str = "test"  # synthetic world + training preset of the quality part (test | demo)
    subspaces: int = 8  # S per channel of the default codebooks (fit-codebooks, the pq_adc run, the targets)
    centroids: int = 256  # C of the default codebooks
    variants: Tuple[Tuple[int, int], ...] = ((8, 256), (16, 256), (8, 16), (4, 256))  # (S, C); the first = default
    rerank: int = 4  # the PQ GSU re-scores rerank x K candidates exactly (model.pq_rerank) in the extra rows
    recall_lengths: Tuple[int, ...] = (1000, 10000)
    recall_ks: Tuple[int, ...] = (50, 200)
    recall_targets: int = 32
    catalog_items: int = 1_000_000
    catalog_queries: int = 100_000
    speed_dim: int = 32
    speed_lengths: Tuple[int, ...] = (1000, 10000, 100000)
    speed_candidates: Tuple[int, ...] = (1, 100)
    throughput_batch: int = 16  # requests per call in the batched-throughput row (L = 10^4, N = 1)
    repeats: int = 15
    max_lookups: float = 6e7  # methods needing more scalar lookups per call are skipped (and say so)
    seed: int = 0
    reuse: bool = True  # keep trained runs found in work_dir


def _log(progress, message):
    if progress:
        progress(f"bench pq: {message}")


# ---------------------------------------------------------------------------------------------- training
def _train(config: PQBenchConfig, work_dir: str, progress) -> Dict[str, str]:
    """World → dataset → PSU → exact CTR run → codebooks → pq_adc CTR run; steps with outputs are reused."""
    import tensorflow as tf

    from beam_pipelines.build_dataset import build_dataset
    from seminar_tf import config as config_lib
    from seminar_tf import experiment, pq_runs, quantization, train
    from seminar_tf.data.world import generate_world

    paths = {name: os.path.join(work_dir, name) for name in ("raw", "dataset", "psu", "ctr", "ctr_pq_adc")}

    reused = []

    def done(run_dir, marker):
        if config.reuse and tf.io.gfile.exists(os.path.join(run_dir, marker)):
            reused.append(os.path.basename(run_dir))
            return True
        return False

    preset = config_lib.get_preset(config.preset)
    preset.pretrain.verbose = preset.finetune.verbose = 0
    preset.model = dataclasses.replace(preset.model, pq_subspaces=config.subspaces, pq_centroids=config.centroids)
    if not done(paths["dataset"], schema.METADATA_FILE):
        _log(progress, f"synthetic world ({config.preset} preset) and Beam build")
        generate_world(preset.world, paths["raw"])
        build_dataset(paths["raw"], paths["dataset"], preset.build, pipeline_args=["--runner=FnApiRunner"])
    if not done(paths["psu"], experiment.CONTENT_CHECKPOINT + ".index"):
        _log(progress, "PSU pretraining")
        experiment.pretrain(paths["dataset"], paths["psu"], preset)
    best = os.path.join("checkpoints", train.BEST_WEIGHTS + ".index")
    if not done(paths["ctr"], best):
        _log(progress, "CTR fine-tuning, exact GSU")
        experiment.finetune(paths["dataset"], paths["ctr"], preset, init_from=paths["psu"])
    if not done(paths["ctr"], quantization.CODEBOOKS_FILE):
        _log(progress, "fit-codebooks on the exact run")
        pq_runs.fit_run(paths["ctr"], quantization.CodebookConfig(config.subspaces, config.centroids))
    if not done(paths["ctr_pq_adc"], best):
        _log(progress, "CTR fine-tuning, pq_adc GSU (codebooks of the exact run)")
        pq_preset = config_lib.get_preset(config.preset)
        pq_preset.pretrain.verbose = pq_preset.finetune.verbose = 0
        pq_preset.model = dataclasses.replace(pq_preset.model, gsu="pq_adc")
        experiment.finetune(paths["dataset"], paths["ctr_pq_adc"], pq_preset, init_from=paths["psu"],
                            codebooks=paths["ctr"])
    paths["reused"] = sorted(set(reused))
    return paths


# ---------------------------------------------------------------------------------------------- quality
def _quality(paths: Dict[str, str], rerank: int, progress) -> Dict:
    """Test AUC: exact run with exact / pq_adc / pq_sdc GSU (same weights), and the pq_adc-trained run."""
    import tensorflow as tf

    from seminar_tf import evaluate as evaluate_lib
    from seminar_tf import experiment
    from seminar_tf.data import reader

    codebooks = paths["ctr"]
    variants = [("exact run, exact GSU", paths["ctr"], None), ("exact run, pq_adc GSU", paths["ctr"], "pq_adc"),
                (f"exact run, pq_adc GSU + exact re-rank of {rerank}K", paths["ctr"], "pq_adc"),
                ("exact run, pq_sdc GSU", paths["ctr"], "pq_sdc"),
                ("pq_adc-trained run, pq_adc GSU", paths["ctr_pq_adc"], None),
                ("pq_adc-trained run, exact GSU", paths["ctr_pq_adc"], "exact")]
    rows, top_k = [], {}
    for name, run_dir, gsu in variants:
        model, preset, data_dir = experiment.load_model(
            run_dir, gsu=gsu, codebooks=codebooks if gsu in ("pq_adc", "pq_sdc") and run_dir == paths["ctr"] else None)
        if "re-rank" in name:
            model.set_gsu_mode(gsu, pq_rerank=rerank)
        metadata = reader.load_metadata(data_dir)
        data = reader.make_dataset(data_dir, schema.CTR_DIR, "test", 64, metadata=metadata,
                                   max_history=preset.build.max_history)
        predict = tf.function(lambda b, m=model: m(b))
        picked = []

        def score(batch, predict=predict, picked=picked):
            out = predict(batch)
            picked.append((out["top_k"].numpy(), batch[schema.CTX_HISTORY_LENGTH].numpy()))
            return out["probability"].numpy()

        metrics = evaluate_lib.evaluate_ctr(score, data)
        top_k[name] = picked
        rows.append({"variant": name, "gsu": preset.model.gsu, "auc": metrics["auc"], "gauc": metrics["gauc"],
                     "logloss": metrics["logloss"], "num_samples": metrics["num_samples"],
                     "auc_standard_error": _auc_standard_error(
                         metrics["auc"], metrics["num_samples"], metrics["positive_rate"])})
        _log(progress, f"{name}: AUC {metrics['auc']:.4f}")
    exact_sets = top_k["exact run, exact GSU"]
    for row in rows:
        if row["variant"].startswith("exact run") and row["gsu"] != "exact":
            overlaps = []
            for (a, lengths), (b, _) in zip(exact_sets, top_k[row["variant"]]):
                for i in range(len(a)):
                    k = min(len(a[i]), int(lengths[i]))
                    if k:
                        overlaps.append(len(set(a[i, :k]) & set(b[i, :k])) / k)
            row["top_k_overlap_with_exact"] = float(np.mean(overlaps)) if overlaps else None
    base = rows[0]["auc"]
    for row in rows:
        row["auc_minus_exact"] = row["auc"] - base
    return {"preset": preset.name, "rows": rows, "top_k": preset.model.top_k,
            "max_history": preset.build.max_history}


def _auc_standard_error(auc: float, samples: int, positive_rate: float) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from n_pos positives and n_neg negatives."""
    positives, negatives = samples * positive_rate, samples * (1.0 - positive_rate)
    if positives < 1 or negatives < 1:
        return float("nan")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return float(np.sqrt(max(variance, 0.0)))


# ---------------------------------------------------------------------------------------------- recall
def _variant_name(size: int, cents: int, channels: int) -> str:
    bits = 4 if cents <= 16 else 8
    return f"S={size} C={cents} ({channels * size * bits // 8} B)"


def _tie_aware_recall(exact: np.ndarray, approximate: np.ndarray, k: int, rerank: int = 1) -> float:
    """Mean over rows of |{l ∈ kept: exact_l ≥ k-th largest exact}| / k; kept = top-k(approximate), or with
    ``rerank`` r > 1 the k best by exact score among the top r·k by approximate score."""
    k = min(k, exact.shape[1])
    kth = -np.partition(-exact, k - 1, axis=1)[:, k - 1]
    candidates = min(k * rerank, exact.shape[1])
    picked = np.argpartition(-approximate, candidates - 1, axis=1)[:, :candidates]
    if rerank > 1:
        best = np.argsort(-np.take_along_axis(exact, picked, axis=1), axis=1)[:, :k]
        picked = np.take_along_axis(picked, best, axis=1)
    hits = np.take_along_axis(exact, picked, axis=1) >= kth[:, None] - 1e-6 * np.abs(kth[:, None])
    return float(hits.mean())


def _recall(paths: Dict[str, str], config: PQBenchConfig, progress) -> Dict:
    import tensorflow as tf

    from seminar_tf import experiment, quantization
    from seminar_tf.data import reader
    from seminar_tf.layers.pq import PQLookup

    model, preset, data_dir = experiment.load_model(paths["ctr"])
    metadata = reader.load_metadata(data_dir)
    content = model.content
    channels = list(content.channels)
    embeddings = quantization.vocabulary_embeddings(content)
    rng = np.random.default_rng(config.seed)
    history_queries, targets = [], []
    for batch in reader.make_dataset(data_dir, schema.CTR_DIR, "test", 256, metadata=metadata,
                                     max_history=preset.build.max_history):
        steps = np.arange(batch[schema.SEQ_HISTORY_QUERY].shape[1])[None]
        mask = steps < batch[schema.CTX_HISTORY_LENGTH].numpy()[:, None]
        history_queries.append(batch[schema.SEQ_HISTORY_QUERY].numpy()[mask])
        targets.append(np.stack([batch[schema.CTX_TARGET_QUERY].numpy(), batch[schema.CTX_TARGET_ITEM].numpy()], 1))
    history_queries = np.concatenate(history_queries)
    targets = np.concatenate(targets)[: config.recall_targets]
    if not len(history_queries):
        history_queries = np.full([1], schema.EMPTY_QUERY_INDEX)
    t_queries = tf.constant(targets[None, :, 0], tf.int64)
    t_items = tf.constant(targets[None, :, 1], tf.int64)
    stored, q_t, gamma = model._targets(t_queries, t_items)
    v = tf.transpose(model.pq_targets(q_t, gamma), [1, 0, 2, 3])  # [T, 1, J, d]: one history per target
    gamma_t = tf.transpose(gamma, [1, 0, 2])
    stored_t = tf.transpose(stored, [1, 0, 2, 3])
    bilinear = model.gsu_bilinear()
    num_targets = len(targets)

    variants = {}
    for size, cents in config.variants:
        for kind in ("trained", "random"):
            cfg = quantization.CodebookConfig(size, cents, seed=config.seed, kind=kind)
            books = quantization.fit_codebooks(embeddings, channels, cfg)
            items, queries, errors = quantization.encode_vocabulary(embeddings, channels, books)
            layer = PQLookup(channels, content.dim, size, cents, content.num_items, content.num_queries)
            layer.set_codebooks(books)
            layer.set_codes(items, queries)
            variants[f"{kind}, {_variant_name(size, cents, len(channels))}"] = (layer, errors)
    rows = []
    first_item = len(schema.RESERVED)
    for length in config.recall_lengths:
        hq = rng.choice(history_queries, size=[num_targets, length])
        hi = rng.integers(first_item, content.num_items, size=[num_targets, length])
        history = np.stack([embeddings[c][hq] if c == schema.QUERY_CHANNEL else embeddings[c][hi] for c in channels],
                           axis=2)  # [T, L, J, d]
        exact = np.einsum("tljd,tjd->tl", history, v.numpy()[:, 0])
        for name, (layer, errors) in variants.items():
            words = layer.lookup_words(tf.constant(hq), tf.constant(hi))
            adc = layer.adc_scores(v, words, method="decode").numpy()[:, 0]
            sdc = np.concatenate([
                layer.sdc_scores(layer.encode(stored_t[i: i + 4]), gamma_t[i: i + 4], words[i: i + 4], bilinear)
                .numpy()[:, 0] for i in range(0, num_targets, 4)])
            methods = [("ADC", adc, 1), ("SDC", sdc, 1)]
            if name.startswith("trained"):
                methods.insert(1, (f"ADC + exact re-rank of {config.rerank}K", adc, config.rerank))
            for method, approx, rerank in methods:
                row = {"L": length, "codebooks": name, "method": method,
                       "reconstruction_error": float(np.mean(list(errors.values())))}
                for k in config.recall_ks:
                    row[f"recall@{k}"] = _tie_aware_recall(exact, approx, k, rerank)
                rows.append(row)
        last = f"recall@{config.recall_ks[-1]}"
        _log(progress, f"{last} at L={length}: " + ", ".join(
            f"{r['codebooks']} {r['method']} {r[last]:.3f}" for r in rows if r["L"] == length))
    return {"rows": rows, "targets": num_targets, "num_items": content.num_items,
            "num_queries": content.num_queries, "channels": channels, "dim": content.dim,
            "distinct_history_queries": int(len(np.unique(history_queries)))}


# ---------------------------------------------------------------------------------------------- speed
def _timed(functions: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds per call; every round calls each function once (rotating order), after 2 warm-ups."""
    for fn in functions.values():
        for _ in range(2):
            np.asarray(fn())
    names = list(functions)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            np.asarray(functions[name]())
            samples[name].append(time.perf_counter() - start)
    return {n: float(np.median(s)) for n, s in samples.items()}


def _speed(config: PQBenchConfig, progress) -> Dict:
    import tensorflow as tf

    from seminar_tf.layers.pq import PQLookup

    rng = np.random.default_rng(config.seed)
    channels = list(schema.CHANNELS)
    num, dim, size = len(channels), config.speed_dim, config.subspaces
    item_channels = num - 1
    _log(progress, f"speed: catalog of {config.catalog_items:,} items x {item_channels} channels x d={dim} "
                   f"and {config.catalog_queries:,} queries")
    item_table = tf.constant(rng.standard_normal([config.catalog_items, item_channels, dim], np.float32))
    query_table = tf.constant(rng.standard_normal([config.catalog_queries, dim], np.float32))
    layers = {}
    for size_v, cents in config.variants:
        layer = PQLookup(channels, dim, size_v, cents, config.catalog_items, config.catalog_queries)
        layer.set_codebooks(rng.standard_normal([num, size_v, cents, dim // size_v]).astype(np.float32))
        layer.set_codes(rng.integers(0, cents, [config.catalog_items, item_channels, size_v], dtype=np.uint8),
                        rng.integers(0, cents, [config.catalog_queries, size_v], dtype=np.uint8))
        layers[_variant_name(size_v, cents, num)] = layer
    default = _variant_name(size, config.centroids, num)
    pq8 = layers[default]
    pq8x = PQLookup.from_config({**pq8.get_config(), "jit_compile": True})  # the model's pq_jit_compile path
    pq8x.set_weights(pq8.get_weights())

    def exact_fn(jit):
        @tf.function(jit_compile=jit)
        def exact(hq, hi, v):  # gather the stored embeddings of every position, then one matmul
            history = tf.concat([tf.gather(query_table, hq)[:, :, None], tf.gather(item_table, hi)], axis=2)
            return tf.einsum("bljd,bnjd->bnl", history, v)
        return exact

    def adc_fn(layer, method, jit):
        @tf.function(jit_compile=jit)
        def adc(hq, hi, v):
            return layer.adc_scores(v, layer.lookup_words(hq, hi), method=method)
        return adc

    @tf.function
    def sdc(hq, hi, codes, gamma, bilinear):
        return pq8.sdc_scores(codes, gamma, pq8.lookup_words(hq, hi), bilinear)

    exact_tf, exact_xla = exact_fn(False), exact_fn(True)
    keep = max(config.recall_ks)

    @tf.function(jit_compile=True)
    def adc_rerank(hq, hi, v):  # one request, one target: PQ top r·K, exact scores of those from the float table
        scores = pq8.adc_scores(v, pq8.lookup_words(hq, hi), method="lookup")[0, 0]  # [L]
        candidates = tf.math.top_k(scores, k=tf.minimum(config.rerank * keep, tf.shape(scores)[0])).indices
        history = tf.concat([tf.gather(query_table, tf.gather(hq[0], candidates))[:, None],
                             tf.gather(item_table, tf.gather(hi[0], candidates))], axis=1)  # [rK, J, d]
        return tf.gather(candidates, tf.math.top_k(tf.einsum("rjd,jd->r", history, v[0, 0]), k=keep).indices)
    lookup_fns = {f"ADC lookup {default} (TF)": adc_fn(pq8, "lookup", False),
                  f"ADC lookup {default} (XLA lookups only)": adc_fn(pq8x, "lookup", False)}
    lookup_fns.update({f"ADC lookup {name} (XLA)": adc_fn(layer, "lookup", True) for name, layer in layers.items()})
    decode_fns = {f"ADC decode+matmul {name} (XLA)": adc_fn(layer, "decode", True) for name, layer in layers.items()}
    rows = []

    def measure(length, candidates, batch=1):
        hq = tf.constant(rng.integers(0, config.catalog_queries, [batch, length]), tf.int32)
        hi = tf.constant(rng.integers(0, config.catalog_items, [batch, length]), tf.int32)
        v = tf.constant(rng.standard_normal([batch, candidates, num, dim]).astype(np.float32))
        lookups = batch * candidates * length * pq8.bytes_per_position  # byte lookups of the default codes
        fns = {"exact (TF)": lambda: exact_tf(hq, hi, v), "exact (XLA)": lambda: exact_xla(hq, hi, v)}
        fns.update({name: (lambda fn=fn: fn(hq, hi, v)) for name, fn in decode_fns.items()})
        skipped = []
        if lookups <= config.max_lookups:
            fns.update({name: (lambda fn=fn: fn(hq, hi, v)) for name, fn in lookup_fns.items()})
            if batch == 1 and candidates == 1 and length >= config.rerank * keep:
                fns[f"ADC lookup {default} (XLA) + top-{config.rerank * keep} + exact re-rank"] = (
                    lambda: adc_rerank(hq, hi, v))
        else:
            skipped.append(f"ADC lookup ({lookups:.1e} lookups; decode+matmul is the path for many candidates)")
        sdc_lookups = batch * candidates * length * num * num * size
        if sdc_lookups <= config.max_lookups:
            codes = tf.constant(rng.integers(0, config.centroids, [batch, candidates, num, size]), tf.int32)
            gamma = tf.constant(rng.random([batch, candidates, num]).astype(np.float32))
            bilinear = tf.constant(rng.standard_normal([num, num, dim, dim]).astype(np.float32))
            fns["SDC, paper's formula (TF)"] = lambda: sdc(hq, hi, codes, gamma, bilinear)
        else:
            skipped.append(f"SDC ({sdc_lookups:.1e} lookups)")
        probe = time.perf_counter()
        np.asarray(exact_tf(hq, hi, v))
        slow = time.perf_counter() - probe
        repeats = int(max(5, min(config.repeats, 1.5 / max(slow, 1e-4))))
        seconds = _timed(fns, repeats)
        row = {"L": length, "N": candidates, "requests_per_call": batch, "repeats": repeats,
               "ms_per_request": {k: 1e3 * s / batch for k, s in seconds.items()}, "skipped": skipped}
        best_exact = min(seconds["exact (TF)"], seconds["exact (XLA)"])
        row["fastest_adc"], row["speedup_vs_best_exact"], row["speedup_vs_exact_tf"] = {}, {}, {}
        for name in layers:
            adc = {k: s for k, s in seconds.items() if k.startswith("ADC") and name in k and "re-rank" not in k}
            fastest = min(adc, key=adc.get)
            row["fastest_adc"][name] = fastest
            row["speedup_vs_best_exact"][name] = best_exact / adc[fastest]
            row["speedup_vs_exact_tf"][name] = seconds["exact (TF)"] / adc[fastest]
        rows.append(row)
        _log(progress, f"speed L={length} N={candidates} x{batch}: " + ", ".join(
            f"{k} {v:.3f}ms" for k, v in row["ms_per_request"].items()))

    for length in config.speed_lengths:
        for candidates in config.speed_candidates:
            measure(length, candidates)
    if config.throughput_batch > 1:
        measure(10000, 1, config.throughput_batch)
    faiss_rows = _faiss_reference(config, pq8, rng, progress)
    memory = {"exact float32": num * dim * 4, **{f"PQ {n}": layer.bytes_per_position for n, layer in layers.items()}}
    catalog = {"exact float32": (config.catalog_items * item_channels + config.catalog_queries) * dim * 4 / 2**20}
    catalog.update({f"PQ {n}": (config.catalog_items * layer.item_words + config.catalog_queries * layer.query_words)
                    * 4 / 2**20 for n, layer in layers.items()})
    return {"rows": rows, "faiss": faiss_rows, "bytes_per_position": memory, "catalog_mib": catalog,
            "channels": channels, "dim": dim, "default": default, "variants": list(layers),
            "catalog_items": config.catalog_items, "catalog_queries": config.catalog_queries}


def _faiss_reference(config: PQBenchConfig, layer, rng, progress) -> List[Dict]:
    """faiss IndexPQ (inner product) search over the same 8-bit codes vs this layer's ADC on contiguous codes."""
    import tensorflow as tf

    try:
        import faiss
    except ImportError:  # pragma: no cover
        return [{"error": "faiss not installed (pip install 'seminar-tf[pq]')"}]
    num, size, cents, sub = layer.codebooks.shape
    dim = size * sub
    rows = []
    for length in config.speed_lengths:
        k = min(max(config.recall_ks), length)
        hq = tf.constant(rng.integers(0, config.catalog_queries, [1, length]), tf.int32)
        hi = tf.constant(rng.integers(0, config.catalog_items, [1, length]), tf.int32)
        words = layer.lookup_words(hq, hi)  # [1, L, W], contiguous now (no catalog gather in the timing)
        codes = layer.unpack(words).numpy().reshape(length, num * size).astype(np.uint8)
        index = faiss.IndexPQ(num * dim, num * size, 8, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(layer.codebooks.numpy().ravel(), index.pq.centroids)
        index.is_trained = True
        index.add_sa_codes(codes)
        v = rng.standard_normal([1, 1, num, dim]).astype(np.float32)
        query = v.reshape(1, -1)

        @tf.function(jit_compile=True)
        def adc_topk(words, v):
            return tf.math.top_k(layer.adc_scores(v, words, method="lookup")[0, 0], k=k).indices

        @tf.function(jit_compile=True)
        def call_overhead(words, v):  # the fixed cost of one tf.function call with the same inputs
            return words[0, :1, 0] + tf.cast(v[0, 0, 0, 0], tf.int32)

        vt = tf.constant(v)
        seconds = _timed({"faiss": lambda: index.search(query, k)[1], "adc": lambda: adc_topk(words, vt),
                          "overhead": lambda: call_overhead(words, vt)}, config.repeats)
        ours, theirs, overhead = seconds["adc"], seconds["faiss"], seconds["overhead"]
        _, faiss_ids = index.search(query, k)
        scores = layer.adc_scores(vt, words, method="lookup").numpy()[0, 0]
        agree = len(set(faiss_ids[0]) & set(np.argsort(-scores)[:k])) / k
        rows.append({"L": length, "k": k, "faiss_ns_per_code": 1e9 * theirs / length,
                     "adc_ns_per_code": 1e9 * ours / length, "adc_over_faiss": ours / theirs,
                     "call_overhead_us": 1e6 * overhead,
                     "adc_net_ns_per_code": 1e9 * max(ours - overhead, 0.0) / length,
                     "adc_net_over_faiss": max(ours - overhead, 0.0) / theirs,
                     "sub_codes_per_code": num * size, "same_top_k_as_faiss": agree,
                     "faiss_threads": faiss.omp_get_max_threads()})
        _log(progress, f"faiss L={length}: faiss {rows[-1]['faiss_ns_per_code']:.1f} ns/code, ADC "
                       f"{rows[-1]['adc_ns_per_code']:.1f} ns/code ({rows[-1]['adc_net_ns_per_code']:.1f} without "
                       "the call overhead)")
    return rows


# ---------------------------------------------------------------------------------------------- report
def _targets(report: Dict, config: PQBenchConfig) -> List[Dict]:
    out = []
    default = _variant_name(config.subspaces, config.centroids, len(report["recall"]["channels"]))
    recall = [r for r in report["recall"]["rows"] if r["L"] == 10000 and r["method"] == "ADC"
              and r["codebooks"] == f"trained, {default}"]
    if recall and "recall@200" in recall[0]:
        value = recall[0]["recall@200"]
        others = {r["codebooks"]: r["recall@200"] for r in report["recall"]["rows"]
                  if r["L"] == 10000 and r["method"] == "ADC" and r["codebooks"].startswith("trained")}
        out.append({"target": f"recall@200 ≥ 0.95 at L=10^4, trained codebooks ({default}, ADC)",
                    "measured": f"{value:.3f} (" + "; ".join(f"{k}: {v:.3f}" for k, v in others.items()
                                                             if k != f"trained, {default}") + ")",
                    "met": value >= 0.95,
                    "why": f"short by {0.95 - value:.3f}: with S={config.subspaces} sub-spaces of "
                           f"{report['recall']['dim'] // config.subspaces} dims and C={config.centroids} the relative "
                           f"reconstruction error is {recall[0]['reconstruction_error']:.3f}, large next to the gaps "
                           "between the exact scores around the 200th of 10^4; more bytes per position (S=16) or "
                           "re-scoring a few K candidates exactly (next row) close the gap"})
        reranked = [r for r in report["recall"]["rows"] if r["L"] == 10000 and "re-rank" in r["method"]
                    and r["codebooks"] == f"trained, {default}"]
        if reranked:
            value = reranked[0]["recall@200"]
            out.append({"target": f"… the same with the PQ GSU's exact re-rank of {config.rerank}K candidates "
                                  f"(pq_rerank={config.rerank})",
                        "measured": f"{value:.3f}", "met": value >= 0.95,
                        "why": "the true top K is not inside the PQ top r·K"})
    speed = report["speed"]
    for n in (1, 100):
        rows = [r for r in speed["rows"] if r["L"] == 10000 and r["N"] == n and r["requests_per_call"] == 1]
        if rows:
            r = rows[0]
            value = r["speedup_vs_best_exact"][speed["default"]]
            others = "; ".join(f"{name}: {r['speedup_vs_best_exact'][name]:.2f}×" for name in speed["variants"]
                               if name != speed["default"])
            out.append({
                "target": f"ADC ≥ 3× faster than exact at L=10^4, N={n}, {config.catalog_items:,}-item catalog",
                "measured": f"{value:.2f}× vs the faster exact ({r['fastest_adc'][speed['default']]}); "
                            f"{r['speedup_vs_exact_tf'][speed['default']]:.2f}× vs exact in plain TF; {others}",
                "met": value >= 3.0,
                "why": (f"short of 3× by {3.0 - value:.2f}×: a single request is bound by L random reads into the "
                        "catalog tables, one per position for both paths (a row of codes or a row of embeddings, "
                        "each a cache/TLB miss), plus J·S table lookups per position for ADC, which XLA runs at "
                        "≈1 ns each (faiss's SIMD scan needs less); the 16× smaller rows pay off in bandwidth, see "
                        "the row with several requests per call" if n == 1 else
                        f"short of 3× by {3.0 - value:.2f}×: with N targets both paths end in the same GEMM "
                        "(L × J·d by J·d × N); ADC lookups would cost N·L·J·S scalar reads, so decode + matmul is "
                        "ADC's fastest form and saves only the gather's bandwidth")})
    faiss_rows = [r for r in report["speed"]["faiss"] if "L" in r]
    if faiss_rows:
        r = max(faiss_rows, key=lambda row: row["L"])  # per-code cost: the longest history amortizes fixed costs
        value = r["adc_over_faiss"]
        out.append({"target": f"ADC within 2× of faiss IndexPQ per code (L={r['L']:,}, same codes)",
                    "measured": f"{value:.2f}× faiss's time per code ({r['adc_ns_per_code']:.1f} vs "
                                f"{r['faiss_ns_per_code']:.1f} ns; {r['adc_net_over_faiss']:.2f}× without TF's call "
                                "overhead)",
                    "met": value <= 2.0,
                    "why": f"{value / 2.0:.2f}× over the bound: XLA's gather loop spends ≈1–2 ns per table lookup "
                           f"({r['sub_codes_per_code']} per code at 8 bits) where faiss's scan needs ≈0.5 ns, and "
                           "each TF call adds a fixed dispatch cost"})
    rows = {r["variant"]: r for r in report["quality"]["rows"]}
    paired = rows.get("exact run, pq_adc GSU")
    trained = rows.get("pq_adc-trained run, pq_adc GSU")
    if paired:
        value = abs(paired["auc_minus_exact"])
        out.append({"target": "test AUC with pq_adc within 0.002 of exact (same weights)",
                    "measured": f"{paired['auc_minus_exact']:+.4f}", "met": value <= 0.002,
                    "why": "the PQ top-K differs from the exact one on some test rows (see the overlap column)"})
    if trained:
        value = abs(trained["auc_minus_exact"])
        same_weights = trained["auc"] - rows["pq_adc-trained run, exact GSU"]["auc"]
        out.append({"target": "test AUC of the pq_adc-trained run within 0.002 of the exact run",
                    "measured": f"{trained['auc_minus_exact']:+.4f}", "met": value <= 0.002,
                    "why": "one training run each; a test AUC's standard error is "
                           f"≈{trained['auc_standard_error']:.3f} here ({trained['num_samples']} samples, "
                           "Hanley–McNeil), so two separately trained runs differ by this much from training noise "
                           "alone; the paired rows (same weights, only the GSU differs) isolate the GSU: "
                           f"{same_weights:+.4f} on the pq_adc-trained run, "
                           f"{paired['auc_minus_exact'] if paired else float('nan'):+.4f} on the exact run"})
    return out


def run(out_dir: str = "benchmarks", work_dir: str = "runs/bench_pq",
        progress: Optional[Callable[[str], None]] = None, config: Optional[PQBenchConfig] = None) -> str:
    """Runs the benchmark and writes ``out_dir/pq.md`` and ``out_dir/pq.json``; returns the Markdown."""
    import faiss
    import tensorflow as tf

    config = config or PQBenchConfig()
    started = time.time()
    paths = _train(config, work_dir, progress)
    quality = _quality(paths, config.rerank, progress)
    recall = _recall(paths, config, progress)
    speed = _speed(config, progress)
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != f.default}
    preset = changed.pop("preset", None)
    command = COMMAND + (f" --preset {preset}" if preset else "") + (
        f" (PQBenchConfig overrides: {changed})" if changed else "")
    report = {
        "benchmark": "pq", **stamp.stamp(command),
        "tensorflow": tf.__version__, "faiss": faiss.__version__, "config": dataclasses.asdict(config),
        "quality": quality, "recall": recall, "speed": speed,
        "notes": [
            "ADC scores are the exact GSU score of the decoded history (tests/test_pq.py checks equality to 1e-5); "
            "SDC keeps only the diagonal sub-space blocks of the trained bilinear map G_i A G_j^T, exact only "
            "when that map is block-diagonal (the paper's plain inner product, or S=1).",
            "Codes quantize the content embeddings before G_j; pq_adc runs re-encode them from their own content "
            "at every epoch start and after training.",
            "The machine is shared (2 cores): absolute times move between runs; the ratios come from interleaved "
            "rounds of one run.",
        ],
    }
    report["wall_s"] = time.time() - started
    if paths["reused"]:
        report["notes"].append(f"Reused from {work_dir} (trained by an earlier run of this benchmark, not timed "
                               f"here): {', '.join(paths['reused'])}.")
    report["targets"] = _targets(report, config)
    text = stamp.write(report, out_dir, "pq.json", default=float)
    _log(progress, f"report -> {os.path.join(out_dir, 'pq.md')} ({report['wall_s']:.0f}s)")
    return text
