"""HyPar's typed plan: JSON round trip, the per-level stats table adding up to the totals, ``compresskit plan``
added by the plugin (in-process), the networks registry's did-you-mean error and stage paths in runtime errors."""
from __future__ import annotations

import argparse
import json

import pytest

import compresskit
from compresskit.cli import main
from compresskit.models.lenet import LeNet5
from compresskit.plugins.hypar import (NETWORKS, HyparConfig, HyparPlan, HyparPlugin, LayerPlan, LevelStats,
                                       paper_network, plan_layers)
from compresskit.plugins.hypar.cli import flag_overrides, plan_command
from compresskit.plugins.hypar.report import layer_table, level_table, render_html, render_markdown, \
    write_plan_report
from compresskit.registry import Registry, unknown_name


def _plan(network="alexnet", accelerators=16, batch=128, search="hierarchical", dtype="float32"):
    cfg = HyparConfig(accelerators=accelerators, batch=batch, search=search, dtype=dtype)
    return plan_layers(paper_network(network), cfg, network)


# ------------------------------------------------------------------------------------------------ the dataclass
def test_plan_is_typed():
    plan = _plan()
    assert isinstance(plan, HyparPlan)
    assert plan.accelerators == 16 and plan.levels == 4 and plan.batch == 128 and plan.dtype == "float32"
    assert all(isinstance(r, LayerPlan) for r in plan.layers) and len(plan.layers) == 8
    assert all(isinstance(s, LevelStats) for s in plan.level_stats) and len(plan.level_stats) == 4
    assert plan.baselines == ["all data parallel", "all model parallel", "one weird trick"]
    assert set(plan.total_elements) == {"hypar", *plan.baselines} == set(plan.total_bytes)
    assert plan.ratio_vs_hypar["all data parallel"] == pytest.approx(
        plan.total_elements["all data parallel"] / plan.total_elements["hypar"])


@pytest.mark.parametrize("network,accelerators,search,dtype", [("alexnet", 16, "hierarchical", "float32"),
                                                              ("vgg-c", 64, "joint", "bfloat16"),
                                                              ("lenet", 1, "hierarchical", "float16")])
def test_json_round_trip_object_and_file(tmp_path, network, accelerators, search, dtype):
    plan = _plan(network, accelerators, search=search, dtype=dtype)
    assert HyparPlan.from_json(plan.to_json()) == plan
    assert HyparPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    plan.save(tmp_path / "saved.json")
    assert HyparPlan.load(tmp_path / "saved.json") == plan
    # the report's plan.json is the same document
    files = write_plan_report(plan, str(tmp_path / "out"))
    assert str(tmp_path / "out" / "plan.json") in files
    assert HyparPlan.load(tmp_path / "out" / "plan.json") == plan
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == plan.to_dict()


def test_one_accelerator_has_no_ratios_and_round_trips():
    plan = _plan("lenet", 1)
    assert plan.levels == 0 and plan.level_stats == [] and plan.total_elements["hypar"] == 0
    assert all(v is None for v in plan.ratio_vs_hypar.values())
    assert level_table(plan)[1] == [["total", "1 accelerators", 0, 0, 0, 0, 0, 0, "0 B", "-"]]


def test_from_dict_names_what_is_wrong(tmp_path):
    good = _plan("lenet", 4).to_dict()
    missing = {k: v for k, v in good.items() if k != "batch"}
    with pytest.raises(compresskit.ConfigError, match=r"plan\.batch: required field is missing"):
        HyparPlan.from_dict(missing)
    with pytest.raises(compresskit.ConfigError, match=r"plan\.extra: unknown key"):
        HyparPlan.from_dict({**good, "extra": 1})
    bad_layer = json.loads(json.dumps(good))
    bad_layer["layers"][1]["elements"] = "many"
    with pytest.raises(compresskit.ConfigError, match=r"plan\.layers\[1\]\.elements: got 'many', expected a number"):
        HyparPlan.from_dict(bad_layer)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(compresskit.ConfigError, match="broken.json: not a HyPar plan.json"):
        HyparPlan.load(tmp_path / "broken.json")
    with pytest.raises(compresskit.ConfigError, match="cannot read the plan"):
        HyparPlan.load(tmp_path / "absent.json")


