"""Benchmarks behind `seminar-tf bench` / `make bench`: each writes a Markdown + JSON report."""

import os
from typing import Dict, List, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout


def child_env() -> Dict[str, str]:
    """Environment of a benchmark's child processes (CLI commands, servers, load generators): this checkout first on
    PYTHONPATH, TensorFlow's C++ INFO/WARNING lines off, and no Vertex AI directories or TF_CONFIG (a child writes
    only where the benchmark tells it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIP_") and k != "TF_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def changed_flags(config, default, flags: Sequence[Tuple[str, str]]) -> List[str]:
    """``[flag, value, ...]`` for each (flag, field) of ``flags`` whose value in ``config`` differs from
    ``default``'s: a bench config's command line as typed."""
    out = []
    for flag, name in flags:
        if getattr(config, name) != getattr(default, name):
            out += [flag, str(getattr(config, name))]
    return out
