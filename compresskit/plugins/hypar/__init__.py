"""HyPar: hierarchical layer-wise data/model parallelism planning for accelerator arrays."""
from .graph import PAPER_NETWORKS, LayerSpec, layers_from_model, paper_network
from .plugin import HyparConfig, HyparPlugin, plan_layers
from .search import baselines, exhaustive_plan, hierarchical_plan, joint_plan

__all__ = ["LayerSpec", "layers_from_model", "paper_network", "PAPER_NETWORKS", "HyparPlugin", "HyparConfig",
           "plan_layers", "hierarchical_plan", "joint_plan", "exhaustive_plan", "baselines"]
