"""End-to-end `craft train`: the example configs, saved outputs, logging, pipeline / data parallelism, resume."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import torch
from test_engine_fixtures import REPO, basic_setup, losses_of, only_run, run_craft

from craft.cli import main
from craft.engine.checkpoint import read_rank_state
from craft.engine.config import TrainConfig
from craft.engine.train import eval_schedule, lr_at


def train_in_process(config: Path, *overrides: str) -> int:
    argv = ["train", str(config), "--no_progress"]
    for item in overrides:
        argv += ["--set", item]
    return main(argv)


def last_checkpoint_tensors(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    return read_rank_state(newest, rank)["model"]


def hf_name(pipeline_name: str, num_layers: int) -> str:
    """'3.layer.self_attn.q_proj.lora_A.default.weight' -> 'model.layers.2.self_attn.q_proj.lora_A...'."""
    item, rest = pipeline_name.split(".", 1)
    item = int(item)
    if item == 0 or (item == num_layers + 1 and not rest.startswith("lm_head")):
        return f"model.{rest}"
    if item == num_layers + 1:
        return rest
    return f"model.layers.{item - 1}.{rest.removeprefix('layer.')}"


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_lr_schedule_closed_form():
    config = TrainConfig(model_dir="m", output_dir="o", lora_rank=4, lr=1.0, sequence_len=8, warmup_steps=4,
                         datasets=[{"dataset_path": "x"}])
    assert [lr_at(s, 100, config) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = config.model_copy(update={"lr_scheduler": "cosine"})
    assert lr_at(4, 100, cosine) == pytest.approx(1.0)
    assert lr_at(52, 100, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 96)))
    assert lr_at(99, 100, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 95 / 96)))
    default = config.model_copy(update={"warmup_steps": None})
    assert lr_at(0, 40, default) == pytest.approx(0.5)  # warmup = min(100, 40 // 20) = 2 steps
    assert eval_schedule(100, 11) == set(range(0, 101, 10)) and eval_schedule(10, 0) == set()
    # evals_per_epoch = 2 over 2 epochs of 5 steps: 0, then e*5 + round(i*5/2) (round half to even: 2.5 -> 2)
    assert eval_schedule(10, 11, steps_per_epoch=5, evals_per_epoch=2) == {0, 2, 5, 7, 10}
    assert eval_schedule(8, 11, steps_per_epoch=5, evals_per_epoch=2) == {0, 2, 5, 7, 8}  # max_steps: the end too


EXAMPLES = ["lora", "qlora", "control_adapter", "full_finetune", "demo"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_config_runs_and_saves_a_loadable_result(tmp_path, monkeypatch, example):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)  # the examples use paths relative to the repository root
    config = REPO / "examples" / f"{example}.toml"
    assert f"craft train examples/{example}.toml" in config.read_text()  # the documented command
    evals = 2 if example in ("control_adapter", "demo") else 0
    assert train_in_process(config, f'output_dir="{tmp_path}"', "max_steps=2", "sequence_len=48",
                            f"evals_per_run={evals}", "eval_fraction=0.01") == 0
    run_dir = only_run(tmp_path)
    trained = last_checkpoint_tensors(run_dir)
    epoch = run_dir / "epoch1"
    base_dir = REPO / "examples" / "demo" / "base_model"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if example in ("lora", "qlora"):
        from peft import PeftModel

        loaded = dict(PeftModel.from_pretrained(base, epoch).named_parameters())
        for name, tensor in trained.items():
            peft_name = "base_model.model." + hf_name(name, 4)
            torch.testing.assert_close(loaded[peft_name], tensor, atol=0, rtol=0)
        assert any("lora_B" in n and t.abs().sum() > 0 for n, t in trained.items())  # it did train
    elif example in ("control_adapter", "demo"):
        from craft.adapters import control_adapters, load_control_adapter

        loaded = {f"model.layers.{a.layer_index}.control_adapter.{p}": getattr(a, p)
                  for a in control_adapters(load_control_adapter(base, epoch)) for p in ("A", "B")}
        # control_adapter.toml: layers_to_transform = "0:2"; demo.toml: all 4 layers
        assert len(loaded) == len(trained) == (6 if example == "control_adapter" else 8)
        for name, tensor in trained.items():
            torch.testing.assert_close(loaded[hf_name(name, 4)], tensor, atol=0, rtol=0)
        scalars = tensorboard_scalars(run_dir)
        expected = {"train/loss", "train/lr", "train/norm_avg", "train/norm_max", "train/weight_decay_avg",
                    "train/weight_decay_max", "train/aux_loss", "train/tokens_per_second", "eval/loss"}
        assert expected <= set(scalars)
        assert len(scalars["train/loss"]) == 2 and len(scalars["eval/loss"]) == 2
        assert all(v > 0 for v in scalars["train/weight_decay_max"] + scalars["train/norm_max"])
    else:
        loaded = AutoModelForCausalLM.from_pretrained(epoch, dtype=torch.float32).state_dict()
        original = base.state_dict()
        changed = 0
        for name, tensor in trained.items():
            torch.testing.assert_close(loaded[hf_name(name, 4)], tensor, atol=0, rtol=0)
            changed += not torch.equal(tensor, original[hf_name(name, 4)])
        assert changed == len(trained)  # every weight was trained
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "control"])
def test_two_pipeline_stages_give_the_losses_of_one(tmp_path, mode):
    """Same config: 1 stage in this process vs 2 stages in 2 processes (torchrun, gloo); 5 steps. With Control
    Adapters and neutral data, the class-0 aux gradient of stage 0 must reach its parameters as in one stage."""
    from test_engine_fixtures import write_texts

    from craft.testing import toy_texts

    extra = {"use_control_adapters": True, "control_class0_lambda": 5.0, "lr": 0.02} if mode == "control" else {}
    config = basic_setup(tmp_path, max_steps=5, evals_per_run=0, **extra)
    if mode == "control":
        neutral = write_texts(tmp_path / "data" / "neutral.json", toy_texts(48, "plain", seed=3))
        config.write_text(config.read_text() + f'[[datasets]]\ndataset_path = "{neutral}"\ncontrol_class = 0\n')
    assert train_in_process(config, f'output_dir="{tmp_path}/one"') == 0
    result = run_craft([str(config), "--set", f'output_dir="{tmp_path}/two"', "--set", "pipeline_stages=2",
                        "--no_progress"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses_of(only_run(tmp_path / "one")), losses_of(only_run(tmp_path / "two"))
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)
    assert one[5] != one[1]
    if mode == "control":
        records = [json.loads(line) for line in (only_run(tmp_path / "two") / "losses.jsonl").read_text().splitlines()]
        assert any(r["train_aux_loss"] > 0 for r in records[:-1])  # aux gradients shaped the later steps
    from safetensors.torch import load_file

    saved = [load_file(only_run(tmp_path / name) / "epoch1" / "adapter_model.safetensors") for name in ("one", "two")]
    assert saved[0].keys() == saved[1].keys() and len(saved[0]) == (28 if mode == "lora" else 4)
    for name in saved[0]:
        torch.testing.assert_close(saved[1][name], saved[0][name], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_data_parallel_replicas_end_identical(tmp_path):
    config = basic_setup(tmp_path, max_steps=3, evals_per_run=0, lora_dropout=0.1, lora_weight_decay=5.0)
    result = run_craft([str(config), "--no_progress"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path / "out")
    first, second = last_checkpoint_tensors(run_dir, 0), last_checkpoint_tensors(run_dir, 1)
    assert first.keys() == second.keys() and len(first) > 0
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(t.abs().sum() > 0 for n, t in first.items() if "lora_B" in n)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Checkpoint every step (tiny interval), dropout on (RNG must be restored). Kill inside the checkpoint write
    of step 3, resume, kill after step 5, resume to the end: same losses and adapter as an uninterrupted run."""
    config = basic_setup(tmp_path, max_steps=7, evals_per_run=0, lora_dropout=0.1, lora_weight_decay=5.0,
                         checkpoint_interval_hours=1e-9, max_checkpoints=2)
    assert train_in_process(config, f'output_dir="{tmp_path}/reference"') == 0
    reference_dir = only_run(tmp_path / "reference")

    killed = run_craft([str(config), "--no_progress"], env_extra={"CRAFT_KILL_IN_CHECKPOINT": "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = only_run(tmp_path / "out")
    assert (run_dir / "checkpoints" / ".tmp-step000000003").is_dir()  # the interrupted write
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step*"))] == ["step000000001", "step000000002"]

    killed = run_craft([str(config), "--no_progress", "--resume_from_checkpoint"],
                       env_extra={"CRAFT_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run_dir / "checkpoints" / ".tmp-step000000003").exists()
    assert main(["train", str(config), "--no_progress", "--resume_from_checkpoint"]) == 0

    reference, resumed = losses_of(reference_dir), losses_of(run_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, 8))
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 8))  # replayed steps are logged once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 8))  # TensorBoard too
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6), step
    final, expected = last_checkpoint_tensors(run_dir), last_checkpoint_tensors(reference_dir)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-7, rtol=1e-6)
    assert len(glob.glob(str(run_dir / "checkpoints" / "step*"))) == 2  # max_checkpoints


