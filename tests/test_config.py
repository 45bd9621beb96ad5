"""Configs: dotted ``--set SECTION.FIELD=VALUE`` overrides, parsed by each field's type, on every command."""

import argparse
import dataclasses
import json
import os

import pytest

from seminar_tf import cli, cli_args, config as config_lib, experiment, report


def test_overrides_are_parsed_by_the_fields_type():
    preset = config_lib.load_config("demo", [
        "model.top_k=32", "finetune.learning_rate=1e-3", "model.tower_units=128,64", "model.freeze_projections=true",
        "model.lora_rank=2",
        "model.gsu_category_prior=off", "model.lora_targets=text_encoder,image_encoder/mlp_output",
        "build.history_events=impression,click", "finetune.steps_per_epoch=none", "pretrain.steps_per_epoch=7",
        "world.num_users=50"])
    assert preset.model.top_k == 32 and preset.finetune.learning_rate == 1e-3
    assert preset.model.tower_units == (128, 64) and preset.model.freeze_projections is True
    assert preset.model.gsu_category_prior is False
    assert preset.model.lora_targets == ("text_encoder", "image_encoder/mlp_output")
    assert preset.build.history_events == ("impression", "click")
    assert preset.finetune.steps_per_epoch is None and preset.pretrain.steps_per_epoch == 7
    assert preset.world.num_users == 50
    untouched = config_lib.get_preset("demo")
    assert (preset.model.dim, preset.build.max_history) == (untouched.model.dim, untouched.build.max_history)


@pytest.mark.parametrize("text, message", [
    ("model.topk=3", r"model has no field 'topk'.*top_k"),
    ("model.top_k=many", r"model.top_k: 'many' is not a int"),
    ("model.freeze_content=maybe", r"model.freeze_content: 'maybe' is not a bool"),
    ("top_k=3", r"SECTION.FIELD=VALUE"),
    ("tower.units=3", r"SECTION one of"),
    ("build.max_history=0", r"--set build: .*max_history"),
])
def test_a_bad_override_names_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config("test", [text])


@pytest.mark.slow
def test_training_commands_apply_set_and_record_it(dataset_dir, tmp_path, cli_refuses):
    run = str(tmp_path / "run")
    assert cli.main(["finetune", "--data", dataset_dir, "--model-dir", run, "--config", "test", "--epochs", "1",
                     "--set", "model.top_k=7", "--set", "finetune.steps_per_epoch=2",
                     "--set", "finetune.validation_steps=1", "--set", "model.tower_units=8",
                     "--set", "build.num_negatives=9", "--set", "build.max_history=32"]) == 0
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["model"]["top_k"] == 7 and saved["model"]["tower_units"] == [8]
    assert saved["finetune"]["steps_per_epoch"] == 2 and saved["finetune"]["epochs"] == 1
    # The build section is the dataset's own (stats.json), except the history length the model read.
    built = json.load(open(os.path.join(dataset_dir, "stats.json")))["config"]
    assert saved["dataset"]["build"] == built and saved["dataset"]["dir"] == dataset_dir
    assert saved["build"] == {**built, "max_history": 32} and built["num_negatives"] != 9
    assert experiment.preset_of_run(run).build.max_history == 32
    cli_refuses(["pretrain", "--data", dataset_dir, "--model-dir", str(tmp_path / "psu"), "--config", "test",
                 "--set", "model.topk=7"], "model has no field 'topk'", code=2)
    assert not os.path.exists(tmp_path / "psu")


def test_the_beam_job_takes_build_overrides_only():
    parser = cli_args.add_build_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--input", "a", "--output", "b", "--max-history", "64", "--set", "build.max_history=9"])
    assert cli_args.build_config_from_args(args).max_history == 9
    args = parser.parse_args(["--input", "a", "--output", "b", "--set", "model.top_k=9"])
    with pytest.raises(ValueError, match="takes only build.FIELD=VALUE"):
        cli_args.build_config_from_args(args)


