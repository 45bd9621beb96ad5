"""Process tuning, as tensorflow_model_server's flags: TensorFlow's thread pools and glibc's malloc."""

from __future__ import annotations

from typing import Dict

import tensorflow as tf


def set_tensorflow_parallelism(intra_op: int = 0, inter_op: int = 0) -> Dict[str, int]:
    """TF Serving's ``--tensorflow_intra_op_parallelism`` / ``--tensorflow_inter_op_parallelism``: threads one
    op may use / ops run at once (0 = TensorFlow's default, one per core). Must run before TensorFlow runs its
    first op in this process; returns the settings in effect.

    With several concurrent requests on few cores, 1 intra-op thread per op usually gives more throughput:
    the requests themselves keep the cores busy, without the per-op thread hand-offs.
    """
    threading_config = tf.config.threading
    for value, getter, setter, flag in (
            (intra_op, threading_config.get_intra_op_parallelism_threads,
             threading_config.set_intra_op_parallelism_threads, "tensorflow_intra_op_parallelism"),
            (inter_op, threading_config.get_inter_op_parallelism_threads,
             threading_config.set_inter_op_parallelism_threads, "tensorflow_inter_op_parallelism")):
        if int(value) < 0:
            raise ValueError(f"{flag} must be >= 0 (0 = TensorFlow's default), got {value}")
        if int(value) and getter() != int(value):
            try:
                setter(int(value))
            except RuntimeError as err:
                raise RuntimeError(f"{flag}={value}: TensorFlow has already run in this process and keeps its "
                                   f"thread pools ({err}); set it when the server process starts") from err
    return {"intra_op": threading_config.get_intra_op_parallelism_threads(),
            "inter_op": threading_config.get_inter_op_parallelism_threads()}


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
DEFAULT_MALLOC_MMAP_THRESHOLD_MB = 32  # above a request's largest buffers (4 MB at L = 10^4, N = 100)
MALLOC_TRIM_FACTOR = 8  # freed heap memory kept for reuse: this many times the mmap threshold


def tune_malloc(mmap_threshold_mb: float = DEFAULT_MALLOC_MMAP_THRESHOLD_MB) -> Dict[str, object]:
    """Has glibc's malloc serve buffers up to ``mmap_threshold_mb`` MiB from its heap and keep freed heap
    memory (up to ``MALLOC_TRIM_FACTOR`` times that) for reuse, instead of mmap/munmap per buffer.

    A ``rank`` request at L = 10^4, N = 100 allocates several [N, L] float buffers (4 MB each). Above glibc's
    default threshold (128 KiB, adapting upwards only slowly) each one is a fresh mmap whose pages fault in on
    first touch and go back to the kernel on free: every request pays page faults and zeroing for all of
    them (one request in-process on 2 cores: 23.6 ms p50 untuned, 16.5 ms tuned; benchmarks/serving.md has
    the load test with and without it). The same as starting the process with
    ``MALLOC_MMAP_THRESHOLD_=<bytes> MALLOC_TRIM_THRESHOLD_=<bytes>``. 0 leaves glibc's defaults. Returns the
    settings in effect, or why none were made (not glibc).
    """
    import ctypes
    import platform

    if mmap_threshold_mb < 0:
        raise ValueError(f"malloc_mmap_threshold_mb must be >= 0 (0 = glibc's default), got {mmap_threshold_mb}")
    if not mmap_threshold_mb:
        return {"tuned": False, "why": "malloc_mmap_threshold_mb = 0: glibc's defaults"}
    if platform.libc_ver()[0] != "glibc":
        return {"tuned": False, "why": f"not glibc ({platform.libc_ver()[0] or 'unknown C library'})"}
    mmap_threshold = int(mmap_threshold_mb * 2 ** 20)
    trim_threshold = min(MALLOC_TRIM_FACTOR * mmap_threshold, 2 ** 31 - 1)  # mallopt takes a C int
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) != 1:
        raise ValueError(f"malloc_mmap_threshold_mb={mmap_threshold_mb}: glibc refused it; try a smaller value "
                         f"(default {DEFAULT_MALLOC_MMAP_THRESHOLD_MB})")
    if libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) != 1:
        raise ValueError(f"malloc trim threshold {trim_threshold} bytes: glibc refused it")
    return {"tuned": True, "mmap_threshold_bytes": mmap_threshold, "trim_threshold_bytes": trim_threshold}
