"""Tuning reports (seminar_tf/bench/tuning_report.py): the Markdown renders from the JSON alone, through
``seminar-tf render`` too."""

import json

from seminar_tf import cli
from seminar_tf.bench import stamp, tuning_report


def _report():
    rows = [{"label": f"{scope} s{seed}", "settings": [f"model.aux_scope={scope}"], "seed": seed,
             "preset": "paper_kuaisar",
             "val_auc_by_epoch": values, "ms_per_step": [200, 180], "command": f"seminar-tf finetune --seed {seed}"}
            for scope, seed, values in (("top_k", 0, [0.61, 0.63]), ("top_k", 1, [0.60, 0.59]),
                                        ("history", 0, [0.62, 0.60]), ("history", 1, []))]
    return {"benchmark": "tuning", **stamp.stamp("seminar-tf finetune (4 runs)"), "title": "the aux scope",
            "question": "which scope?", "protocol": "valid split only", "rows": rows,
            "choice": {"setting": "model.aux_scope=top_k", "where": "paper_kuaisar", "why": "faster, no worse."}}


def test_tuning_report_renders_rows_means_and_choice(tmp_path):
    text = stamp.write(_report(), str(tmp_path), "tuning.json")
    assert (tmp_path / "tuning.md").read_text(encoding="utf-8") == text
    lines = text.splitlines()
    assert "| top_k s0 | `model.aux_scope=top_k` | 0 | 0.6100, 0.6300 | 0.6300 | 200, 180 |" in lines
    assert "| history s1 | `model.aux_scope=history` | 1 | — | — | 200, 180 |" in lines  # a run with no epoch
    assert "| paper_kuaisar | model.aux_scope=top_k | 2 | 0.6150 |" in lines  # mean of the best epochs (0.63, 0.60)
    assert "| paper_kuaisar | model.aux_scope=history | 1 | 0.6200 |" in lines
    assert "Choice: `model.aux_scope=top_k` in paper_kuaisar. faster, no worse." in lines
    assert tuning_report.best([]) is None
    assert cli.main(["render", str(tmp_path / "tuning.json")]) == 0
    assert json.loads((tmp_path / "tuning.json").read_text())["benchmark"] == "tuning"
