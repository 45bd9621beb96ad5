"""Beam pipeline throughput: raw events per second at several sizes on FnApiRunner.

For each size the report has the full build's wall time and, as the in-process baseline, a Beam job that
only reads and parses the same raw events (same runner, same files). The ratio build/baseline says how
much the dataset construction costs over plain I/O; the growth exponent (log time ratio / log size ratio
between consecutive sizes) says how build time scales (1.0 = linear).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, List, Optional

from seminar_tf import config as config_lib
from seminar_tf.bench import stamp

COMMAND = "seminar-tf bench pipeline --sizes {sizes}"


def _read_only_job(raw_dir: str) -> None:
    """Baseline: the pipeline's own reader (read + parse every events row), counted, same runner."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines import raw_io

    files = raw_io.find_table_files(raw_dir, "events")
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        parsed = p | raw_io.ReadRawTable(files)
        _ = parsed["rows"] | beam.combiners.Count.Globally()


def _world_for(events: int, base) -> object:
    per_user = base.mean_history + base.impressions_per_user
    users = max(10, int(round(events / per_user)))
    return dataclasses.replace(base, num_users=users, num_items=max(base.num_items, users * 5))


def run(sizes: List[int], *, out_dir: str, work_dir: str, progress: Optional[Callable[[str], None]] = None) -> str:
    from beam_pipelines.build_dataset import build_dataset
    from seminar_tf.data.world import generate_world

    progress = progress or (lambda m: None)
    load_before = [round(v, 2) for v in os.getloadavg()]  # other work on the machine skews absolute times
    preset = config_lib.get_preset("demo")
    rows = []
    for size in sizes:
        raw_dir = os.path.join(work_dir, f"raw_{size}")
        data_dir = os.path.join(work_dir, f"dataset_{size}")
        world = _world_for(size, preset.world)
        progress(f"bench pipeline: generating ~{size} events ({world.num_users} users)")
        generate_world(world, raw_dir, progress=progress)
        progress("bench pipeline: baseline read-only job")
        t0 = time.perf_counter()
        _read_only_job(raw_dir)
        baseline_s = time.perf_counter() - t0
        progress("bench pipeline: full build")
        t0 = time.perf_counter()
        stats = build_dataset(raw_dir, data_dir, preset.build, pipeline_args=["--runner=FnApiRunner"])
        build_s = time.perf_counter() - t0
        events = int(stats["rows_read"]["events"])
        samples = sum(int(n) for kind in stats["samples"].values() for n in kind.values())
        rows.append(dict(target_events=size, events=events, users=world.num_users, samples=samples,
                         build_s=round(build_s, 2), baseline_read_s=round(baseline_s, 2),
                         events_per_s=round(events / build_s), build_over_baseline=round(build_s / baseline_s, 2)))
        progress(f"bench pipeline: {rows[-1]}")
    for prev, cur in zip(rows, rows[1:]):
        cur["growth_exponent"] = round(
            math.log(cur["build_s"] / prev["build_s"]) / math.log(cur["events"] / prev["events"]), 2)
    report = {
        "benchmark": "pipeline", **stamp.stamp(COMMAND.format(sizes=",".join(map(str, sizes)))),
        "runner": "FnApiRunner",
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "build_config": dataclasses.asdict(preset.build),
        "rows": rows,
    }
    return stamp.write(report, out_dir, "pipeline.json")


def markdown(report: dict) -> str:
    """pipeline.md from the report's JSON alone (reports of older generators lack the load averages)."""
    load = (f"Load average (1/5/15 min) before: {report['load_average_before']}, after: "
            f"{report['load_average_after']}." if "load_average_before" in report else
            "Load average: not recorded by the generator that wrote this report.")
    lines = [
        "# Beam pipeline throughput",
        "",
        f"Command: `{report['command']}` ({report['machine']}, runner {report['runner']}, demo preset's build "
        f"config: max_history={report['build_config']['max_history']}).",
        f"Commit: {report.get('commit', 'not recorded')}.",
        "Baseline: a Beam job that only reads and parses the same events file, run in the same process.",
        load,
        "",
        "| events | users | samples written | build s | events/s | read-only baseline s | build / baseline "
        "| growth exponent |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['events']:,} | {r['users']:,} | {r['samples']:,} | {r['build_s']} | {r['events_per_s']:,} | "
            f"{r['baseline_read_s']} | {r['build_over_baseline']} | {r.get('growth_exponent', '—')} |"
        )
    return "\n".join(lines) + "\n"