def test_partitions_are_searched_and_recorded():
    paper = _plan("vgg-a", 16)
    assert paper.partitions == ["dp", "mp"] and all(set(r.choices) <= {"dp", "mp"} for r in paper.layers)
    cfg = HyparConfig(accelerators=16, batch=128, partitions=["dp", "mp", "mp_out"], search="joint")
    accpar = plan_layers(paper_network("vgg-a"), cfg, "vgg-a")
    assert accpar.partitions == ["dp", "mp", "mp_out"]
    assert any("mp_out" in r.choices for r in accpar.layers)
    assert accpar.baselines == ["all data parallel", "all model parallel (mp)", "all model parallel (mp_out)",
                                "one weird trick"]
    # a larger space never costs more
    assert accpar.total_elements["hypar"] <= _plan("vgg-a", 16, search="joint").total_elements["hypar"]
    assert HyparPlan.from_json(accpar.to_json()) == accpar


# ------------------------------------------------------------------------------------------------ stats table
@pytest.mark.parametrize("network,accelerators,search", [("alexnet", 16, "hierarchical"), ("vgg-e", 64, "joint"),
                                                         ("lenet-c", 2, "hierarchical"), ("sfc", 8, "joint")])
def test_level_stats_add_up_to_the_totals(network, accelerators, search):
    plan = _plan(network, accelerators, batch=256, search=search)
    total = plan.total_elements["hypar"]
    stats = plan.level_stats
    assert [s.level for s in stats] == list(range(plan.levels))
    assert sum(s.elements for s in stats) == pytest.approx(total, rel=1e-12)
    assert sum(s.share for s in stats) == pytest.approx(1.0)
    assert sum(r.elements for r in plan.layers) == pytest.approx(total, rel=1e-12)
    for k, s in enumerate(stats):
        assert s.groups == 2**k and s.group_size == accelerators // 2**k and s.groups * s.group_size == accelerators
        assert s.gradient_elements + s.partial_sum_elements + s.transition_elements == pytest.approx(s.elements)
        assert s.dp_layers == sum(r.choices[k] == "dp" for r in plan.layers)
        assert s.dp_layers + s.mp_layers == len(plan.layers)
        assert s.elements == pytest.approx(sum(r.level_elements[k] for r in plan.layers))
        assert s.bytes == s.elements * 4
    for r in plan.layers:
        assert sum(r.level_elements) == pytest.approx(r.elements)
    for name in plan.baselines:
        assert sum(r.baseline_elements[name] for r in plan.layers) == pytest.approx(plan.total_elements[name])
    # level 0 independently: the top split exchanges the full kernel of every layer data parallel there, and the
    # whole output (partial sums) of every layer model parallel (by input channel) there
    layers = paper_network(network)
    assert stats[0].gradient_elements == pytest.approx(
        sum(2 * l.weight_elems for l, r in zip(layers, plan.layers) if r.choices[0] == "dp"))
    assert stats[0].partial_sum_elements == pytest.approx(
        sum(2 * 256 * l.output_elems for l, r in zip(layers, plan.layers) if r.choices[0] == "mp"))
    # the rendered table's total row is the plan's total
    cols, rows = level_table(plan)
    assert len(rows) == plan.levels + 1
    total_row = dict(zip(cols, rows[-1]))
    assert total_row["level"] == "total" and total_row["elements"] == round(total)
    assert total_row["dp layers"] + total_row["mp layers"] == plan.levels * len(plan.layers)
    assert [row[0] for row in layer_table(plan)[1]] == [l.name for l in layers]


def test_markdown_and_html_have_the_stats_table():
    plan = _plan()
    md = render_markdown(plan)
    assert "## Per hierarchy level" in md and "| level | groups x accelerators | dp layers | mp layers |" in md
    assert "| 0 | 1 x 16 |" in md and "| 3 | 8 x 2 |" in md and "| total | 16 accelerators |" in md
    assert f"| {round(plan.total_elements['hypar']):,} |" in md
    assert "| conv1 | conv |" in md
    html = render_html(plan, b"\x89PNG")
    assert "<h2>Per hierarchy level</h2>" in html and "<td>1 x 16</td>" in html
    assert "<img alt='communication per layer' src='data:image/png;base64," in html


