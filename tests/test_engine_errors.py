"""Every user mistake of `craft train` gives one clear line on stderr, exit code 2, and leaves outputs alone."""

from __future__ import annotations

import pytest
from test_engine_fixtures import basic_setup

from craft.cli import main
from craft.engine.config import TrainConfig, load_config, parse_layer_range
from craft.errors import UserError


def fail(capsys, *argv) -> str:
    capsys.readouterr()  # drop output of the fixtures
    code = main(["train", *map(str, argv), "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


@pytest.fixture
def setup(tmp_path):
    return basic_setup(tmp_path)


def test_defaults_follow_the_seed(tmp_path):
    config = TrainConfig(model_dir="m", output_dir="o", lora_rank=16, lr=1e-4, sequence_len=64,
                         datasets=[{"dataset_path": "x"}])
    assert (config.epochs, config.beta1, config.beta2, config.eps) == (1, 0.9, 0.99, 1e-6)
    assert config.alpha == pytest.approx(4.0)  # sqrt(16): rsLoRA
    assert (config.lora_dropout, config.lora_weight_decay, config.lora_weight_dtype) == (0.0, 0.0, "float32")
    assert config.eval_accumulation_steps == config.gradient_accumulation_steps == 1
    assert (config.pipeline_stages, config.checkpoint_interval_hours, config.max_checkpoints) == (1, 1.0, 3)
    assert (config.eval_fraction, config.evals_per_run, config.control_class0_lambda) == (0.01, 11, 0.0)
    assert (config.datasets[0].control_class, config.datasets[0].drop_tails) == (1, False)
    assert config.layer_indices(32) is None
    assert parse_layer_range("16:31") == (16, 31)
    with_layers = config.model_copy(update={"layers_to_transform": "2:4"})
    assert with_layers.layer_indices(8) == [2, 3, 4]


def test_set_overrides_keys(setup, tmp_path):
    config = load_config(setup, ["lora_rank=8", 'output_dir="elsewhere"', "lr=1"])
    assert (config.lora_rank, config.output_dir, config.lr) == (8, "elsewhere", 1.0)


def test_unknown_key_names_nearest(capsys, setup):
    setup.write_text(setup.read_text().replace("lora_rank = 4", "lora_rnak = 4\nlora_rank = 4"))
    err = fail(capsys, setup)
    assert "unknown key 'lora_rnak'" in err and "did you mean 'lora_rank'" in err and str(setup) in err


def test_unknown_dataset_key(capsys, setup):
    setup.write_text(setup.read_text() + "control_clas = 1\n")
    err = fail(capsys, setup)
    assert "unknown key 'datasets.0.control_clas'" in err and "'control_class'" in err


def test_wrong_type_names_key_and_type(capsys, setup):
    err = fail(capsys, setup, "--set", 'epochs="two"')
    assert "key 'epochs'" in err and "integer" in err


def test_bad_control_class(capsys, setup):
    setup.write_text(setup.read_text() + "control_class = 2\n")
    err = fail(capsys, setup)
    assert "datasets.0.control_class" in err and "-1" in err


def test_malformed_toml_names_file_and_line(capsys, setup):
    setup.write_text(setup.read_text() + "lr = = 3\n")
    err = fail(capsys, setup)
    assert str(setup) in err and "malformed TOML" in err and "line" in err


def test_full_fine_tune_with_weight_decay_explains(capsys, setup):
    err = fail(capsys, setup, "--set", "full_fine_tune=true", "--set", "lora_weight_decay=1.0")
    assert "catastrophic cancellation" in err and "inductive bias" in err


def test_missing_config_file(capsys, tmp_path):
    assert "config file not found" in fail(capsys, tmp_path / "nope.toml")


def test_glob_matches_nothing(capsys, setup, tmp_path):
    setup.write_text(setup.read_text().replace("pos.json", "nothing*.json"))
    err = fail(capsys, setup)
    assert "nothing*.json" in err and "no file matches" in err


def _with_data(setup, name: str, content: bytes):
    path = setup.parent / "data" / name
    path.write_bytes(content)
    setup.write_text(setup.read_text().replace(str(setup.parent / "data" / "pos.json"), str(path)))
    return path


def test_empty_file(capsys, setup):
    path = _with_data(setup, "empty.jsonl", b"")
    err = fail(capsys, setup)
    assert str(path) in err and "empty" in err


def test_row_without_text(capsys, setup):
    path = _with_data(setup, "rows.jsonl", b'{"text": "fine"}\n{"txt": "typo"}\n')
    err = fail(capsys, setup)
    assert str(path) in err and "row 1" in err and '"text"' in err


def test_not_utf8(capsys, setup):
    path = _with_data(setup, "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    err = fail(capsys, setup)
    assert str(path) in err and "UTF-8" in err


def test_sequence_len_beyond_model(capsys, setup):
    err = fail(capsys, setup, "--set", "sequence_len=4096")
    assert "sequence_len=4096" in err and "max_position_embeddings=512" in err


def test_layers_out_of_range(capsys, setup):
    err = fail(capsys, setup, "--set", 'layers_to_transform="0:7"')
    assert "layers_to_transform" in err and "only 2 layers" in err


def test_failed_run_leaves_existing_output_untouched(capsys, setup, tmp_path):
    out = tmp_path / "out"
    precious = out / "20200101_00-00-00" / "checkpoints" / "step000000001"
    precious.mkdir(parents=True)
    (precious / "meta.json").write_text("{}")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    _with_data(setup, "bad.jsonl", b'{"nope": 1}\n')
    fail(capsys, setup)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_without_checkpoint(capsys, setup, tmp_path):
    err = fail(capsys, setup, "--resume_from_checkpoint")
    assert "no checkpoint found" in err and str(tmp_path / "out") in err


def test_pipeline_stages_must_divide_world(capsys, setup):
    err = fail(capsys, setup, "--set", "pipeline_stages=2")
    assert "pipeline_stages=2" in err and "evenly divide" in err


def test_model_dir_without_config(capsys, setup, tmp_path):
    err = fail(capsys, setup, "--set", f'model_dir="{tmp_path}"')
    assert "no config.json" in err


def test_library_callers_get_user_error(setup):
    setup.write_text(setup.read_text().replace("lora_rank = 4\n", ""))
    with pytest.raises(UserError, match="lora_rank is required"):
        load_config(setup)
