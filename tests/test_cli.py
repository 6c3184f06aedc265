"""CLI habits: every option documented, `ddm --version`, `ddm config show`, no jax for --help / --version."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

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


# Runs in a fresh interpreter (this one has jax loaded by other tests): the parser, --version and every
# command's --help must answer without importing jax (or flax, orbax, tensorstore).
_NO_JAX_SCRIPT = textwrap.dedent("""
    import contextlib, io, sys
    from ddm.app.cli import build_parser, main
    parser = build_parser()
    commands = list(next(a for a in parser._actions if a.choices and "sample" in a.choices).choices)
    for argv in [["--version"], ["--help"], ["config", "show", "--help"]] + [[c, "--help"] for c in commands]:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except SystemExit as exit_info:
                assert exit_info.code == 0, (argv, exit_info.code)
    heavy = sorted(m for m in ("jax", "flax", "orbax", "tensorstore") if m in sys.modules)
    print("loaded:", heavy, len(commands))
""")


def test_help_and_version_load_no_jax():
    done = subprocess.run([sys.executable, "-c", _NO_JAX_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded, count = done.stdout.split("loaded:")[1].rsplit(" ", 1)
    assert loaded.strip() == "[]" and int(count) > 15, done.stdout


def test_module_entry_point_answers_version_and_help():
    for flag, expected in (("--version", f"ddm {ddm.__version__}"), ("--help", "usage: ddm")):
        done = subprocess.run([sys.executable, "-m", "ddm", flag], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and expected in done.stdout, done.stderr


def test_class_n_help_names_the_evaluation_default():
    from ddm.eval.evaluate import DEFAULT_CLASS_N

    evaluate = next(a for a in build_parser()._actions if a.choices and "evaluate" in a.choices).choices["evaluate"]
    class_n = next(a for a in evaluate._actions if "--class-n" in a.option_strings)
    assert class_n.default is None and f"(default {DEFAULT_CLASS_N})" in class_n.help


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
