"""EM3 options and SEMINAR ablations end to end on the `test` preset: config → builders → experiment → CLI."""

import contextlib
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import yaml

from seminar_tf import cli, config as config_lib, experiment, schema
from seminar_tf.data import reader
from seminar_tf.layers.em3 import LoRADense
from seminar_tf.models.em3 import EM3SeminarModel
from seminar_tf.models.seminar import SeminarModel

NO_QUERY = ("text", "image", "attributes")
FAST = dict(epochs=1, steps_per_epoch=2, validation_steps=1)


def _fast(preset, **model):
    preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, **model),
                                 pretrain=dataclasses.replace(preset.pretrain, **FAST),
                                 finetune=dataclasses.replace(preset.finetune, **FAST))
    return preset


def _printed_metrics(stdout: str) -> dict:
    """The last epoch's metrics the pretrain / finetune commands print as JSON after Keras' progress lines."""
    return json.loads(stdout[stdout.index("{\n"):])


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory):
    """A YAML config file: the `test` preset with 2 training steps and 1 validation step per stage."""
    path = str(tmp_path_factory.mktemp("config") / "fast.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"base": "test", "pretrain": FAST, "finetune": FAST}, f)
    return path


@pytest.fixture(scope="module")
def psu_ablated(tmp_path_factory, dataset_dir, fast_config):
    """A PSU run without the alignment loss, the relevance loss and the query channel (CLI flags)."""
    run = str(tmp_path_factory.mktemp("psu") / "psu")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["pretrain", "--data", dataset_dir, "--model-dir", run, "--config", fast_config,
                         "--no-alignment", "--no-relevance", "--no-query-channel"]) == 0
    return run, _printed_metrics(printed.getvalue())


def _batch(dataset_dir, preset):
    return next(iter(reader.make_dataset(dataset_dir, schema.CTR_DIR, "test", 8,
                                         max_history=preset.build.max_history)))


def _assert_reloads(model, run, dataset_dir, preset):
    batch = _batch(dataset_dir, preset)
    loaded, loaded_preset, _ = experiment.load_model(run)
    assert type(loaded) is type(model) and loaded_preset.model == preset.model
    np.testing.assert_allclose(loaded(batch)["logit"], model(batch)["logit"], rtol=1e-5, atol=1e-6)
    return loaded


# ---------------------------------------------------------------------------------------------------------
# Ablations through the CLI
@pytest.mark.slow
def test_pretrain_ablation_flags_set_the_config_and_drop_those_losses(psu_ablated):
    psu_ablated, metrics = psu_ablated
    config = experiment.read_run_config(psu_ablated)["model"]
    assert config["align_weight"] == 0.0 and config["relevance_weight"] == 0.0
    assert tuple(config["channels"]) == NO_QUERY
    assert tf.io.gfile.exists(os.path.join(psu_ablated, experiment.CONTENT_CHECKPOINT) + ".index")
    content, _, _, stage = experiment.load_content(psu_ablated)
    assert stage == "pretrain" and content.channels == list(NO_QUERY) and not hasattr(content, "query_encoder")
    # Only the next-pair loss trains: the alignment and query-item relevance losses are off.
    assert metrics["val_next_pair_loss"] > 0
    assert metrics["val_loss"] == pytest.approx(metrics["val_next_pair_loss"], rel=1e-5)  # one validation batch
    assert metrics["alignment_loss"] == 0 and metrics["query_item_loss"] == 0