# ------------------------------------------------------------------------------------------------ compresskit plan
def test_plan_subcommand_comes_from_the_plugin():
    parser = argparse.ArgumentParser()
    HyparPlugin.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "r.yaml", "--accelerators", "8", "--set", "a=1", "--set", "b=2"])
    assert args.func is plan_command and args.recipe == "r.yaml" and args.accelerators == 8
    assert args.set == ["a=1", "b=2"]
    args = argparse.Namespace(accelerators=16, batch=None, dtype="float16")
    assert flag_overrides(args, 2) == ["stages.0.accelerators=16", "stages.0.dtype=float16",
                                       "stages.1.accelerators=16", "stages.1.dtype=float16"]


def test_plan_cli_in_process(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["plan", "--model", "alexnet", "--accelerators", "16", "--batch", "128", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    plan = HyparPlan.load(out / "plan.json")
    assert plan == _plan_without_time(plan)
    assert stdout[0].startswith("alexnet: 16 accelerators, batch 128: HyPar moves ")
    assert "MiB per step; all data parallel " in stdout[0]
    assert stdout[1] == f"wrote {out}/plan.md, plan.html, comm_per_layer.png, plan.json"
    assert (out / "comm_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert "| total | 16 accelerators |" in (out / "plan.md").read_text()
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["plugin"] == "hypar" and stage["accelerators"] == 16
    assert [t["title"] for t in stage["tables"]] == ["Communication per step", "Communication per hierarchy level"]


def _plan_without_time(loaded: HyparPlan) -> HyparPlan:
    """A fresh plan of the same network with the loaded plan's planner time (the only field that varies)."""
    fresh = _plan(loaded.title, loaded.accelerators, loaded.batch, loaded.search, loaded.dtype)
    fresh.planner_seconds = loaded.planner_seconds
    return fresh


def test_plan_flags_and_set_are_overrides_of_the_hypar_stages(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 1}\n"
                      "stages:\n"
                      "  - {plugin: dasnet}\n"
                      "  - {plugin: hypar, network: lenet-c, accelerators: 2, batch: 32}\n"
                      f"output: {{dir: {tmp_path / 'out'}}}\n")
    # --set uses the recipe's own indices; the flags apply to every hypar stage and win over --set
    assert main(["plan", str(recipe), "--set", "stages.1.batch=64", "--set", "stages.1.search=joint",
                 "--set", "stages.1.accelerators=32", "--accelerators", "4", "--dtype", "float16"]) == 0
    plan = HyparPlan.load(tmp_path / "out" / "plan.json")
    assert (plan.title, plan.accelerators, plan.batch, plan.search, plan.dtype) == \
        ("lenet-c", 4, 64, "joint", "float16")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recipe"]["stages"] == [{"plugin": "hypar", "network": "lenet-c", "accelerators": 4, "batch": 64,
                                           "search": "joint", "dtype": "float16"}]
    assert "train" not in report["recipe"]
    capsys.readouterr()


@pytest.mark.parametrize("argv,expected", [
    (["plan", "--model", "alexnet", "--accelerators", "6"],
     "error: stages[0].accelerators: got 6, expected a power of two (e.g. 4 or 8)"),
    (["plan", "--model", "alexnet", "--dtype", "int4"],
     "error: stages[0].dtype: got 'int4', expected one of float32, float16, bfloat16"),
    (["plan"], "error: plan: give a recipe or --model"),
    (["plan", "--model", "alexnet", "--set", "stages.0.partitions=[dp, tp]"],
     "error: stages[0].partitions[1]: got 'tp', expected one of dp, mp, mp_out"),
    (["plan", "--model", "alexnet", "--set", "stages.0.partitions=[dp, dp]"],
     "error: stages[0].partitions: got ['dp', 'dp'], expected distinct names"),
    (["plan", "--model", "alexnet", "--accelerators", "1024", "--set", "stages.0.partitions=[dp, mp, mp_out]",
      "--set", "stages.0.search=joint"],
     "error: stages[0].search: joint search over 3 partitions on 1024 accelerators has 59,049 states per layer"),
    (["plan", "--model", "vgg-f"], "error: --model: unknown network or model 'vgg-f' (did you mean 'vgg-e'?)"),
    (["plan", "--model", "lenet5", "--set", "stages.0.input_shape=[3, 32, 32]"],
     "error: stages[0].input_shape: the sample input (per sample 3x32x32) does not fit LeNet5 at 'features.0': "),
])
def test_plan_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("plan.json"))