def test_symmetric_block_control_adapter_with_neumann_and_neutral_data(tmp_path):
    """Symmetric Control Adapter on whole blocks: trains, stays orthogonal (orthogonality step after each Adam
    step), logs a positive class-0 aux loss, and saves an adapter that loads."""
    from transformers import AutoModelForCausalLM

    from craft.adapters import control_adapters, load_control_adapter
    from craft.testing import toy_texts
    from test_engine_fixtures import write_texts

    config = basic_setup(tmp_path, n_texts=48, max_steps=4, evals_per_run=0, use_control_adapters=True,
                         control_adapter_type="symmetric", control_adapter_target="block", control_inverse="neumann",
                         control_class0_lambda=1.0, lr=0.05)
    neutral = write_texts(tmp_path / "data" / "neutral.json", toy_texts(48, "plain", seed=3))
    config.write_text(config.read_text() + f'[[datasets]]\ndataset_path = "{neutral}"\ncontrol_class = 0\n')
    assert train_in_process(config) == 0
    run_dir = only_run(tmp_path / "out")
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    # W = 0 until class +-1 tokens have moved S (it starts at 0); then neutral tokens see a non-zero aux loss
    assert any(r.get("train_aux_loss", 0) > 0 for r in records)
    model = load_control_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), run_dir / "epoch1")
    adapters = list(control_adapters(model))
    assert len(adapters) == 2 and all(a.type == "symmetric" for a in adapters)
    assert any(a.S.abs().sum() > 0 for a in adapters)  # it trained