@pytest.mark.slow
def test_finetune_without_query_channel_restores_the_ablated_psu_with_em3_flags(
        psu_ablated, dataset_dir, fast_config, tmp_path, capsys):
    psu_ablated, _ = psu_ablated
    run = str(tmp_path / "ctr")
    capsys.readouterr()
    assert cli.main(["finetune", "--data", dataset_dir, "--model-dir", run, "--config", fast_config,
                     "--init-from", psu_ablated, "--no-query-channel", "--fusion-queries", "2", "--fusion-layers", "2",
                     "--content-id-weight", "0.3", "--content-id-temperature", "0.2", "--lora-rank", "2",
                     "--lora-alpha", "4", "--lora-targets", "text_encoder, image_encoder/mlp_output"]) == 0
    metrics = _printed_metrics(capsys.readouterr().out)
    assert np.isfinite(metrics["loss"]) and metrics["content_id_loss"] > 0 and 0 <= metrics["auc"] <= 1
    saved = experiment.read_run_config(run)
    assert saved["init_from"] == psu_ablated
    model_config = saved["model"]
    assert tuple(model_config["channels"]) == NO_QUERY
    assert (model_config["fusion_queries"], model_config["fusion_layers"]) == (2, 2)
    assert (model_config["content_id_weight"], model_config["content_id_temperature"]) == (0.3, 0.2)
    assert (model_config["lora_rank"], model_config["lora_alpha"]) == (2, 4.0)
    assert model_config["lora_targets"] == ["text_encoder", "image_encoder/mlp_output"]
    model, _, _ = experiment.load_model(run)
    assert isinstance(model, EM3SeminarModel) and model.channels == ["fused_0", "fused_1", "attributes"]
    assert model.fusion.num_layers == 2 and model.content_id_task is not None
    content = model.content
    assert isinstance(content.text_encoder.projection, LoRADense) and content.text_encoder.projection.scale == 2.0
    assert isinstance(content.image_encoder.mlp_output, LoRADense)
    assert not isinstance(content.attribute_encoder.projection, LoRADense)


@pytest.mark.parametrize("argv, message", [
    (["--model", "din", "--fusion-queries", "2"],
     r"EM3 options \['fusion_queries'\] \(--fusion-queries\) are for architecture 'seminar'"),
    (["--lora-rank", "2", "--freeze", "content"], r"--lora-rank\) and .*\(--freeze content\) contradict"),
    (["--lora-rank", "2", "--lora-targets", "tower"], "lora_targets"),
    (["--lora-targets", "text_encoder"], "needs model.lora_rank"),
    (["--fusion-queries", "-1"], "fusion_queries must be >= 0"),
    (["--content-id-weight", "0.1", "--content-id-temperature", "0"], "content_id_temperature must be > 0"),
])
def test_finetune_rejects_contradictory_em3_flags_before_training(argv, message, dataset_dir, tmp_path, cli_refuses):
    cli_refuses(["finetune", "--data", dataset_dir, "--model-dir", str(tmp_path / "run"), "--config", "test"] + argv,
                message, code=2)
    assert not os.path.exists(tmp_path / "run")


def test_lora_with_a_frozen_content_is_an_error_in_experiment_too(dataset_dir, test_preset, tmp_path):
    preset = _fast(test_preset, lora_rank=2, freeze_content=True)
    with pytest.raises(ValueError, match="lora_rank.*freeze_content.*contradict"):
        experiment.finetune(dataset_dir, str(tmp_path / "run"), preset)


# ---------------------------------------------------------------------------------------------------------
# EM3 options through experiment.finetune
@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(fusion_queries=2, fusion_layers=1), dict(content_id_weight=0.5)],
                         ids=["fusion", "content_id"])
def test_em3_option_trains_and_load_model_reproduces_it(options, dataset_dir, test_preset, tmp_path):
    preset = _fast(test_preset, **options)
    run = str(tmp_path / "run")
    result = experiment.finetune(dataset_dir, run, preset)
    model = result["model"]
    assert isinstance(model, EM3SeminarModel)
    assert np.isfinite(result["history"]["loss"]).all()
    if "fusion_queries" in options:
        assert model.fusion.num_queries == 2 and model.channels == ["query", "fused_0", "fused_1", "attributes"]
        assert model.content_id_task is None and "content_id_loss" not in result["history"]
    else:
        assert model.fusion is None and model.content_id_task is not None
        assert model.content_id_weight == 0.5 and result["history"]["content_id_loss"][0] > 0
    _assert_reloads(model, run, dataset_dir, preset)