def test_plan_cli_recipe_without_hypar_stage(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [{plugin: dasnet}]\n")
    assert main(["plan", str(recipe)]) == 2
    assert "error: stages: the recipe has no 'hypar' stage to plan" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_network_is_the_registry_did_you_mean_error():
    assert isinstance(NETWORKS, Registry) and "vgg-e" in NETWORKS and "VGG-E".lower() in NETWORKS
    expected = str(unknown_name("network", "vgg-f", list(NETWORKS), "stages[0].network"))
    assert expected.startswith("stages[0].network: unknown network 'vgg-f' (did you mean 'vgg-e'?); available: ")
    with pytest.raises(compresskit.ConfigError) as info:
        compresskit.validate_recipe({"stages": [{"plugin": "hypar", "network": "vgg-f"}]})
    assert str(info.value) == expected
    with pytest.raises(compresskit.ConfigError, match=r"^network: unknown network 'alexnt' \(did you mean "
                                                      r"'alexnet'\?\); available: alexnet, convnet, lenet"):
        paper_network("alexnt")
    assert len(paper_network("VGG-E")) == 19


def test_runtime_errors_name_the_stage_field():
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[0\]\.input_shape: needed to trace the model"):
        compresskit.apply(LeNet5(), {"stages": [{"plugin": "hypar"}]})
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[1\]\.input_shape: the sample input \(per sample "
                                                      r"3x32x32\) does not fit LeNet5 at 'features\.0': "):
        compresskit.apply(LeNet5(), {"stages": [{"plugin": "hypar", "network": "lenet"},
                                                {"plugin": "hypar", "input_shape": [3, 32, 32]}]})
    recipe = compresskit.validate_recipe({"stages": [{"plugin": "hypar"}]})
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[0\]\.network: no model to plan"):
        compresskit.run(recipe)
    result = compresskit.apply(LeNet5(), {"stages": [{"plugin": "hypar", "input_shape": [1, 32, 32]}]})
    assert isinstance(result.plugins[0].plan, HyparPlan) and result.plugins[0].plan.title == "LeNet5"


def test_plan_export_writes_placements_dtensor_can_read(tmp_path, capsys):
    from torch.distributed.tensor import Partial, Replicate, Shard

    target = tmp_path / "exported.json"
    assert main(["plan", "--model", "alexnet", "--accelerators", "4", "--out", str(tmp_path / "run"),
                 "--set", "stages.0.partitions=[dp, mp, mp_out]", "--export", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    data = json.loads(target.read_text())
    plan = HyparPlan.from_dict(data["plan"])
    assert [p["module"] for p in data["placements"]] == [r.layer for r in plan.layers]
    names = {"Shard": Shard, "Replicate": Replicate, "Partial": Partial}
    want_weight = {"dp": Replicate(), "mp": Shard(1), "mp_out": Shard(0)}
    for place, layer in zip(data["placements"], plan.layers):
        assert place["choices"] == layer.choices and place["mesh_shape"] == [2, 2]
        for key in ("weight", "bias", "input", "output"):
            for text in place[key]:
                kind, arg = text[:-1].split("(")
                assert kind in names and (names[kind](int(arg)) if arg else names[kind]()) is not None
        weights = [names[t.split("(")[0]](*(int(a) for a in t[:-1].split("(")[1:] if a)) for t in place["weight"]]
        assert weights == [want_weight[c] for c in layer.choices]