def test_post_step_applies_weight_decay_and_orthogonality_step(tmp_path):
    """After Adam: lowrank pairs get A -= lr*lam*s*B^T W, B -= lr*lam*s*W A^T; symmetric Q -= gamma*Q(Q^T Q - I)."""
    from craft.adapters import control_adapters
    from craft.engine.model import load_stage
    from craft.engine.train import _post_step
    from test_engine_fixtures import write_model

    model_dir = write_model(tmp_path / "model")
    base = dict(model_dir=str(model_dir), output_dir="o", lora_rank=4, lr=1.0, sequence_len=16, model_dtype="float32",
                use_control_adapters=True, lora_weight_decay=3.0, datasets=[{"dataset_path": "x"}])
    torch.manual_seed(0)
    lowrank = load_stage(TrainConfig(**base), 0, 1)
    adapter = next(control_adapters(lowrank.base))
    torch.nn.init.normal_(adapter.B, std=0.5)
    a, b, s = adapter.A.detach().clone(), adapter.B.detach().clone(), adapter.scale
    w = s * b @ a
    amounts = _post_step(lowrank.base, TrainConfig(**base), 0.01, "control")
    step = 0.01 * 3.0
    torch.testing.assert_close(adapter.A.detach(), a - step * s * b.T @ w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter.B.detach(), b - step * s * w @ a.T, atol=1e-6, rtol=1e-5)
    assert len(amounts) == 2 and amounts[0] > 0 and amounts[1] == 0  # the second adapter still has B = 0

    symmetric_config = TrainConfig(**{**base, "control_adapter_type": "symmetric", "control_adapter_gamma": 0.2,
                                      "lora_weight_decay": 0.0})
    symmetric = load_stage(symmetric_config, 0, 1)
    adapter = next(control_adapters(symmetric.base))
    with torch.no_grad():
        adapter.Q.add_(0.1 * torch.randn_like(adapter.Q))
    q = adapter.Q.detach().clone()
    _post_step(symmetric.base, symmetric_config, 0.01, "control")
    expected = q - 0.2 * q @ (q.T @ q - torch.eye(4))
    torch.testing.assert_close(adapter.Q.detach(), expected, atol=1e-6, rtol=1e-5)


