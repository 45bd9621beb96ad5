"""Benchmark reports as data (seminar_tf/bench/stamp.py): each committed report's Markdown is its JSON rendered,
new reports carry commit, command, machine and time, and `seminar-tf render` re-renders them."""

import glob
import json
import os
import re
import shutil

import pytest

from seminar_tf import cli
from seminar_tf.bench import stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = sorted(p for p in glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.json"), recursive=True))


def _kind(path):
    with open(path, encoding="utf-8") as f:
        return stamp.benchmark_of(json.load(f))


def test_every_benchmark_kind_has_a_committed_report():
    assert {_kind(p) for p in REPORTS} == set(stamp.RENDERERS)


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_committed_markdown_is_its_json_rendered(path):
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    markdown = os.path.join(os.path.dirname(path), stamp.RENDERERS[stamp.benchmark_of(report)][1])
    with open(markdown, encoding="utf-8") as f:
        committed = f.read()
    assert stamp.render(report) == committed, f"{markdown} was edited by hand or by an older generator: " \
                                              f"run `seminar-tf render {os.path.relpath(path, ROOT)}`"


def _pipeline_report():
    rows = [{"target_events": 100, "events": 120, "users": 10, "samples": 90, "build_s": 2.0, "baseline_read_s": 1.0,
             "events_per_s": 60, "build_over_baseline": 2.0},
            {"target_events": 1000, "events": 1200, "users": 100, "samples": 900, "build_s": 10.0,
             "baseline_read_s": 2.0, "events_per_s": 120, "build_over_baseline": 5.0, "growth_exponent": 0.7}]
    return {"benchmark": "pipeline", **stamp.stamp("seminar-tf bench pipeline --sizes 100,1000"),
            "runner": "FnApiRunner", "load_average_before": [0.5, 0.5, 0.5], "load_average_after": [1.0, 1.0, 1.0],
            "build_config": {"max_history": 50}, "rows": rows}


def test_write_stamps_the_json_and_renders_the_markdown_from_it(tmp_path):
    text = stamp.write(_pipeline_report(), str(tmp_path), "pipeline.json")
    with open(tmp_path / "pipeline.json", encoding="utf-8") as f:
        written = json.load(f)
    assert written["commit"] == stamp.commit() and written["commit"] != ""
    assert written["command"] == "seminar-tf bench pipeline --sizes 100,1000"
    assert written["machine"] == stamp.machine() and written["finished_at"].endswith("UTC")
    assert (tmp_path / "pipeline.md").read_text(encoding="utf-8") == text == stamp.render(written)
    assert "| 1,200 | 100 | 900 | 10.0 | 120 | 2.0 | 5.0 | 0.7 |" in text.splitlines()


def test_commit_names_head_of_this_checkout():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    commit = stamp.commit()
    assert len(commit.split()[0]) == 40 and all(c in "0123456789abcdef" for c in commit.split()[0])


def test_render_cli_rewrites_the_markdown_beside_the_json(tmp_path, capsys):
    source = next(p for p in REPORTS if _kind(p) == "pq")
    shutil.copy(source, tmp_path / "pq.json")
    (tmp_path / "pq.md").write_text("stale\n")
    assert cli.main(["render", str(tmp_path / "pq.json")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "pq.md")
    with open(source.replace(".json", ".md"), encoding="utf-8") as f:
        assert (tmp_path / "pq.md").read_text(encoding="utf-8") == f.read()


def test_render_refuses_a_json_that_is_no_report(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"benchmark": "mystery"}))
    with pytest.raises(ValueError, match="benchmark='mystery'"):
        stamp.render_file(str(tmp_path / "x.json"))
    assert cli.main(["render", str(tmp_path / "x.json")]) == 1
    assert re.search(r"^seminar-tf render: .*x\.json: not a seminar-tf benchmark report", capsys.readouterr().err)


def test_portable_takes_machine_paths_out_of_a_report():
    """A directory given on the command line outside the repository becomes its token; a path inside the repository
    becomes relative to it; a longer directory that only shares the prefix is left alone."""
    report = {"command": "seminar-tf bench movielens --work-dir /scratch/ml/work --cache-dir /scratch/cache",
              "input": "/scratch/cache/ml-100k", "other": "/scratch/ml/workshop/x",
              "inside": os.path.join(ROOT, "runs", "bench"), "root": ROOT}
    out = stamp.portable(report, {"WORK_DIR": "/scratch/ml/work", "CACHE_DIR": "/scratch/cache", "INPUT_DIR": None,
                                  "OUT_DIR": os.path.join(ROOT, "benchmarks")})
    assert out == {"command": "seminar-tf bench movielens --work-dir WORK_DIR --cache-dir CACHE_DIR",
                   "input": "CACHE_DIR/ml-100k", "other": "/scratch/ml/workshop/x", "inside": "runs/bench",
                   "root": "."}


def test_committed_reports_name_no_machine_path():
    """Reports are read on other machines: no absolute path of the machine that wrote them."""
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.*"), recursive=True)):
        if path.endswith((".json", ".md")):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            found = re.findall(r"(?<![\w.~])/(?:work|tmp|root|home|Users|mnt|scratch|opt|var)/[^\s\"'`)]*", text)
            assert not found, f"{os.path.relpath(path, ROOT)} names machine paths: {found[:3]}"
