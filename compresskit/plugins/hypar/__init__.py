"""HyPar: hierarchical layer-wise data/model parallelism planning for accelerator arrays."""
from .chain import NETWORKS, PAPER_NETWORKS, LayerSpec, layers_from_model, paper_network
from .cost import executed_terms
from .parallel import HyparParallel, parallelize, train_step
from .plan import HyparPlan, LayerPlan, LevelStats, build_plan, fixed_plan
from .plugin import HyparConfig, HyparPlugin, plan_layers
from .search import baselines, exhaustive_plan, hierarchical_plan, joint_plan

__all__ = ["LayerSpec", "layers_from_model", "paper_network", "PAPER_NETWORKS", "NETWORKS", "HyparPlugin",
           "HyparConfig", "HyparPlan", "LayerPlan", "LevelStats", "build_plan", "fixed_plan", "plan_layers",
           "hierarchical_plan", "joint_plan", "exhaustive_plan", "baselines", "parallelize", "train_step",
           "HyparParallel", "executed_terms"]
