"""Output paths users get wrong: a file where a directory output goes, a --plot that is a directory or has no
suffix. Each is one line, exit status 2, and the existing file or directory is untouched (even with --force)."""

from __future__ import annotations

import pytest

from craft.cli import main
from test_export_fixtures import make_control_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    base_dir, adapter_dir, _ = make_control_adapter(tmp_path_factory.mktemp("adapter"), "llama")
    return base_dir, adapter_dir


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("command", ["convert", "merge"])
def test_directory_output_that_is_a_file(adapter, tmp_path, capsys, command, force):
    base_dir, adapter_dir = adapter
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    args = [adapter_dir, target] if command == "convert" else [base_dir, adapter_dir, target]
    err = _fails(capsys, [command, *args, *force])
    assert f"output {target} is a file; give a directory" in err
    assert target.read_text() == "keep me"


def test_plot_into_a_directory(adapter, tmp_path, capsys):
    _, adapter_dir = adapter
    err = _fails(capsys, ["inspect", adapter_dir, "--plot", tmp_path])
    assert f"--plot {tmp_path} is a directory" in err
    assert list(tmp_path.parent.glob(f"{tmp_path.name}.*")) == []


def test_plot_without_a_suffix(adapter, tmp_path, capsys):
    _, adapter_dir = adapter
    err = _fails(capsys, ["inspect", adapter_dir, "--plot", tmp_path / "norms"])
    assert "image suffix" in err
    assert list(tmp_path.iterdir()) == []
