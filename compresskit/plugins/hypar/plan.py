"""The typed HyPar plan: what the planner returns, the report renders and ``plan.json`` holds.

:class:`HyparPlan` round-trips through JSON exactly: ``HyparPlan.from_json(plan.to_json()) == plan``, and
``HyparPlan.load(path)`` reads back a ``plan.json`` that :meth:`HyparPlan.save` (or the report) wrote.
Element counts are per training step, summed over all accelerators; bytes are elements x the dtype's size.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ...atomic import write_text
from ...errors import ConfigError
from ...schema import build
from .cost import (BACKWARD, DTYPE_BYTES, FORWARD, GRADIENT, PARTIAL_SUM, PARTITION_NAMES, executed_terms,
                   level_terms)
from .chain import LayerSpec
from .perf import compare, step_estimate
from .search import Plan


@dataclass
class LayerPlan:
    """One weighted layer of the plan: its choice at every level and the communication charged to it (its own
    weight-gradient exchange plus the transition to the next layer)."""

    layer: str
    kind: str                             # "conv" or "fc"
    input_elems: int                      # per sample: the boundary tensor from the previous weighted layer
    weight_elems: int                     # kernel elements, bias included
    choices: list[str]                    # "dp" / "mp" / "mp_out" per level, top first
    elements: float                       # elements charged to this layer, all levels
    bytes: float
    level_elements: list[float]           # ... split by level (sums to ``elements``)
    baseline_elements: dict[str, float]   # elements charged to this layer by each baseline plan


@dataclass
class LevelStats:
    """One level of the hierarchy (the TorchRec-style stats row): ``groups`` groups of ``group_size``
    accelerators are each split in two; what its layers chose and what crosses the split."""

    level: int                    # 0 = top
    groups: int                   # 2^level groups split at this level
    group_size: int               # accelerators per group before the split
    dp_layers: int                # layers data parallel at this level
    mp_layers: int                # layers model parallel at this level (mp or mp_out)
    gradient_elements: float      # weight-gradient exchange (dp layers)
    partial_sum_elements: float   # partial sums completed inside model-parallel layers (mp: outputs, mp_out: errors)
    transition_elements: float    # feature maps (forward) and errors (backward) re-laid out between layers
    elements: float               # gradient + transition
    bytes: float
    share: float                  # of the plan's total elements (0 when the total is 0)


@dataclass
class HyparPlan:
    """A HyPar plan for ``accelerators = 2^levels`` accelerators with totals and ratios against the baselines.

    ``total_elements`` / ``total_bytes`` have the key ``hypar`` and one key per baseline; ``ratio_vs_hypar`` is
    baseline / HyPar per baseline (``None`` when HyPar moves nothing). ``step`` is the modelled training step
    (:mod:`~.perf`, :data:`~.perf.HMC_ACCELERATOR`) of HyPar and each baseline: ``seconds``, ``joules``, and
    ``speedup`` / ``energy_efficiency`` against all data parallel."""

    title: str
    accelerators: int
    levels: int
    batch: int
    dtype: str
    search: str
    partitions: list[str]
    planner_seconds: float
    layers: list[LayerPlan]
    level_stats: list[LevelStats]
    total_elements: dict[str, float]
    total_bytes: dict[str, float]
    ratio_vs_hypar: dict[str, Optional[float]]
    step: dict[str, dict[str, float]]     # modelled step per plan: seconds, joules, speedup / energy vs all-DP
    # elements per step as parallelize runs each plan (cost.executed_terms); keys as total_elements
    executed_elements: dict[str, float] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON types only); :meth:`from_dict` takes it back."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Indented JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> HyparPlan:
        """The plan from :meth:`to_dict`'s output, through the one validator (:func:`compresskit.schema.build`): a
        ConfigError naming the key on a missing, unknown or mistyped entry."""
        return build(cls, data, "plan")

    @classmethod
    def from_json(cls, text: str) -> HyparPlan:
        """The plan from :meth:`to_json`'s output."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> str:
        """Write ``plan.json`` atomically; returns the path."""
        return str(write_text(path, self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HyparPlan:
        """Read a ``plan.json``; a missing or malformed file is a ConfigError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except OSError as e:
            raise ConfigError(str(path), f"cannot read the plan: {e.strerror or e}") from None
        except (ValueError, ConfigError) as e:  # json.JSONDecodeError is a ValueError
            raise ConfigError(str(path), f"not a HyPar plan.json: {e}") from None

    # ------------------------------------------------------------------------------------------------ views
    @property
    def element_bytes(self) -> int:
        """Bytes per element of ``dtype``."""
        return DTYPE_BYTES[self.dtype]

    def placements(self) -> list[dict[str, Any]]:
        """Per weighted layer, how its tensors lie on a device mesh of shape ``(2,) * levels`` (mesh dim k = level
        k), in DTensor's placement names, so other tools can apply the plan: ``weight`` (``[out, in, ...]``: dp
        Replicate, mp Shard(1), mp_out Shard(0)), ``bias``, ``input`` (dp Shard(0), mp Shard(1), mp_out
        Replicate) and ``output`` (dp Shard(0), mp Partial until its partial sums are exchanged, mp_out
        Shard(1))."""
        table = {"dp": ("Replicate()", "Replicate()", "Shard(0)", "Shard(0)"),
                 "mp": ("Shard(1)", "Replicate()", "Shard(1)", "Partial()"),
                 "mp_out": ("Shard(0)", "Shard(0)", "Replicate()", "Shard(1)")}
        out = []
        for layer in self.layers:
            rows = [table[c] for c in layer.choices]
            out.append({"module": layer.layer, "kind": layer.kind, "choices": list(layer.choices),
                        "mesh_shape": [2] * self.levels,
                        **{key: [r[i] for r in rows] for i, key in enumerate(("weight", "bias", "input", "output"))}})
        return out

    def export(self, path: str | os.PathLike) -> str:
        """Write the plan with its per-module placements (``{"plan": ..., "placements": [...]}``) atomically."""
        return str(write_text(path, json.dumps({"plan": self.to_dict(), "placements": self.placements()},
                                               indent=2) + "\n"))

    @property
    def baselines(self) -> list[str]:
        """Names of the baseline plans, in report order."""
        return [k for k in self.total_elements if k != "hypar"]


# ---------------------------------------------------------------------------------------------------- building
def build_plan(title: str, layers: Sequence[LayerSpec], plan: Plan, baselines: dict[str, Plan], batch: int,
               accelerators: int, dtype: str, search: str, seconds: float) -> HyparPlan:
    """The typed plan from a search result: per-layer choices and costs, per-level stats, totals and ratios."""
    elem_bytes = DTYPE_BYTES[dtype]
    levels = plan.levels
    terms = level_terms(layers, plan.states, batch, plan.space)      # [layer, level, phase]
    base_costs = {name: level_terms(layers, p.states, batch, p.space).sum(axis=(1, 2))
                  for name, p in baselines.items()}
    choices = [plan.choices(i) for i in range(len(layers))]
    rows = []
    for i, layer in enumerate(layers):
        per_level = [float(v) for v in terms[i].sum(axis=1)]
        elements = float(terms[i].sum())
        rows.append(LayerPlan(layer.name, layer.kind, int(layer.input_elems), int(layer.weight_elems), choices[i],
                              elements, elements * elem_bytes, per_level,
                              {name: float(costs[i]) for name, costs in base_costs.items()}))
    total = float(plan.elements)
    stats = []
    for k in range(levels):
        at_k = terms[:, k, :]
        elements = float(at_k.sum())
        dp = sum(1 for c in choices if c[k] == "dp")
        stats.append(LevelStats(k, 2**k, accelerators >> k, dp, len(layers) - dp,
                                float(at_k[:, GRADIENT].sum()), float(at_k[:, PARTIAL_SUM].sum()),
                                float(at_k[:, [FORWARD, BACKWARD]].sum()),
                                elements, elements * elem_bytes,
                                elements / total if total else 0.0))
    totals = {"hypar": total, **{name: float(p.elements) for name, p in baselines.items()}}
    estimates = {name: step_estimate(layers, level_terms(layers, p.states, batch, p.space),
                                     [p.choices(i) for i in range(len(layers))], batch, accelerators,
                                     element_bytes=elem_bytes)
                 for name, p in {"hypar": plan, **baselines}.items()}
    ratios = compare(estimates)
    return HyparPlan(
        title=title, accelerators=accelerators, levels=levels, batch=batch, dtype=dtype, search=search,
        partitions=[PARTITION_NAMES[c] for c in plan.space.partitions], planner_seconds=float(seconds),
        layers=rows, level_stats=stats, total_elements=totals,
        total_bytes={k: v * elem_bytes for k, v in totals.items()},
        ratio_vs_hypar={name: (float(p.elements) / total if total else None) for name, p in baselines.items()},
        step={name: {"seconds": e.seconds, "joules": e.joules, **ratios[name]} for name, e in estimates.items()},
        executed_elements={name: float(executed_terms(layers, p.states, batch, p.space).sum())
                           for name, p in {"hypar": plan, **baselines}.items()},
    )


def fixed_plan(layers: Sequence[LayerSpec], choices: Sequence[Sequence[str]], batch: int, *,
               dtype: str = "float32", title: str = "given plan") -> HyparPlan:
    """The typed plan for choices given per layer and level (``[["dp", "mp"], ...]``, top level first), with the
    same totals, baselines and modelled step as a searched one (e.g. to run or price a hand-made plan)."""
    from .cost import StateSpace, plan_cost
    from .search import baselines

    if len(choices) != len(layers) or len({len(c) for c in choices}) != 1:
        raise ConfigError("choices", f"need one list of per-level choices for each of the {len(layers)} layers, "
                                     f"all of one length")
    bad = sorted({c for row in choices for c in row} - set(PARTITION_NAMES))
    if bad:
        raise ConfigError("choices", f"got {bad[0]!r}, expected one of {', '.join(PARTITION_NAMES)}")
    space = StateSpace.of(PARTITION_NAMES, len(choices[0]))
    states = [space.state([PARTITION_NAMES.index(c) for c in row]) for row in choices]
    plan = Plan(states, plan_cost(layers, states, batch, space), space)
    return build_plan(title, layers, plan, baselines(layers, batch, space), batch, 2**space.levels, dtype,
                      "given", 0.0)
