"""The `seminar-tf` console script: --help on every subcommand, and a tiny world → build run."""

import json
import os
import subprocess
import sys

import pytest

from seminar_tf import cli, schema

SUBCOMMANDS = ["world", "build", "pretrain", "finetune", "evaluate", "fit-codebooks", "export", "serve", "query",
               "demo", "bench"]
ROOT = os.path.dirname(os.path.dirname(__file__))


def test_every_subcommand_has_help_for_every_flag(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(SUBCOMMANDS) <= set(sub.choices)
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: seminar-tf {name}" in text
        for action in sub.choices[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 8, (name, action.option_strings)


@pytest.mark.slow
def test_cli_hides_tensorflow_load_logs_and_beams_apitools_warning_unless_verbose():
    """The help of a command whose defaults import Beam and TensorFlow: no C++ INFO/WARNING lines (oneDNN, CPU
    features, CUDA stub) and no apitools warning on stderr; ``--verbose`` leaves TensorFlow's logging alone."""
    root = os.path.dirname(os.path.dirname(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-m", "seminar_tf.cli", "build", "--help"], capture_output=True,
                           text=True, timeout=180, cwd=root, env=env)
    assert quiet.returncode == 0 and "usage: seminar-tf build" in quiet.stdout
    noise = [line for line in quiet.stderr.splitlines()
             if line.startswith(("I0000", "W0000")) or "apitools" in line or "absl::InitializeLog" in line]
    assert not noise, noise
    script = ("import os, sys; from seminar_tf import cli; cli.quiet_third_party_logs(); "
              "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], 'tensorflow' in sys.modules); "
              "import tensorflow as tf; tf.constant(1) + 1; print('tensorflow' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=root,
                           env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert shown.stdout.split() == ["0", "False", "True"]  # a level the user set is kept; TF loads when used
    assert "cuInit" not in shown.stderr and "I0000" not in shown.stderr, shown.stderr  # load and device probe


def test_unknown_flag_is_rejected_outside_build():
    with pytest.raises(SystemExit):
        cli.main(["world", "--out", "x", "--no-such-flag", "1"])


@pytest.mark.slow
def test_console_script_module_runs_help():
    out = subprocess.run([sys.executable, "-m", "seminar_tf.cli", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0 and "pretrain" in out.stdout


@pytest.mark.slow
def test_world_then_build_end_to_end(tmp_path, capsys):
    raw = tmp_path / "raw"
    data = tmp_path / "data"
    assert cli.main(["world", "--out", str(raw), "--num-users", "12", "--num-items", "500", "--mean-history", "15",
                     "--max-history-events", "40", "--impressions-per-user", "3", "--seed", "3",
                     "--set", "world.num_items=80"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_users"] == 12 and summary["num_items"] == 80  # the flag and --set (after it) reached it
    with open(raw / "events.jsonl") as f:
        events = [json.loads(line) for line in f]
    assert len(events) == summary["num_events"] and len({e["user_id"] for e in events}) == 12
    assert cli.main(["build", "--input", str(raw), "--output", str(data), "--max-history", "32",
                     "--num-shards", "1", "--runner=FnApiRunner", "--set", "build.max_history=16"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("rows read: ") and "ctr samples: train " in out and f"wrote {data}" in out
    assert "build 1/3 reading" in err and "build 2/3 building samples" in err and "build done in" in err
    stats = json.loads((data / schema.STATS_FILE).read_text())
    assert stats["rows_read"]["events"] > 0
    for table, read in stats["rows_read"].items():
        dead = sum(stats["dead_letters"].get(table, {}).values())
        assert read == stats["rows_ok"][table] + dead
    assert sum(stats["samples"]["ctr"].values()) > 0
    metadata = schema.DatasetMetadata.from_json((data / schema.METADATA_FILE).read_text())
    assert metadata.max_history == 16 and set(metadata.channels) == set(schema.CHANNELS)


def _subcommands():
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_help_of_root_and_every_subcommand_imports_neither_tensorflow_nor_beam():
    """``--help`` builds every parser: only light modules (no TensorFlow, no Beam) may load, in a fresh process."""
    calls = [["--help"]] + [[name, "--help"] for name in _subcommands()]
    script = ("import json, sys\nfrom seminar_tf import cli\n"
              f"for argv in {calls!r}:\n"
              "    try:\n        cli.main(argv)\n    except SystemExit as stop:\n        assert stop.code == 0, argv\n"
              "print(json.dumps({m: m in sys.modules for m in ('tensorflow', 'apache_beam')}))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {"tensorflow": False, "apache_beam": False}
    assert "usage: seminar-tf build" in run.stdout and "usage: seminar-tf probe" in run.stdout


def test_version_prints_the_package_and_library_versions_without_importing_them(capsys):
    import seminar_tf

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"seminar-tf {seminar_tf.__version__}"
    names = [line.split()[0] for line in lines]
    assert names[1:5] == ["tensorflow", "tf-keras", "apache-beam", "tensorflow-recommenders"]
    assert all(len(line.split()) >= 2 for line in lines)


@pytest.mark.slow
def test_python_dash_m_seminar_tf_version():
    script = ("import sys, runpy; sys.argv = ['seminar_tf', '--version']\ntry:\n"
              "    runpy.run_module('seminar_tf', run_name='__main__')\nexcept SystemExit as stop:\n"
              "    print(stop.code, 'tensorflow' in sys.modules, 'apache_beam' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.stdout.startswith("seminar-tf ") and "tf-keras " in run.stdout
    assert run.stdout.splitlines()[-1] == "0 False False", run.stdout


def _fails(capsys, argv, code):
    """``cli.main(argv)`` fails with exit ``code`` and at most 3 stderr lines, no traceback; returns stderr."""
    try:
        result = cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors
        result = stop.code
    err = capsys.readouterr().err
    assert result == code, (argv, result, err)
    assert 0 < len(err.strip().splitlines()) <= 3 and "Traceback" not in err, err
    return err


def test_expected_errors_print_one_line_without_a_traceback(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _fails(capsys, ["build", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], 1)
    assert err.startswith("seminar-tf build: --input ") and "no such directory" in err
    err = _fails(capsys, ["build", "--input", str(empty), "--output", str(tmp_path / "o")], 1)
    assert str(empty) in err and "empty directory" in err
    missing = ["--user-history", str(tmp_path / "h.json"), "--candidates", str(tmp_path / "c.json")]
    err = _fails(capsys, ["query", *missing], 1)
    assert err.startswith("seminar-tf query: --user-history ") and "h.json" in err
    err = _fails(capsys, ["world", "--out", str(tmp_path / "w"), "--format", "xml"], 2)
    assert err.startswith("seminar-tf world: ") and "format" in err and "'xml'" in err
    err = _fails(capsys, ["pretrain", "--data", str(tmp_path), "--set", "model.nope=1"], 2)
    assert "model.nope" in err and "no field" in err
    err = _fails(capsys, ["world", "--out", str(tmp_path / "w"), "--no-such-flag"], 2)
    assert "--no-such-flag" in err
    with pytest.raises(cli.CliError):  # --debug: the traceback instead
        cli.main(["--debug", "build", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])


@pytest.mark.slow
def test_evaluate_on_a_run_that_does_not_exist_fails_in_one_line(tmp_path, capsys):
    err = _fails(capsys, ["evaluate", "--model-dir", str(tmp_path / "no_run")], 1)
    assert err.startswith("seminar-tf evaluate: ") and "no_run" in err


def test_build_summary_is_short_and_warns_about_empty_splits_and_dead_letters(capsys):
    stats = {"rows_read": {"items": 50, "events": 1000}, "rows_ok": {"items": 50, "events": 980},
             "dead_letters": {"items": {}, "events": {"unknown_item": 15, "bad_timestamp": 5}},
             "samples": {"ctr": {"test": 20, "train": 80, "valid": 0},
                         "pretrain": {"test": 8, "train": 40, "valid": 8}},
             "too_short_history": {"ctr": {"train": 3}}, "timelines": {"users": 5, "steps": 900},
             "vocab_sizes": {"items": 52, "queries": 10, "item_attributes": {"a": 3}}, "channels": ["text", "query"]}
    cli._print_build_summary(stats, "/data/out")
    out, err = capsys.readouterr()
    assert 6 <= len(out.splitlines()) <= 12 and "{" not in out
    assert "ctr samples: train 80, valid 0, test 20 (too short history: 3)" in out
    assert "unknown_item 15" in out and "timelines: 5 users, 900 steps" in out and "/data/out" in out
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("WARNING: ") for w in warnings)
    assert "ctr/valid is empty" in warnings[0] and "events: 20 of 1000 rows (2.0%)" in warnings[1]


def test_metrics_table_is_markdown(capsys):
    cli._print_metrics_table({"model": {"auc": 0.71234, "mrr": 0.2}, "popularity": {"auc": 0.5}, "run": "r",
                              "data": "d", "gsu": "exact", "split": "test"})
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == ["| model | auc | gauc | logloss | hit@1 | hit@5 | hit@10 | hit@50 | ndcg@5 | "
                                    "ndcg@10 | ndcg@50 | mrr |", "|" + "---|" * 12,
                                    "| model | 0.7123 |  |  |  |  |  |  |  |  |  | 0.2000 |"]
    assert "{" not in out and "split test; gsu exact; run r; data d" in out


@pytest.mark.slow
def test_world_and_build_print_only_the_projects_own_lines_on_stderr(tmp_path):
    """No TensorFlow / Beam / absl chatter (cuInit, cudart_stub, oneDNN, INFO logs) from world and build."""
    import re

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    own = re.compile(r"^(\[\d\d:\d\d:\d\d\] |WARNING: )")
    for argv in (["world", "--out", str(tmp_path / "w"), "--num-users", "5", "--num-items", "50"],
                 ["build", "--input", str(tmp_path / "w"), "--output", str(tmp_path / "d")]):
        run = subprocess.run([sys.executable, "-m", "seminar_tf", *argv], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env=env)
        assert run.returncode == 0, run.stderr
        assert [line for line in run.stderr.splitlines() if not own.match(line)] == [], run.stderr
