"""Shared test set-up: seminar_tf first (selects tf-keras), quiet TensorFlow logs."""

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import seminar_tf  # noqa: E402,F401  (must precede any TensorFlow import)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def test_preset():
    from seminar_tf import config

    return config.get_preset("test")


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory, test_preset):
    """Raw files of the `test` preset's synthetic world (generated once per session)."""
    from seminar_tf.data.world import generate_world

    out = str(tmp_path_factory.mktemp("world"))
    generate_world(test_preset.world, out)
    return out


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, world_dir, test_preset):
    """The Beam pipeline's output for ``world_dir`` (built once per session, FnApiRunner)."""
    from beam_pipelines.build_dataset import build_dataset

    out = str(tmp_path_factory.mktemp("dataset"))
    build_dataset(world_dir, out, test_preset.build, pipeline_args=["--runner=FnApiRunner"])
    return out


@pytest.fixture
def cli_refuses(capsys):
    """``cli_refuses(argv, match, code=None)``: runs ``seminar-tf ARGV`` (``cli.main``) and asserts that it exits
    non-zero (with ``code`` when given) after at most three lines on stderr, no traceback, matching ``match``;
    returns stderr."""
    from seminar_tf import cli

    def run(argv, match, code=None):
        capsys.readouterr()
        try:
            result = cli.main(argv)
        except SystemExit as stop:  # argparse's own usage errors
            result = stop.code
        err = capsys.readouterr().err
        assert result != 0 and (code is None or result == code), (result, err)
        assert re.search(match, err), err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
        return err

    return run
