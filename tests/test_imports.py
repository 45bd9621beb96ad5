"""Module structure: the config module is a leaf (no TensorFlow, no Beam), so configs load anywhere."""

import subprocess
import sys


def test_config_imports_neither_tensorflow_nor_beam():
    code = ("import sys; import seminar_tf.config as c; c.get_preset('movielens'); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'apache_beam', 'keras', "
            "'tf_keras', 'beam_pipelines', 'numpy')); print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_stage_modules_reexport_the_config_classes():
    from beam_pipelines import build_dataset
    from seminar_tf import config, train
    from seminar_tf.data import world

    assert build_dataset.BuildConfig is config.BuildConfig
    assert world.WorldConfig is config.WorldConfig
    assert train.TrainConfig is config.TrainConfig
