"""CLI habits (issue 19): every option documented, `ddm --version`, `ddm config show`."""

from __future__ import annotations

import argparse

import pytest
import yaml

import ddm
from ddm.app.cli import build_parser, main
from ddm.core.config import Config, load_config, to_dict

REPO_CONFIG = "configs/digits.yaml"


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("ddm",)):
    """(command path, action) for every argument and subcommand of `parser`, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield path + (choice.dest,), choice
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))
        else:
            yield path, action


def test_every_command_and_option_has_a_help_text():
    seen = list(_walk(build_parser()))
    assert len(seen) > 80  # the walk reached every subcommand's options
    missing = [" ".join(path) + " " + (action.option_strings[-1] if action.option_strings else action.dest)
               for path, action in seen if not (action.help or "").strip() or action.help == argparse.SUPPRESS]
    assert not missing, f"options without help: {missing}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ddm {ddm.__version__}"
    assert ddm.__version__[0].isdigit()


def test_config_show_prints_the_resolved_config(capsys, monkeypatch):
    from helpers import REPO

    monkeypatch.chdir(REPO)
    assert main(["config", "show", "--config", REPO_CONFIG, "--set", "expert.train.steps=7",
                 "--set", "expert.train.tensorboard=true"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(REPO_CONFIG, ["expert.train.steps=7", "expert.train.tensorboard=true"])
    assert shown == to_dict(expected)
    assert shown["expert"]["train"]["steps"] == 7 and shown["router"]["train"]["sample_every"] == 0  # defaults filled in
    assert list(shown) == [f.name for f in __import__("dataclasses").fields(Config)]  # declaration order


def test_config_show_of_a_run_is_its_stored_config(trained_run, capsys):
    from ddm.data.run import Run

    assert main(["config", "show", "--run-dir", str(trained_run), "--set", "sample.n=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(Run.open(trained_run, ["sample.n=3"]).config)
    assert shown["data"]["k"] == 3 and shown["sample"]["n"] == 3
    assert main(["config", "show", "--run-dir", str(trained_run), "--config", REPO_CONFIG]) == 2
    assert "not both" in capsys.readouterr().err
