"""Third-party plugins are found through the `compresskit.plugins` entry-point group of an installed package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "plugin_package")


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """pip-install the example plugin distribution (examples/plugin_package) into a private target folder."""
    src = tmp_path_factory.mktemp("src") / "plugin_package"
    shutil.copytree(EXAMPLE, src)              # build in a scratch copy: the repository stays clean
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"could not install the example plugin: {proc.stderr[-2000:]}")
    return target


def _run(args, site, cwd):
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "compresskit", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_entry_point_plugin_is_listed_and_runs(installed_plugin, tmp_path):
    listed = _run(["plugins"], installed_plugin, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "scale-first (transform): example plugin: scales the first parameter" in listed.stdout
    assert "factor: float = 2.0" in listed.stdout
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f'''
        model: {{name: lenet5}}
        data: {{name: digits, args: {{image_size: 32}}}}
        stages: [{{plugin: scale-first, factor: 3.0}}]
        output: {{dir: {tmp_path / "out"}}}
    '''))
    ran = _run(["apply", str(recipe)], installed_plugin, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert '"factor": 3.0' in (tmp_path / "out" / "report.json").read_text()
    bad = recipe.read_text().replace("factor: 3.0", "factor: -1")
    recipe.write_text(bad)
    err = _run(["validate", str(recipe)], installed_plugin, tmp_path)
    assert err.returncode == 2 and "stages[0].factor: got -1" in err.stderr
