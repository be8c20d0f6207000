"""examples/accelerate: each config parses with accelerate's own loader and names its engine, and the example
script they launch trains (2 CPU processes, DDP config, tiny local model: no hub download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "accelerate"
sys.path.insert(0, str(Path(__file__).parent))
from craft_scale_helpers import MULTIPROCESS_ENV, free_port  # noqa: E402

# config -> (accelerate distributed type, ZeRO stage or FSDP version)
ENGINES = {"ddp": ("MULTI_GPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3), "fsdp2": ("FSDP", 2)}


@pytest.mark.parametrize("name", list(ENGINES))
def test_config_parses_and_names_its_engine(name, monkeypatch):
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)  # the DeepSpeed json paths are relative to the repository root
    path = EXAMPLES / f"{name}.yaml"
    config = load_config_from_file(str(path))
    kind, detail = ENGINES[name]
    assert str(config.distributed_type).split(".")[-1] == kind
    if kind == "DEEPSPEED":
        with open(config.deepspeed_config["deepspeed_config_file"]) as handle:
            assert json.load(handle)["zero_optimization"]["stage"] == detail
    if kind == "FSDP":
        assert int(config.fsdp_config["fsdp_version"]) == detail
    text = path.read_text()
    assert f"accelerate launch --config_file examples/accelerate/{name}.yaml examples/accelerate/train_craft.py" in text
    assert f"examples/accelerate/{name}.yaml" in (REPO / "docs" / "craft_scale.md").read_text()


@pytest.mark.slow
def test_example_script_trains_under_the_ddp_config_on_two_cpu_processes(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", "examples/accelerate/ddp.yaml", "--cpu",
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               "examples/accelerate/train_craft.py", "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, **MULTIPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                           os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "craft_state.pt").is_file()
    assert (tmp_path / "out" / "config.json").is_file()


def test_fsdp2_on_cpu_refuses_full_state_dicts_before_training():
    """FSDP2 runs on CPU (craft.engines.enable_cpu_fsdp2) with sharded state dicts only; a full one is a UserError
    naming the engine and the setting, raised when the trainer builds its Accelerator."""
    from types import SimpleNamespace

    from craft.engines import enable_cpu_fsdp2
    from craft.errors import UserError

    trainer = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(device=SimpleNamespace(type="cpu")),
                              args=SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2,
                                                                "state_dict_type": "FULL_STATE_DICT"}))
    with pytest.raises(UserError, match="fsdp2 on CPU needs fsdp_config state_dict_type 'SHARDED_STATE_DICT'"):
        enable_cpu_fsdp2(trainer)
    trainer.args.fsdp_plugin_args = {"fsdp_version": 1}
    enable_cpu_fsdp2(trainer)  # FSDP1 stays off here: check_engine_support refuses it with its own message
    assert not trainer.is_fsdp_enabled