def test_bfloat16_base_with_kahan_summation_trains(tmp_path):
    """The default model dtype: bf16 base weights, full fine-tune (bf16 trainable weights -> Kahan summation)."""
    config = basic_setup(tmp_path, max_steps=3, evals_per_run=0, model_dtype="bfloat16", full_fine_tune=True,
                         lora_rank=None)
    assert train_in_process(config) == 0
    run_dir = only_run(tmp_path / "out")
    losses = losses_of(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    state = read_rank_state(sorted((run_dir / "checkpoints").glob("step*"))[-1], 0)
    assert all(t.dtype == torch.bfloat16 for t in state["model"].values())
    optimizer_state = state["optimizer"]["state"]
    assert optimizer_state and all(s["kahan_comp"] is not None for s in optimizer_state.values())


def test_qlora_losses_do_not_depend_on_the_eval_schedule(tmp_path):
    """An eval pass must not change later training steps (bitsandbytes' eval-mode repacking of 4-bit weights on
    AVX512-BF16 CPUs used to break the gradients of every step after the first eval)."""
    config = basic_setup(tmp_path, max_steps=4, load_in_4bit=True, lora_dropout=0.0)
    losses = []
    for evals in (0, 3):
        assert train_in_process(config, f"evals_per_run={evals}", f'output_dir="{tmp_path}/evals{evals}"') == 0
        losses.append(losses_of(only_run(tmp_path / f"evals{evals}")))
    assert sorted(losses[0]) == [1, 2, 3, 4]
    for step in losses[0]:
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-6, abs=1e-7), step


def test_quiet_run_prints_the_summary_and_the_skipped_eval_warning(tmp_path, capfd):
    """By default only craft's own lines; the eval split that fills no eval batch is a warning naming the keys;
    --verbose lets DeepSpeed print its layout again."""
    config = basic_setup(tmp_path, max_steps=1, eval_gradient_accumulation_steps=8)
    capfd.readouterr()
    assert train_in_process(config) == 0
    out, err = capfd.readouterr()
    assert len(out.splitlines()) == 4 and out.startswith("craft train: finished 1 steps"), out
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if "eval is skipped" in line]
    assert len(err.strip().splitlines()) == 1 and "eval_fraction" in err and "eval_gradient_accumulation_steps" in err
    assert main(["train", str(config), "--no_progress", "--verbose", "--set", f'output_dir="{tmp_path}/v"']) == 0
    assert "SEED_LAYERS" in capfd.readouterr().out


def test_resume_drops_the_replayed_and_torn_records(tmp_path):
    from craft.engine.train import _drop_records_after

    log = tmp_path / "losses.jsonl"
    log.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "train_loss": 1.9}\n'
                   '{"step": 4, "tra')  # killed in the middle of writing step 4
    _drop_records_after(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
