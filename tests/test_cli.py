"""The `seminar-tf` console script: --help on every subcommand, and a tiny world → build run."""

import json
import os
import subprocess
import sys

import pytest

from seminar_tf import cli, schema

SUBCOMMANDS = ["world", "build", "pretrain", "finetune", "evaluate", "fit-codebooks", "export", "serve", "query", "demo",
               "bench"]


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
              "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], 'tensorflow' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=root,
                           env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert shown.stdout.split() == ["0", "True"]  # a level the user set is kept


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
    stats = json.loads((data / schema.STATS_FILE).read_text())
    assert stats["rows_read"]["events"] > 0
    for table, read in stats["rows_read"].items():
        dead = sum(stats["dead_letters"].get(table, {}).values())
        assert read == stats["rows_ok"][table] + dead
    assert sum(stats["samples"]["ctr"].values()) > 0
    metadata = schema.DatasetMetadata.from_json((data / schema.METADATA_FILE).read_text())
    assert metadata.max_history == 16 and set(metadata.channels) == set(schema.CHANNELS)
