"""2 pipeline stages (2 processes, gloo, one torchrun launch): checkpointing, offload and the chunked loss train
exactly like the plain pipeline. Control Adapters on +1 / -1 / 0 data with the class-0 aux loss and dropout,
gradient accumulation 4, so DeepSpeed's 1F1B schedule runs later micro-batches' forwards before an earlier one's
recompute (each recompute must still see its own micro-batch's classes), and stage 0's aux loss is counted once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine_fixtures import REPO, _free_port, basic_setup, losses_of, only_run, write_texts

from craft.testing import toy_texts


@pytest.mark.slow
def test_two_stages_train_alike_in_every_memory_mode(tmp_path):
    config = basic_setup(tmp_path, max_steps=3, evals_per_run=0, use_control_adapters=True, lora_dropout=0.1,
                         control_class0_lambda=5.0, lr=0.02, gradient_accumulation_steps=4, micro_batch_size=2)
    for name, style, control_class in (("negative", "formal", -1), ("neutral", "plain", 0)):
        path = write_texts(tmp_path / "data" / f"{name}.json", toy_texts(48, style, seed=3))
        config.write_text(config.read_text() + f'[[datasets]]\ndataset_path = "{path}"\ncontrol_class = {control_class}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    worker = Path(__file__).with_name("engine_memory_worker.py")
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(_free_port()), str(worker), str(config)], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = launch.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # torchrun and both workers: none may outlive the test
        launch.communicate()
        raise
    assert launch.returncode == 0, stderr[-3000:]
    from safetensors.torch import load_file

    runs = {name: only_run(tmp_path / name) for name in ("plain", "checkpointed", "offloaded")}
    losses = {name: losses_of(run) for name, run in runs.items()}
    records = [json.loads(line) for line in (runs["plain"] / "losses.jsonl").read_text().splitlines()]
    aux = {name: [json.loads(line)["train_aux_loss"] for line in (run / "losses.jsonl").read_text().splitlines()]
           for name, run in runs.items()}
    assert all(r["train_aux_loss"] > 0 for r in records[1:])  # B = 0 at the start: no aux before step 2
    adapters = {name: load_file(run / "epoch1" / "adapter_model.safetensors") for name, run in runs.items()}
    assert len(adapters["plain"]) == 4
    for name in ("checkpointed", "offloaded"):
        assert sorted(losses[name]) == [1, 2, 3]
        for step, value in losses["plain"].items():
            assert losses[name][step] == pytest.approx(value, rel=1e-5), (name, step)
        assert aux[name] == pytest.approx(aux["plain"], rel=1e-5)
        for key, tensor in adapters["plain"].items():
            torch.testing.assert_close(adapters[name][key], tensor, atol=1e-5, rtol=1e-5)
    assert losses["plain"][3] != losses["plain"][1]