def test_flags_are_made_from_the_dataclasses_and_parsed_as_set_parses_them(capsys):
    """One mechanism (config_lib.add_dataclass_arguments) makes the Beam job's, world's and finetune's flags."""
    job = cli_args.add_build_arguments(argparse.ArgumentParser())
    args = job.parse_args(["--input", "a", "--output", "b", "--history-events", "impression, click",
                           "--valid-fraction", "0.2"])
    built = cli_args.build_config_from_args(args)
    assert built.history_events == ("impression", "click") and built.valid_fraction == 0.2
    assert built.max_history == config_lib.BuildConfig().max_history
    with pytest.raises(SystemExit):
        job.parse_args(["--input", "a", "--output", "b", "--max-history", "many"])
    assert "--max-history: 'many' is not a int" in capsys.readouterr().err

    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "--data", "d", "--top-k", "7", "--lora-targets", "text_encoder,image_encoder",
                              "--content-id-weight", "0.5", "--epochs", "3"])
    assert config_lib.given_fields(args, [*cli.FINETUNE_MODEL_FLAGS, *cli.EM3_FLAGS]) == {
        "top_k": 7, "lora_targets": ("text_encoder", "image_encoder"), "content_id_weight": 0.5}
    assert config_lib.given_fields(args, list(cli.TRAIN_FLAGS)) == {"epochs": 3}  # unset flags keep the preset's
    fields = {f.name for f in dataclasses.fields(config_lib.ModelConfig)}
    assert set(cli.EM3_FLAGS) | set(cli.FINETUNE_MODEL_FLAGS) <= fields
    world = parser.parse_args(["world", "--out", "w", "--num-users", "12"])
    assert world.num_users == 12


def test_report_and_bench_carry_set_into_their_config_and_command(tmp_path, cli_refuses):
    parser = cli.build_parser()
    args = parser.parse_args(["report", "--data", "d", "--out", "o", "--config", "test", "--set", "model.top_k=5"])
    grid = report.GridConfig(data_dir="d", out_dir="o", config="test", overrides=tuple(args.set))
    assert report._base_preset(grid).model.top_k == 5
    assert "--set model.top_k=5" in report._reconstruct_command(args)
    from seminar_tf.bench import movielens

    bench = movielens.MovieLensBenchConfig(overrides=("finetune.epochs=2",))
    assert bench.cli() == "seminar-tf bench movielens --set finetune.epochs=2"
    cli_refuses(["report", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "model.nope=1"], "no field",
                code=2)


@pytest.mark.parametrize("changes, message", [
    (dict(architecture="dien"), "model.architecture 'dien'"),
    (dict(gsu="ivf"), "model.gsu 'ivf'"),
    (dict(align_negatives="users"), "model.align_negatives 'users'"),
    (dict(simhash_bits=0), "simhash_bits"),
    (dict(architecture="din", content_id_weight=0.1), r"EM3 options \['content_id_weight'\] \(--content-id-weight\)"),
    (dict(lora_rank=2, freeze_content=True), "contradict"),
    (dict(lora_rank=2, lora_targets=("tower",)), "lora_targets"),
    (dict(fusion_queries=2, gsu="pq_adc"), "needs model.gsu 'exact'"),
    (dict(item_statistics_columns=("log_rate",)), r"model.item_statistics_columns \['log_rate'\]"),
    (dict(item_statistics_columns=("log_count", "log_count")), "each once"),
])
def test_model_config_validate_is_the_one_check(changes, message):
    import dataclasses

    bad = dataclasses.replace(config_lib.ModelConfig(), **changes)
    with pytest.raises(ValueError, match=message):
        bad.validate()
    with pytest.raises(ValueError, match=message):  # --set reaches the same check
        config_lib.apply_overrides(config_lib.get_preset("test"), [
            f"model.{k}={','.join(v) if isinstance(v, tuple) else str(v).lower()}" for k, v in changes.items()])


def test_every_preset_validates_and_names_match_the_models():
    from seminar_tf.models import baselines, seminar

    for name in config_lib.PRESETS:
        config_lib.get_preset(name).model.validate()
    assert set(config_lib.ARCHITECTURES) == set(baselines.MODELS)
    assert config_lib.GSU_MODES == seminar.GSU_MODES


def test_aux_scope_of_the_presets():
    # top_k where the preset meets lifelong lengths (paper_kuaisar, chosen on valid at L=10^4); the paper's
    # read-out over the whole history where histories are short (the MovieLens report was trained with it)
    scopes = {name: config_lib.get_preset(name).model.aux_scope for name in config_lib.PRESETS}
    assert scopes == {"test": "history", "demo": "history", "paper_kuaisar": "top_k", "paper_amazon": "history",
                      "movielens": "history"}
    assert config_lib.ModelConfig().aux_scope == "history"
    with pytest.raises(ValueError, match="model.aux_scope 'all'"):
        config_lib.apply_overrides(config_lib.get_preset("test"), ["model.aux_scope=all"])