@pytest.mark.slow
def test_lora_finetune_from_the_ablated_psu_trains_only_adapters_and_reloads(
        psu_ablated, dataset_dir, test_preset, tmp_path):
    psu_ablated, _ = psu_ablated
    preset = _fast(test_preset, channels=NO_QUERY, lora_rank=2, lora_alpha=4.0)
    run = str(tmp_path / "run")
    result = experiment.finetune(dataset_dir, run, preset, init_from=psu_ablated)
    model = result["model"]
    assert type(model) is SeminarModel and model.channels == list(NO_QUERY)
    adapters = [m for m in model.content.submodules if isinstance(m, LoRADense)]
    assert len(adapters) == 4 and all(a.scale == 2.0 for a in adapters)  # text, image ×2, attributes
    assert all(np.abs(a.lora_b.numpy()).max() > 0 for a in adapters)  # B started at zero and trained
    adapter_ids = {id(v) for a in adapters for v in (a.lora_a, a.lora_b)}
    assert {id(v) for v in model.content.trainable_variables} == adapter_ids

    # Every PSU content weight is unchanged after training (a wrapped Dense's weights sit under ".../base/...").
    trained_path = tf.train.Checkpoint(content=model.content).write(str(tmp_path / "trained"))
    trained = tf.train.load_checkpoint(trained_path)
    psu = tf.train.load_checkpoint(os.path.join(psu_ablated, experiment.CONTENT_CHECKPOINT))
    compared = 0
    for key, _ in tf.train.list_variables(trained_path):
        if "VARIABLE_VALUE" not in key or "lora_" in key:
            continue
        psu_key = key.replace("/base/", "/")
        np.testing.assert_array_equal(trained.get_tensor(key), psu.get_tensor(psu_key), err_msg=key)
        compared += 1
    base_keys = sum("/base/" in key for key, _ in tf.train.list_variables(trained_path))
    assert base_keys == sum(len(a.base.weights) for a in adapters) and compared > base_keys  # embeddings too
    loaded = _assert_reloads(model, run, dataset_dir, preset)
    assert sum(isinstance(m, LoRADense) for m in loaded.content.submodules) == 4


@pytest.mark.slow
def test_freeze_pretrained_content_freezes_only_a_psu_initialised_run(
        psu_ablated, dataset_dir, test_preset, tmp_path):
    psu_ablated, _ = psu_ablated
    preset = _fast(test_preset, channels=NO_QUERY, freeze_pretrained_content=True)
    restored = experiment.finetune(dataset_dir, str(tmp_path / "restored"), preset, init_from=psu_ablated)
    model = restored["model"]
    assert not model.content.trainable and not model.content.trainable_variables
    saved = json.load(open(tmp_path / "restored" / "config.json"))["model"]
    assert saved["freeze_content"] is True and saved["freeze_pretrained_content"] is True
    assert preset.model.freeze_content is False  # the caller's preset is not changed
    psu = tf.train.load_checkpoint(os.path.join(psu_ablated, experiment.CONTENT_CHECKPOINT))
    trained_path = tf.train.Checkpoint(content=model.content).write(str(tmp_path / "trained"))
    trained = tf.train.load_checkpoint(trained_path)
    keys = [key for key, _ in tf.train.list_variables(trained_path) if "VARIABLE_VALUE" in key]
    assert keys
    for key in keys:  # the PSU content is unchanged after training
        np.testing.assert_array_equal(trained.get_tensor(key), psu.get_tensor(key), err_msg=key)

    scratch = experiment.finetune(dataset_dir, str(tmp_path / "scratch"), preset)["model"]
    assert scratch.content.trainable and scratch.content.trainable_variables  # nothing restored: it trains
    assert json.load(open(tmp_path / "scratch" / "config.json"))["model"]["freeze_content"] is False


def test_preset_from_yaml_reads_the_em3_fields(tmp_path):
    path = tmp_path / "em3.yaml"
    path.write_text(yaml.safe_dump({"base": "test", "model": {
        "lora_rank": 4, "lora_targets": ["text_encoder", "image_encoder/mlp_output"], "fusion_queries": 3,
        "content_id_weight": 0.2, "align_weight": 0.0, "channels": list(NO_QUERY)}}))
    preset = config_lib.load_config(str(path))
    assert preset.model.lora_targets == ("text_encoder", "image_encoder/mlp_output")
    assert preset.model.channels == NO_QUERY
    assert (preset.model.lora_rank, preset.model.fusion_queries, preset.model.content_id_weight) == (4, 3, 0.2)
    assert preset.model.lora_alpha == 0.0 and preset.model.fusion_layers == 1
    assert config_lib.Preset.from_dict(preset.to_dict()) == preset


@pytest.mark.parametrize("name", ["paper_kuaisar", "paper_amazon"])
def test_paper_presets_do_not_inherit_the_demo_worlds_choices(name):
    """The paper presets derive from `demo`; the choices made on the demo world's validation split must not leak."""
    assert config_lib.get_preset("demo").model.freeze_pretrained_content
    model = config_lib.get_preset(name).model
    assert (model.align_negatives, model.align_projection) == ("sequence", False)
    assert not (model.category_affinity or model.gsu_category_prior or model.freeze_pretrained_content
                or model.freeze_content)
