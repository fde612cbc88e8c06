"""A non-editable install (the wheel `pip install .` builds) carries its configs: it runs from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

PACKAGING = ("pyproject.toml", "setup.py", "README.md")


def run(*args: str, cwd, env: dict | None = None) -> str:
    environ = {**os.environ, **(env or {})}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=environ)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_wheel_finds_its_configs_from_another_folder(tmp_path):
    tree, site, elsewhere = tmp_path / "tree", tmp_path / "site", tmp_path / "elsewhere"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for folder in ("src", "conf"):
        shutil.copytree(REPO / folder, tree / folder, ignore=skip)
    for name in PACKAGING:
        shutil.copy(REPO / name, tree / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"), ".", cwd=tree)
    (wheel,) = (tmp_path / "wheel").glob("lmtrain-*.whl")
    run(*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere.mkdir()
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "lmtrain").exists()]
    env = {"PYTHONPATH": os.pathsep.join([str(site), *others])}  # the wheel, not the source tree

    where = run(
        sys.executable,
        "-c",
        "import importlib.util, lmtrain; print(lmtrain.__file__); "
        "print(importlib.util.find_spec('lmtrain.conf').submodule_search_locations[0])",
        cwd=elsewhere,
        env=env,
    ).split()
    assert where == [str(site / "lmtrain" / "__init__.py"), str(site / "lmtrain" / "conf")]
    printed = run(sys.executable, "-m", "lmtrain.train", "--cfg", "job", "experiment=smoke", cwd=elsewhere, env=env)
    assert "model:" in printed and "block_size: 64" in printed  # experiment=smoke's model, from the wheel's conf
