"""`craft train` under the launchers: the documented `deepspeed --num_gpus N --module craft train CFG` runs, and
an error found on one rank only is printed once, by rank 0, with every rank exiting with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine_fixtures import REPO, _free_port, basic_setup, only_run, run_craft


@pytest.mark.slow
def test_deepspeed_launcher_trains_and_a_one_rank_error_prints_once(tmp_path):
    config = basic_setup(tmp_path, max_steps=2, evals_per_run=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "craft", "train",
               str(config), "--no_progress"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("craft train: finished 2 steps") == 1  # the summary comes from rank 0 only
    for noise in ("SEED_LAYERS", "DecoderLayerPipe", "kernels-community", "built successfully", "FutureWarning"):
        assert noise not in result.stdout + result.stderr, noise  # quiet: third-party lines only with --verbose
    run_dir = only_run(tmp_path / "out")
    assert [json.loads(line)["step"] for line in (run_dir / "losses.jsonl").read_text().splitlines()] == [1, 2]
    checkpoint = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    assert json.loads((checkpoint / "meta.json").read_text())["layout"]["world_size"] == 2

    # Rank 1's file now disagrees with the run in one tensor's shape: only rank 1 can see it.
    rank1 = checkpoint / "rank00001.safetensors"
    tensors = load_file(rank1)
    name = next(n for n in sorted(tensors) if "lora_A" in n)
    tensors[name] = torch.zeros(tensors[name].numel() // 2, 2 * tensors[name].shape[-1])
    save_file(tensors, rank1)
    failed = run_craft([str(config), "--no_progress", "--resume_from_checkpoint"], nproc=2)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    lines = [line for line in output.splitlines() if line.startswith("craft train: error:")]
    assert len(lines) == 1 and f"tensor '{name.removeprefix('state.model.')}'" in lines[0], output[-3000:]
    assert f"traceback : {lines[0]}" in output  # torchrun's failure report names the cause (error file)
    assert "exitcode  : -15" not in output  # no rank was killed before it could exit with status 2
    assert str(REPO / "src" / "craft") not in output  # no traceback through craft on any rank


@pytest.mark.parametrize("world_size, as_program, leaves", [("2", True, True), ("1", True, False),
                                                            ("2", False, False)])
def test_a_launched_process_leaves_without_python_finalization(monkeypatch, world_size, as_program, leaves):
    """Under a launcher (WORLD_SIZE > 1) the `craft` program ends with os._exit(status): DeepSpeed's process groups
    outlive destroy_process_group, and their gloo threads racing Python's finalization aborted finished ranks.
    A caller of craft.cli.main(argv) in-process (or a single process) gets the status back as before."""
    import craft.cli
    import craft.shutdown

    left = []
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(craft.cli, "_run_subcommand", lambda argv: 2)
    monkeypatch.setattr(craft.shutdown.os, "_exit", left.append)
    monkeypatch.setattr(craft.cli.sys, "argv", ["craft", "plan", "x.toml"])
    assert craft.cli.main(None if as_program else ["plan", "x.toml"]) == 2
    assert left == ([2] if leaves else [])
