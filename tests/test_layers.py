"""The package's shape: one installed top-level package, layered imports without cycles (issue 11).

The import contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them on a copy of the
sources laid out as the wheel installs them (data/ -> ddm/data/, ...), since its source walk cannot follow the
setuptools package-dir mapping. Every import counts, including those inside functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"data": "data", "experts": "experts", "router": "router"}  # ddm.<name> <- <repo>/<folder>


def _wheel_layout(dst: Path) -> Path:
    """Copies the sources into dst/ddm/... exactly as the package-dir mapping installs them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "ddm", dst / "ddm", ignore=ignore)
    for name, folder in MAPPED.items():
        shutil.copytree(REPO / folder, dst / "ddm" / name, ignore=ignore)
    return dst


def _lint(src: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
           "--config", str(config), "--no-cache"]
    return subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)


def test_mapping_in_pyproject_matches_the_folders():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"ddm": "ddm", **{f"ddm.{k}": v for k, v in MAPPED.items()}}
    on_disk = {"ddm"} | {f"ddm.{p.parent.name}" for p in (REPO / "ddm").glob("*/__init__.py")}
    on_disk |= {f"ddm.{k}" for k in MAPPED}
    assert set(tool["packages"]) == on_disk  # a new subpackage must be listed, or the wheel would lack it


def test_import_contracts_hold(tmp_path):
    src = _wheel_layout(tmp_path / "src")
    result = _lint(src, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("bad_import", [
    ("ddm/core/flow.py", "from ddm.experts import train as _job\n"),  # core -> job: a layer violation
    ("ddm/sampling/routing.py", "def _late():\n    from ddm.app import cli\n"),  # in a function still counts
    ("ddm/core/errors.py", "from ddm.core import config as _cycle\n"),  # config imports errors: a cycle
])
def test_import_contracts_catch_a_violation(tmp_path, bad_import):
    """The check is real: one wrong import (at module level or inside a function) breaks a contract."""
    src = _wheel_layout(tmp_path / "src")
    path, line = bad_import
    with open(src / path, "a") as f:
        f.write("\n" + line)
    result = _lint(src, REPO / "pyproject.toml")
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_wheel_installs_one_package_that_works_beside_user_packages(tmp_path):
    """`pip wheel .` -> the only top-level name is ddm; installed in a fresh venv, `ddm --help` and
    `import ddm.data, ddm.experts, ddm.router` work from a folder holding the user's own data/, router/ and
    experts/ packages, and those still import as the user's."""
    import zipfile

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(REPO)], check=True, timeout=600)
    (wheel,) = wheels.glob("ddm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"ddm"}

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--force-reinstall",
                    "--target", str(env_dir / "wheel-site"), str(wheel)], check=True, timeout=600)
    # The venv gets its own ddm from the wheel, then this interpreter's dependencies (jax, flax, ...): its
    # site-packages folders, whether it is the system's python or a virtualenv (a venv's system_site_packages
    # would see the base interpreter's instead). As PYTHONPATH entries their .pth files are not run, so this
    # interpreter's editable ddm (a .pth finder) stays out.
    dependencies = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    user = tmp_path / "user_project"
    for name in MAPPED:
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"WHOSE = 'user {name}'\n")
    check = textwrap.dedent("""
        import sys
        import data, experts, router
        assert (data.WHOSE, experts.WHOSE, router.WHOSE) == ("user data", "user experts", "user router")
        import ddm.data.prepare, ddm.experts.train, ddm.router.train
        assert ddm.data.prepare.__file__.startswith(sys.argv[1]), ddm.data.prepare.__file__
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user), str(env_dir / "wheel-site"), *dependencies])}
    env.pop("PYTHONHOME", None)
    out = subprocess.run([python, "-c", check, str(env_dir / "wheel-site")], cwd=user, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    cli = subprocess.run([python, "-m", "ddm", "--help"], cwd=user, env=env, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0 and "train-expert" in cli.stdout, cli.stderr[-2000:]


def test_editable_install_serves_the_mapped_packages_from_the_repo(tmp_path):
    """This suite runs on the editable install: ddm.data etc. come from the repo's top-level folders."""
    code = "import ddm.data.run, ddm.experts.train, ddm.router.model; print(ddm.data.run.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # resolve(): a strict editable install (README, Install) serves them through links to the same files
    assert Path(out.stdout.strip()).resolve() == REPO / "data" / "run.py"
