"""Ctrl-C in any subcommand is one line and exit status 130, never a KeyboardInterrupt traceback."""

from __future__ import annotations

import types

from craft import cli


def _interrupted_subcommand(hint: str | None):
    def run(args):
        raise KeyboardInterrupt

    module = types.SimpleNamespace(add_arguments=lambda parser: parser.add_argument("config"), run=run)
    if hint is not None:
        module.INTERRUPTED_HINT = hint
    return module


def test_interrupt_is_one_line_with_the_subcommands_hint(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda name: _interrupted_subcommand("resume with --resume_from_checkpoint"))
    assert cli.main(["train", "x.toml"]) == cli.INTERRUPTED_EXIT_CODE == 130
    err = capsys.readouterr().err
    assert err == "craft train: interrupted; resume with --resume_from_checkpoint\n"


def test_interrupt_without_hint(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda name: _interrupted_subcommand(None))
    assert cli.main(["merge", "x"]) == 130
    assert capsys.readouterr().err == "craft merge: interrupted\n"


def test_train_has_a_resume_hint():
    from craft.engine import cli as train_cli

    assert "--resume_from_checkpoint" in train_cli.INTERRUPTED_HINT
