"""The newcomer check (.ci/readme_commands.py, run by .ci/run) finds the README's commands and runs every one that
needs no downloaded data; here only what it selects is checked (running them takes minutes)."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _checker():
    spec = importlib.util.spec_from_file_location("readme_commands", os.path.join(ROOT, ".ci", "readme_commands.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_start_and_every_data_free_command_run_in_ci():
    checker = _checker()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = checker.commands(f.read())
    run = [c for c in found if checker.why_skipped(c) is None]
    assert "compresskit apply recipes/fiited_dlrm_synthetic.yaml" in run
    assert any(c.startswith("compresskit export") for c in run) and any(c.startswith("compresskit plan") for c in run)
    assert all(checker.why_skipped(c) for c in found if "movielens" in c)
    assert checker.why_skipped("pip install -e .") and checker.why_skipped("python benchmarks/dasnet.py")
    assert checker.why_skipped("python benchmarks/render_docs.py") is None
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "readme_commands.py" in f.read()


def test_commands_are_split_and_stripped_of_comments():
    checker = _checker()
    text = "x\n```bash\npip install a && compresskit plugins   # list them\n# a comment\n\n```\n```python\nrun()\n```"
    assert checker.commands(text) == ["pip install a", "compresskit plugins"]
