"""Every user mistake of `craft train` gives one clear line on stderr, exit code 2, and leaves outputs alone."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from test_engine_fixtures import basic_setup, only_run, write_model

from craft.cli import main
from craft.engine.config import TrainConfig, load_config, parse_layer_range
from craft.errors import UserError
from craft.testing import save_tiny_model


def snapshot(*dirs: Path) -> dict:
    """Everything under `dirs` (existence, then every path's mtime and size): equal snapshots = untouched."""
    state = {}
    for root in dirs:
        state[root] = root.exists()
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            stat = path.stat()
            state[path] = (stat.st_mtime_ns, stat.st_size)
    return state


def fail_cli(capsys, argv: list, untouched: tuple = ()) -> str:
    """Run `craft ARGV` in-process: exit code 2, exactly one stderr line, nothing under `untouched` changed."""
    before = snapshot(*untouched)
    capsys.readouterr()  # drop output of the fixtures
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith(f"craft {argv[0]}: error: "), err
    assert snapshot(*untouched) == before
    return err


def fail(capsys, config, *argv) -> str:
    """`craft train CONFIG ARGV` fails as promised, leaving the config's output_dir (`out` next to it) alone."""
    return fail_cli(capsys, ["train", config, *argv, "--no_progress"], untouched=(Path(config).parent / "out",))


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


def test_all_cross_key_conflicts_in_one_line(capsys):
    err = fail(capsys, Path(__file__).parents[1] / "examples" / "lora.toml", "--set", "full_fine_tune=true", "--set", "load_in_4bit=true",
               "--set", "use_control_adapters=true")
    assert "lora_weight_decay is not supported with full_fine_tune" in err and "load_in_4bit cannot be combined" \
        in err and "use_control_adapters cannot both be true" in err and err.count("; ") >= 2


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
    assert str(path) in err and "line 2 has" in err and '"text"' in err  # the line an editor shows


def test_json_list_item_without_text(capsys, setup):
    path = _with_data(setup, "rows.json", b'[{"text": "fine"}, {"txt": "typo"}]')
    err = fail(capsys, setup)
    assert str(path) in err and "list item 2 (counting from 1)" in err


def test_not_utf8(capsys, setup):
    path = _with_data(setup, "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    err = fail(capsys, setup)
    assert str(path) in err and "UTF-8" in err


def test_sequence_len_beyond_model(capsys, setup):
    err = fail(capsys, setup, "--set", "sequence_len=4096")
    assert "sequence_len=4096" in err and "max_position_embeddings=512" in err


def test_eval_fraction_that_leaves_too_little_to_train(capsys, setup, tmp_path):
    err = fail_cli(capsys, ["train", setup, "--set", "eval_fraction=0.99", "--no_progress"])
    assert "1 training sequences are too few for one optimizer step" in err
    # Found once the rows exist: their cache (reused by the next run) is the only thing written, no run directory.
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dataset_cache"]


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


def test_model_dir_naming_its_config_file(capsys, setup, tmp_path):
    err = fail(capsys, setup, "--set", f'model_dir="{tmp_path / "model" / "config.json"}"')
    assert "config.json' is a file, not a directory" in err


@pytest.mark.parametrize("size", ["24", "0GiB"])
def test_plan_gpu_memory_needs_a_positive_size_with_unit(capsys, setup, size):
    err = fail_cli(capsys, ["plan", setup, "--gpu-memory", size], untouched=(setup.parent / "out",))
    assert f"--gpu-memory: cannot read '{size}'" in err and "write e.g. 24GiB" in err


def test_library_callers_get_user_error(setup):
    setup.write_text(setup.read_text().replace("lora_rank = 4\n", ""))
    with pytest.raises(UserError, match="lora_rank is required"):
        load_config(setup)


# --- model directory ------------------------------------------------------------------------------------------

def _model_copy(setup, tmp_path, name="model2") -> Path:
    """A copy of the setup's model directory that the config now points at."""
    copy = tmp_path / name
    shutil.copytree(tmp_path / "model", copy)
    setup.write_text(setup.read_text().replace(f'"{tmp_path / "model"}"', f'"{copy}"'))
    return copy


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_model_safetensors(capsys, setup, tmp_path, damage):
    weights = _model_copy(setup, tmp_path) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file at all" if damage == "garbage" else data[: len(data) // 2])
    err = fail(capsys, setup)
    assert str(weights) in err and ("safetensors" in err or "damaged" in err)


@pytest.mark.parametrize("where", ["is", "under"])
def test_output_dir_that_is_or_lies_under_a_file(capsys, setup, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    target = blocker if where == "is" else blocker / "runs"
    err = fail_cli(capsys, ["train", setup, "--set", f'output_dir="{target}"'], untouched=(blocker,))
    assert f"output_dir '{target}'" in err and ("is a file" if where == "is" else f"under the file {blocker}") in err


def test_model_dir_without_tokenizer(capsys, setup, tmp_path):
    model = _model_copy(setup, tmp_path)
    for path in model.glob("tokenizer*"):
        path.unlink()
    err = fail(capsys, setup)
    assert "has no tokenizer" in err and str(model) in err and "sentencepiece" not in err


def test_tokenizer_larger_than_the_embedding(capsys, tmp_path):
    from craft.testing import make_tokenizer

    write_model(tmp_path / "model", vocab_size=260)
    make_tokenizer(384).save_pretrained(tmp_path / "model")  # ids up to 383: beyond the 260 embedding rows
    err = fail(capsys, basic_setup(tmp_path))
    assert "vocab_size=260" in err and "token id" in err


def test_config_and_weight_shapes_disagree(capsys, setup, tmp_path):
    model = _model_copy(setup, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    err = fail(capsys, setup)
    assert "mlp" in err and "(128, 64)" in err and "(96, 64)" in err and "do not match" in err


def test_target_module_typo_lists_valid_names(capsys, setup):
    err = fail(capsys, setup, "--set", "target_modules=['q_prj', 'v_proj']")
    assert "target_modules: 'q_prj'" in err and "q_proj, up_proj, v_proj" in err


# --- config ---------------------------------------------------------------------------------------------------

def test_all_config_errors_at_once_and_misspelt_required_key(capsys, setup):
    text = setup.read_text().replace("dataset_path", "dataset_pth").replace("lora_rank = 4", "lora_rnak = 4")
    setup.write_text('epochs = "two"\n' + text)
    err = fail(capsys, setup)
    assert "unknown key 'lora_rnak'; did you mean 'lora_rank'?" in err and "key 'epochs'" in err
    assert "unknown key 'datasets.0.dataset_pth'; did you mean 'dataset_path'?" in err
    assert "missing" not in err  # the misspelt dataset_path is reported once, as the misspelling


def test_qlora_pipe_keys_name_their_equivalent(capsys, setup):
    err = fail(capsys, setup, "--set", "eval_steps=10", "--set", "micro_batch_size_per_gpu=2")
    assert "unknown key 'eval_steps' (a qlora-pipe key); use evals_per_run or evals_per_epoch" in err
    assert "use micro_batch_size" in err


def test_newer_qlora_pipe_lite_keys_are_accepted(setup):
    text = setup.read_text().replace("evals_per_run = 2\n", "")
    setup.write_text(text.replace("[[datasets]]", 'evals_per_epoch = 2\ndocument_prefix = "<doc>"\n'
                                                  "[[datasets]]\nmax_tokens = 330\ndocument_suffix = ''"))
    config = load_config(setup)
    spec = config.datasets[0]
    assert (config.evals_per_epoch, spec.max_tokens, spec.sequence_cap(config.sequence_len)) == (2, 330, 10)
    assert config.prefix_suffix(spec) == ("<doc>", "")
    with pytest.raises(UserError, match="evals_per_run and evals_per_epoch cannot both be given"):
        load_config(setup, ["evals_per_run=3"])
    with pytest.raises(UserError, match=r"max_tokens=8 is less than one sequence \(sequence_len=32\)"):
        setup.write_text(setup.read_text().replace("max_tokens = 330", "max_tokens = 8"))
        load_config(setup)


# --- resume and checkpoints -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step LoRA run whose config names its model_dir relative to the directory it ran in."""
    root = tmp_path_factory.mktemp("trained")
    config = basic_setup(root, max_steps=2, evals_per_run=0)
    config.write_text(config.read_text().replace(f'"{root / "model"}"', '"model"'))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", str(config), "--no_progress"]) == 0
    finally:
        os.chdir(cwd)
    return root, config, only_run(root / "out")


@pytest.mark.parametrize("change", ["lora_rank=8", "use_control_adapters=true"])
def test_resume_with_other_adapter_settings(capsys, trained, change):
    root, config, run = trained
    err = fail_cli(capsys, ["train", config, "--set", f'model_dir="{root / "model"}"', "--set", change,
                            "--resume_from_checkpoint", "--no_progress"], untouched=(root / "out",))
    assert "checkpoint" in err and ("has shape" in err if "rank" in change else "missing, e.g." in err)
    assert "lora_rank" in err and "use_control_adapters" in err


def test_resume_on_another_base_model_is_refused(capsys, trained, tmp_path):
    """Same tensor shapes, another config.json (as a Qwen2 of the Llama's shape would be): refused, epoch1 kept."""
    root, config, run = trained
    other = tmp_path / "other_model"
    shutil.copytree(root / "model", other)
    hf = json.loads((other / "config.json").read_text())
    hf["rope_theta"] = hf.get("rope_theta", 10000.0) * 2
    (other / "config.json").write_text(json.dumps(hf))
    err = fail_cli(capsys, ["train", config, "--set", f'model_dir="{other}"', "--resume_from_checkpoint",
                            "--no_progress"], untouched=(root / "out",))
    assert "another base model" in err and "llama" in err and "model_dir" in err


@pytest.mark.parametrize("change, shown", [
    ("sequence_len=16", "sequence_len=32 in the checkpoint, 16 now"),
    ("seed=7", "seed=42 in the checkpoint, 7 now"),
    ("eval_fraction=0.2", "eval_fraction=0.1 in the checkpoint, 0.2 now"),
    ("datasets=[{dataset_path='elsewhere.json', drop_tails=true}]", "datasets=[{"),
])
def test_resume_with_other_data_settings_is_refused(capsys, trained, change, shown):
    root, config, run = trained
    err = fail_cli(capsys, ["train", config, "--set", f'model_dir="{root / "model"}"', "--set", change,
                            "--resume_from_checkpoint", "--no_progress"], untouched=(root / "out",))
    assert "other data settings" in err and shown in err, err


def test_resume_identity_keeps_runtime_keys_changeable(trained):
    """Keys that change neither the data order nor what a checkpoint holds may differ on resume."""
    from craft.engine import checkpoint as ckpt
    from craft.engine.config import load_config

    root, config, run = trained
    saved = sorted((run / "checkpoints").glob("step*"))[-1]
    changed = load_config(config, [f'model_dir="{root / "model"}"', "chunk_size=8", "max_steps=5", "lr=1e-5",
                                   'activation_checkpointing=false', "checkpoint_interval_hours=2", "epochs=3"])
    ckpt.check_same_run(saved, ckpt.run_identity(changed, root / "model", "llama"))
    moved = load_config(config, [f'model_dir="{root / "model"}"', "micro_batch_size=2"])
    with pytest.raises(UserError, match="micro_batch_size=1 in the checkpoint, 2 now"):
        ckpt.check_same_run(saved, ckpt.run_identity(moved, root / "model", "llama"))


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("disguise", ["rank00000.pt", "rank00000.safetensors"])
def test_planted_pickle_never_runs(capsys, trained, tmp_path, disguise):
    root, config, run = trained
    checkpoint = sorted((run / "checkpoints").glob("step*"))[-1]
    copy = tmp_path / "out" / run.name / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    marker = tmp_path / "pwned"
    (copy / disguise).write_bytes(pickle.dumps(_Payload(marker)))
    err = fail_cli(capsys, ["train", config, "--set", f'model_dir="{root / "model"}"', "--set",
                            f'output_dir="{tmp_path / "out"}"', "--resume_from_checkpoint", copy, "--no_progress"],
                   untouched=(tmp_path / "out",))
    assert str(copy) in err and ("pickle" in err if disguise.endswith(".pt") else "not a readable safetensors" in err)
    assert not marker.exists()


# --- tools ----------------------------------------------------------------------------------------------------

def test_tools_find_the_recorded_base_from_another_directory(trained, tmp_path, monkeypatch):
    root, _, run = trained
    record = json.loads((run / "epoch1" / "base_model.json").read_text())
    assert record["base_model_name_or_path"] == str((root / "model").resolve()) and record["model_type"] == "llama"
    adapter_config = json.loads((run / "epoch1" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((root / "model").resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["export-gguf", str(run / "epoch1"), "lora.gguf"]) == 0 and (tmp_path / "lora.gguf").is_file()


def test_convert_of_a_file_or_a_lora_points_the_right_way(capsys, trained, tmp_path):
    root, _, run = trained
    weights = run / "epoch1" / "adapter_model.safetensors"
    err = fail_cli(capsys, ["convert", weights, tmp_path / "o"], untouched=(tmp_path / "o",))
    assert f"{weights} is a file, not a directory" in err
    err = fail_cli(capsys, ["convert", run / "epoch1", tmp_path / "o"], untouched=(tmp_path / "o",))
    assert "is a PEFT LoRA, not a Control Adapter" in err and "None" not in err


def test_merge_warns_once_about_another_config(capsys, tmp_path):
    """A Control Adapter's merge checks the base where its updates are built; the warning comes once."""
    config = basic_setup(tmp_path, max_steps=1, evals_per_run=0, use_control_adapters=True)
    assert main(["train", str(config), "--no_progress"]) == 0
    adapter = only_run(tmp_path / "out") / "epoch1"
    base = tmp_path / "base"
    shutil.copytree(tmp_path / "model", base)
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")  # same content, other bytes
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().err.count("differs from the config of the base") == 1


def test_merge_refuses_an_adapter_of_another_architecture(capsys, trained, tmp_path):
    _, _, run = trained
    qwen = save_tiny_model(tmp_path / "qwen2", "qwen2")  # same shapes as the tiny llama
    err = fail_cli(capsys, ["merge", qwen, run / "epoch1", tmp_path / "merged"], untouched=(tmp_path / "merged",))
    assert "was trained on a llama model" in err and "qwen2" in err


@pytest.mark.parametrize("part", ["adapter", "base"])
def test_merge_with_a_corrupt_adapter_or_base(capsys, trained, tmp_path, part):
    root, _, run = trained
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(run / "epoch1", adapter)
    shutil.copytree(root / "model", base)
    damaged = adapter / "adapter_model.safetensors" if part == "adapter" else base / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:200])
    err = fail_cli(capsys, ["merge", base, adapter, tmp_path / "merged"], untouched=(tmp_path / "merged",))
    assert str(damaged) in err


def test_inspect_plot_into_a_missing_directory(capsys, trained, tmp_path):
    _, _, run = trained
    err = fail_cli(capsys, ["inspect", run / "epoch1", "--plot", tmp_path / "nope" / "norms.png"],
                   untouched=(tmp_path / "nope",))
    assert f"{tmp_path / 'nope'} does not exist" in err


def test_usage_mistakes_are_one_line_too(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["convert", "adapter", "out", "--direction", "2"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.count("\n") == 0
    assert err.startswith("craft convert: error: argument --direction: invalid choice: 2")


def test_incomplete_control_adapter_config(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"adapter_type": "control_adapter", "rank": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    err = fail_cli(capsys, ["inspect", adapter])
    assert "lacks the control adapter keys model_type, type, layers, hidden_size, num_hidden_layers" in err
