"""Several epochs: every epoch gets a fresh pass over the data and saves its own output."""

from __future__ import annotations

import json

from test_engine_fixtures import basic_setup, only_run

from craft.cli import main


def test_three_epochs_train_every_step_and_save_each_epoch(tmp_path):
    config = basic_setup(tmp_path, n_texts=24, epochs=3, evals_per_run=2)
    assert main(["train", str(config), "--no_progress"]) == 0
    run_dir = only_run(tmp_path / "out")
    steps = [json.loads(line)["step"] for line in (run_dir / "losses.jsonl").read_text().splitlines()
             if "train_loss" in json.loads(line)]
    assert len(steps) % 3 == 0 and len(steps) >= 3, steps
    assert steps == list(range(1, len(steps) + 1))
    assert sorted(p.name for p in run_dir.glob("epoch*")) == ["epoch1", "epoch2", "epoch3"]
