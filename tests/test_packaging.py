"""The wheel a user installs: built with `python -m build`, installed into a clean virtual
environment (its dependencies from the package index), then run as a user would."""

import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_the_built_wheel_installs_in_a_clean_venv_and_runs_the_demo(tmp_path):
    # Build from a copy holding only what the sdist holds, so nothing left in the working
    # tree (a stale build/ directory, the lab) can slip into the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src" / "macula", source / "src" / "macula",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = dist.glob("macula-*.whl")
    from macula import __version__

    assert wheel.name.startswith(f"macula-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "macula/cli.py" in names and "macula/py.typed" in names
    assert not any(n.startswith("macula_lab/") for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    macula = str(venv / "bin" / "macula")
    helped = subprocess.run([macula, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    for command in ("gateway", "node", "up", "status", "ping", "forward", "demo"):
        assert command in helped.stdout
    assert "lab" not in helped.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    demo = subprocess.run([macula, "demo", "--json", "--messages", "300"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    result = json.loads(demo.stdout.strip().splitlines()[-1])
    assert result["lost"] == 0 and result["delivered"] == result["sent"] > 0
