"""seminar-tf probe: cross-modal recall, label separation and neighbour purity of a run's item channels."""

import dataclasses
import json

import numpy as np
import pytest

from seminar_tf import cli, probe


def _clustered(n=240, labels=6, d=16, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    label = np.arange(n) % labels
    centres = rng.standard_normal([labels, d])
    return centres[label] + noise * rng.standard_normal([n, d]), label


def test_cross_modal_recall_is_one_for_identical_channels_and_near_chance_for_unrelated_ones():
    rng = np.random.default_rng(1)
    a = rng.standard_normal([300, 16])
    assert probe.cross_modal_recall(a, a) == 1.0
    assert probe.cross_modal_recall(a, 3.0 * a + 0.0) == 1.0  # cosine: the scale does not matter
    unrelated = probe.cross_modal_recall(a, rng.standard_normal([300, 16]))
    assert unrelated < 0.05  # chance is 1/128
    # a rotated copy is unrelated to a dot product until aligned (the world's misaligned image channel)
    rotation, _ = np.linalg.qr(rng.standard_normal([16, 16]))
    assert probe.cross_modal_recall(a, a @ rotation.T) < 0.1
    assert probe.cross_modal_recall(a, (a @ rotation.T) @ rotation) == 1.0


def test_candidates_never_include_the_item_itself():
    a = np.eye(4)  # with 3 candidates every other item competes; the own item must never be its own rival
    assert probe.cross_modal_recall(a, a, candidates=3) == 1.0
    with pytest.raises(ValueError, match="at least 2 items"):
        probe.cross_modal_recall(a[:1], a[:1])


def test_neighbour_purity_and_label_separation_follow_the_clusters():
    x, label = _clustered()
    assert probe.neighbour_purity(x, label, k=10) == 1.0
    shuffled = np.random.default_rng(2).permutation(label)
    assert probe.neighbour_purity(x, shuffled, k=10) < 0.3  # chance 1/6
    assert probe.label_separation(x, x, label) > 0.5
    assert abs(probe.label_separation(x, x, shuffled)) < 0.1
    with pytest.raises(ValueError, match="same label"):
        probe.label_separation(x[:3], x[:3], np.arange(3))


def test_probe_channels_reports_every_pair_channel_and_the_fused_item():
    x, label = _clustered()
    noise = np.random.default_rng(3).standard_normal(x.shape)
    result = probe.probe_channels({"text": x, "image": noise, "attributes": x + 0.01 * noise}, label, k=5)
    assert result["channels"] == ["attributes", "image", "text"]
    assert set(result["pairs"]) == {"attributes-image", "attributes-text", "image-text"}
    assert result["pairs"]["attributes-text"]["recall_at_1"] > 0.9
    assert result["pairs"]["image-text"]["recall_at_1"] < 0.05
    assert result["purity"]["text"] == 1.0 and result["purity"]["image"] < 0.4
    assert set(result["purity"]) == {"attributes", "image", "text", "fused"}
    assert result["purity_by_chance"] == pytest.approx(1 / 6)
    assert result["items"] == len(label) and result["labels"] == 6 and result["neighbours"] == 5


@pytest.mark.slow
def test_probe_cli_on_a_psu_run_with_the_worlds_topics_and_an_attribute(tmp_path, dataset_dir, world_dir,
                                                                        test_preset, capsys, cli_refuses):
    from seminar_tf import experiment
    from seminar_tf.data import reader, world

    preset = dataclasses.replace(test_preset)
    preset.pretrain = dataclasses.replace(preset.pretrain, epochs=1, steps_per_epoch=2, validation_steps=1, verbose=0)
    psu = str(tmp_path / "psu")
    experiment.pretrain(dataset_dir, psu, preset)
    out = tmp_path / "probe.json"
    assert cli.main(["probe", "--model-dir", psu, "--truth", world_dir, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    vocabulary = reader.load_vocabulary(dataset_dir, "items.txt")
    planted = set(world.load_truth(world_dir)["items"]["item_id"])
    assert result["items"] == sum(name in planted for name in vocabulary)
    assert result["stage"] == "pretrain" and result["label"].startswith("planted topic")
    assert {"text", "image", "attributes", "fused"} <= set(result["purity"])
    for value in [*result["purity"].values(), *(v["recall_at_1"] for v in result["pairs"].values())]:
        assert 0.0 <= value <= 1.0
    assert "| image-text |" in printed and "neighbour purity@10" in printed

    assert cli.main(["probe", "--model-dir", psu, "--label-attribute", "category_id"]) == 0
    assert "item attribute 'category_id'" in capsys.readouterr().out
    cli_refuses(["probe", "--model-dir", psu, "--label-attribute", "no_such"], "'no_such'.*category_id")
    with pytest.raises(SystemExit):  # one label source is required
        cli.main(["probe", "--model-dir", psu])
