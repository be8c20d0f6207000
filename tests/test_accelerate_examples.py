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


def _launch(tmp_path, config: str, *launch_options: str, script_options=()):
    """The documented CPU launch: no `--cpu` (accelerate would start one plain process), 2 gloo ranks."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", f"examples/accelerate/{config}.yaml",
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               *launch_options, "examples/accelerate/train_craft.py", "--max_steps", "2",
               "--output_dir", str(tmp_path / "out"), *script_options]
    env = {**os.environ, **MULTIPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                           os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_example_script_trains_under_the_ddp_config_on_two_cpu_processes(tmp_path):
    proc = _launch(tmp_path, "ddp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "train_craft.py: engine ddp, 2 process(es), cpu" in proc.stdout  # two ranks, not one plain process
    assert (tmp_path / "out" / "craft_state.pt").is_file()
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.slow
def test_example_script_under_fsdp2_on_cpu_saves_a_plain_hf_model(tmp_path):
    """FSDP2 on CPU keeps sharded state dicts, under which the host Trainer's save_model writes no model at all;
    CRAFT gathers it (CRAFTSFTTrainer.save_model), so plain transformers loads it."""
    from transformers import AutoModelForCausalLM

    proc = _launch(tmp_path, "fsdp2", "--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "train_craft.py: engine fsdp2, 2 process(es), cpu" in proc.stdout
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (tmp_path / "out" / "craft_state.pt").is_file()


@pytest.mark.slow
def test_a_mistake_under_the_launcher_is_one_line_and_the_launchers_summary_names_it(tmp_path):
    """Every rank raises the same UserError; rank 0 prints it once and hands it to the launcher's error file, and
    the other rank waits for it, so accelerate's ChildFailedError summary gives that line as the root cause."""
    proc = _launch(tmp_path, "ddp", script_options=("--craft", "craft_alhpa=0.5"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in output.splitlines() if line.startswith("train_craft.py: error:")]
    assert len(lines) == 1 and "'craft_alhpa'; did you mean 'craft_alpha'?" in lines[0], output[-4000:]
    root_cause = output.split("Root Cause (first observed failure):", 1)[-1]
    assert f"traceback : {lines[0]}" in root_cause, output[-4000:]
    assert "exitcode  : 2" in root_cause
    assert str(REPO / "src" / "craft") not in output  # no traceback through craft on any rank


@pytest.mark.parametrize("environ, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "missing/zero2.json"},
     "deepspeed_config_file 'missing/zero2.json' does not exist"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version 1 cannot run CRAFT"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp2 on CPU needs fsdp_state_dict_type"),
])
def test_launch_environment_mistakes_are_one_user_error(environ, message):
    from craft.engines import check_launch_environment
    from craft.errors import UserError

    with pytest.raises(UserError, match=message):
        check_launch_environment(environ, accelerator_available=False)


def test_launch_environment_of_the_shipped_configs_passes(monkeypatch):
    from craft.engines import check_launch_environment

    monkeypatch.chdir(REPO)
    check_launch_environment({"ACCELERATE_USE_DEEPSPEED": "true",
                              "ACCELERATE_DEEPSPEED_CONFIG_FILE": "examples/accelerate/zero3.json"}, False)
    check_launch_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                              "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, False)
    check_launch_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, True)  # GPU: accelerate's call


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
