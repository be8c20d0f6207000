"""`craft plan`: predicted per-stage peaks against peaks measured on CPU, its closed-form terms, and the command."""

from __future__ import annotations

import sys

import pytest
from test_engine_fixtures import REPO, basic_setup

from craft.cli import main
from craft.engine import train as train_module
from craft.engine.config import load_config
from craft.engine.model import read_hf_config
from craft.engine.plan import GIB, parse_size, plan
from craft.errors import UserError
from craft.testing import save_tiny_model

sys.path.insert(0, str(REPO / "bench"))
from common import allocated_peak_bytes  # noqa: E402

SHAPES = [  # sequence length, vocabulary, rank, checkpointing, chunk_size, and a few other keys
    dict(seq=256, vocab=4096, rank=8, checkpointing="false", chunk=0),
    dict(seq=512, vocab=16384, rank=8, checkpointing="true", chunk=64),
    dict(seq=512, vocab=8192, rank=16, checkpointing='"offload"', chunk=0),
    dict(seq=384, vocab=4096, rank=4, checkpointing="false", chunk=128, use_control_adapters=True),
    dict(seq=256, vocab=4096, rank=4, checkpointing="true", chunk=128, gradient_accumulation_steps=3,
         micro_batch_size=2),
]


def _distinct_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"seq{s['seq']}-V{s['vocab']}-r{s['rank']}-{s['checkpointing']}")
def test_prediction_within_25_percent_of_the_measured_peak(tmp_path, monkeypatch, shape):
    """Measured peak = the bytes the stage's parameters and buffers hold + the peak the first optimizer step adds
    (torch's CPU allocator: every allocation and free the profiler records, in time order)."""
    measured = []
    step = train_module.TrainingRun.step

    def measuring_step(self, batches):
        if not measured:
            held = _distinct_bytes([*self.module.parameters(), *self.module.buffers()])
            measured.append(held + allocated_peak_bytes(lambda: step(self, batches)))
        else:
            step(self, batches)

    monkeypatch.setattr(train_module.TrainingRun, "step", measuring_step)
    save_tiny_model(tmp_path / "model", "llama", hidden_size=128, num_layers=4, vocab_size=shape["vocab"],
                    intermediate_size=448, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024)
    extra = {"gradient_accumulation_steps": 1,
             **{k: v for k, v in shape.items() if k not in ("seq", "vocab", "rank", "checkpointing", "chunk")}}
    path = basic_setup(tmp_path, n_texts=400, max_steps=1, evals_per_run=0, eval_fraction=0.0, lora_rank=shape["rank"],
                       sequence_len=shape["seq"], **extra)
    config = load_config(path, [f"activation_checkpointing={shape['checkpointing']}", f"chunk_size={shape['chunk']}"])
    train_module.train(config, show_progress=False)
    predicted = plan(config, read_hf_config(config.model_dir)).peak
    assert measured[0] > 8 * 2**20
    assert 0.75 <= predicted / measured[0] <= 1.25, (predicted / 2**20, measured[0] / 2**20)


def test_closed_form_terms_for_llama_8b_control_adapter():
    config = load_config(REPO / "examples/plan/llama8b_control_adapter.toml")
    stage = plan(config, read_hf_config(config.model_dir)).stages[0]
    tokens, hidden, vocab = 4096, 4096, 128256
    assert stage.bytes["weights"] == 2 * 8_030_261_248  # Llama-3.1-8B's parameter count, bf16
    assert stage.bytes["trainable"] == 30 * (2 * 16 * hidden) * 4 * 4  # layers 0:29, A and B, fp32 x (w, g, m, v)
    assert stage.bytes["activations"] == 32 * tokens * hidden * 2 + 16 * tokens
    assert stage.bytes["loss"] == 256 * vocab * (2 * 2 + 4) + tokens * hidden * (2 + 4)
    offload = plan(load_config(REPO / "examples/plan/llama8b_control_adapter.toml",
                               ['activation_checkpointing="offload"']), read_hf_config(config.model_dir)).stages[0]
    assert offload.bytes["activations"] == 16 * tokens and offload.host_bytes == 32 * tokens * hidden * 2
    plain = plan(load_config(REPO / "examples/plan/llama8b_control_adapter.toml",
                             ["activation_checkpointing=false", "chunk_size=0"]), read_hf_config(config.model_dir))
    assert plain.stages[0].bytes["loss"] == tokens * vocab * 12 + tokens * hidden * 6
    assert plain.peak - stage.bytes["weights"] > 10 * (stage.total - stage.bytes["weights"])


def test_parse_size():
    assert parse_size("24GiB") == parse_size("24 GB") == parse_size("24g") == 24 * GIB
    assert parse_size("512MiB") == 0.5 * GIB
    for bad in ("24", "0GiB", "0.0G", "-4GiB"):  # a bare number would be bytes; a GPU has some memory
        with pytest.raises(UserError, match="write e.g. 24GiB"):
            parse_size(bad)


def test_plan_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["plan", "examples/plan/llama8b_control_adapter.toml", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits on 1 x 24 GiB: yes" in out and "smallest pipeline_stages that fits: 1" in out
    assert main(["plan", "examples/plan/llama8b_control_adapter.toml", "--gpu-memory", "24GiB",
                 "--set", "sequence_len=32768"]) == 0
    out = capsys.readouterr().out
    assert "fits on 1 x 24 GiB: no" in out and "none on 1 GPU(s); pipeline_stages = 3 on 3 GPUs fits" in out
    assert main(["plan", "examples/plan/llama70b_qlora.toml", "--gpus", "4", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n    ") == 4 and "fits on 4 x 24 GiB: yes" in out  # one row per stage
    assert main(["plan", "examples/plan/llama8b_control_adapter.toml", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: cannot read 'lots'" in capsys.readouterr().err
    assert main(["plan", "examples/plan/llama70b_qlora.toml", "--gpus", "6"]) == 2
    assert "--gpus 6 is not a multiple of pipeline_stages=4" in capsys.readouterr().err


def test_train_prints_the_plan_at_start(tmp_path, capsys):
    path = basic_setup(tmp_path, max_steps=1, evals_per_run=0)
    train_module.train(load_config(path), show_progress=True)
    out = capsys.readouterr().out
    assert "craft plan: skipped, no GPU" in out and "predicted peak" not in out  # no GPU figure on CPU
