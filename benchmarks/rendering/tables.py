"""Results files whose own table is rendered as it stands."""
from __future__ import annotations

import functools

from .core import renderer, rows_table

# results files whose own table is rendered as it stands: block name -> (file, decimals of some columns)
PLAIN_TABLES: dict[str, tuple[str, dict[str, int]]] = {
    "fiited-drift": ("fiited_drift", {"memory ratio": 3, "post-drift AUC": 4, "vs dense": 4}),
    "fiited-planted": ("fiited_planted", {"test AUC": 4, "vs dense": 4, "vs oracle": 4}),
    "fiited-lookup": ("fiited_lookup", {"speed vs fp32 chunks": 2}),
    "fiited-throughput": ("fiited_throughput", {"speed vs faster peer (TBE for DLRM)": 2}),
    "fiited-rss": ("fiited_rss", {}),
    "dasnet-accuracy": ("dasnet_accuracy", {"mean test acc": 4, "min": 4, "max": 4, "points vs dense": 2}),
    "dasnet-speed": ("dasnet_speed", {}),
    "hypar-networks": ("hypar", {"HyPar GiB/step": 3, "joint GiB/step": 3, "all-DP / HyPar": 2,
                                "best all-MP / HyPar": 1, "OWT / HyPar": 2}),
    "hypar-measured": ("hypar_measured", {}),
    "hypar-graphs": ("hypar_graphs", {}),
    "hypar-planner-time": ("hypar_planner_time", {}),
    "hypar-step-model": ("hypar_step_model", {}),
    "distributed": ("distributed", {}),
}
for _name, (_file, _digits) in PLAIN_TABLES.items():
    renderer(_name)(functools.partial(rows_table, _file, _digits))
