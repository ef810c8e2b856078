"""Every benchmark number README.md and docs/ quote is rendered from benchmarks/results/*.json
(benchmarks/render_docs.py): the documents hold what the JSON says, every renderer is used, and a changed result
makes the check fail."""
from __future__ import annotations

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def render_docs():
    sys.path.insert(0, os.path.abspath(BENCHMARKS))
    try:
        import render_docs
        yield render_docs
    finally:
        sys.path.remove(os.path.abspath(BENCHMARKS))


def test_documents_hold_what_the_results_say(render_docs, capsys):
    assert render_docs.main(["--check"]) == 0, capsys.readouterr().out


def test_every_renderer_is_used_and_every_block_is_known(render_docs):
    used = render_docs.used_blocks()
    names = [name for blocks in used.values() for name in blocks]
    assert set(names) == set(render_docs.RENDERERS)
    assert used["README.md"], "the README's headline numbers are rendered too"


def test_a_changed_result_is_caught(render_docs, monkeypatch, tmp_path, capsys):
    import json
    import shutil

    from rendering import core

    results = tmp_path / "results"
    shutil.copytree(core.RESULTS_DIR, results)
    data = json.loads((results / "hypar.json").read_text())
    column = data["columns"].index("all-DP / HyPar")
    for row in data["rows"]:
        row[column] *= 1.5
    (results / "hypar.json").write_text(json.dumps(data))
    monkeypatch.setattr(core, "RESULTS_DIR", str(results))
    assert render_docs.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "docs/hypar.md: hypar-networks" in out and "README.md: readme-hypar" in out
