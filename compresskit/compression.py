"""The one engine: :func:`prepare` puts plugins on a model and returns a :class:`Compression` handle that any
training loop drives. ``compresskit.apply`` and ``compresskit apply`` run their own trainer through the same handle.

Typical use in your own loop::

    compression = compresskit.prepare(model, FiitedConfig(target_memory_ratio=0.1), total_steps=10_000)
    model = compression.model
    optimizer = torch.optim.AdamW(model.parameters())        # after prepare: it may have swapped modules
    compression.attach_optimizer(optimizer)
    for batch in loader:
        loss = my_loss(model(*batch.inputs), batch.label)
        loss.backward()
        compression.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        compression.step()
    model = compression.finalize()
    print(compression.report())
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from .distributed.collective import Collective
from .errors import ConfigError
from .metrics import module_bytes
from .plugin import Plugin, RunContext
from .recipe import Recipe, Stage, is_validated, load_recipe, validate_recipe
from .registry import plugin_for_config
from .data.batches import SAMPLE_ROWS
from .schema import build, to_dict



def stages_of(config: Any) -> tuple[list[Stage], Recipe | None]:
    """The typed stages ``config`` describes, and its recipe when it is one.

    ``config`` is a plugin's typed config (``FiitedConfig(...)``), a stage dict (``{"plugin": "fiited", ...}``), a
    list of those, a recipe dict (with ``stages``), a typed :class:`Recipe` or a recipe file path.
    """
    if isinstance(config, Recipe):  # one built or edited in Python may hold raw stages or bad values
        recipe = config if is_validated(config) else validate_recipe(to_dict(config))
        return list(recipe.stages), recipe
    if isinstance(config, str):
        recipe, _ = load_recipe(config, require_model=False)
        return list(recipe.stages), recipe
    if isinstance(config, dict) and "plugin" not in config:
        recipe = validate_recipe(config)
        return list(recipe.stages), recipe
    items = config if isinstance(config, (list, tuple)) else [config]
    stages = []
    for i, item in enumerate(items):
        path = f"stages[{i}]" if isinstance(config, (list, tuple)) else None
        if isinstance(item, Stage):
            stages.append(item)
        elif isinstance(item, dict):
            stages.append(Stage.from_config(item, path or str(item.get("plugin", "stage"))))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            plugin = plugin_for_config(item)
            where = path or plugin.name
            stages.append(Stage(plugin, build(plugin.Config, to_dict(item), where), where))  # bounds re-checked
        else:
            raise ConfigError("config", f"got {type(item).__name__}; expected a plugin config (e.g. FiitedConfig), "
                                        f"a stage dict, a list of them, a recipe dict, a Recipe or a recipe path")
    return stages, None


class Compression:
    """Plugins applied to a model, driven by the caller's training loop (see the module docstring).

    Call :meth:`after_backward` once the gradients of an optimizer step are complete (after the last micro-batch's
    ``backward()``), :meth:`step` after ``optimizer.step()``, and :meth:`finalize` after training.
    """

    def __init__(self, model: nn.Module | None, plugins: Sequence[Plugin], ctx: RunContext) -> None:
        self.plugins = list(plugins)
        self.ctx = ctx
        self.steps = 0
        self.finalized = False
        self._sample_hook = None
        self.model = model

    @property
    def model(self) -> nn.Module | None:
        """The prepared (after :meth:`finalize`: the final) model."""
        return self.ctx.model

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        self.ctx.model = model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer plugins keep in step with the parameters they resize (see :meth:`attach_optimizer`)."""
        return self.ctx.optimizer

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Tell the plugins which optimizer trains the model: a plugin that replaces a parameter (FIITED's pools
        shrink) points the optimizer at the new one and carries its state along. Build it after :func:`prepare`."""
        if optimizer is not None and self.model is not None:
            live = {id(p) for p in self.model.parameters()}
            stale = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in live)
            if stale:
                raise ConfigError("optimizer", f"holds {stale} parameter(s) the prepared model no longer has "
                                               f"(prepare() replaced modules); build the optimizer from "
                                               f"compression.model.parameters() after prepare()")
        self.ctx.optimizer = optimizer

    def capture_sample(self) -> None:
        """Keep the first rows of the first batch the model sees as the sample input (tracing, kernel tuning)."""
        if self.ctx.sample_input is not None or self.model is None or self._sample_hook is not None:
            return

        def keep(module: nn.Module, args: tuple) -> None:
            if not args:                # called with keyword arguments only: nothing to keep as a sample
                return
            self.ctx.sample_input = tuple(a[:SAMPLE_ROWS].detach().clone() if torch.is_tensor(a) else a
                                          for a in args)
            self._sample_hook.remove()
            self._sample_hook = None

        self._sample_hook = self.model.register_forward_pre_hook(keep)

    def after_backward(self) -> None:
        """Gradients of the coming optimizer step are complete (before ``optimizer.step()``)."""
        self._check_open("after_backward")
        for p in self.plugins:
            p.on_after_backward(self.steps + 1, self.ctx)

    def step(self) -> None:
        """One optimizer step is done: advance the step count and run the plugins' in-training schedules."""
        self._check_open("step")
        for p in self.plugins:
            p.on_step(self.steps + 1, self.ctx)
        self.steps += 1

    def settled(self) -> bool:
        """Whether no stage changes the tables' bytes after the current step (:meth:`Plugin.settled`)."""
        return all(p.settled(self.steps, self.ctx) for p in self.plugins)

    def finalize(self) -> nn.Module | None:
        """After training: let each plugin convert the model (e.g. to its sparse inference path); returns it."""
        self._check_open("finalize")
        if self._sample_hook is not None:
            self._sample_hook.remove()
            self._sample_hook = None
        model = self.model
        for p in self.plugins:
            model = p.finalize(model, self.ctx)
            self.model = model
        self.finalized = True
        return model

    def report(self) -> dict[str, Any]:
        """Each stage's config and numbers, and the model's parameter/buffer bytes (JSON-serialisable)."""
        out: dict[str, Any] = {"stages": [{"plugin": p.name, "config": to_dict(p.config), **p.report(self.ctx)}
                                          for p in self.plugins]}
        if self.model is not None:
            out["memory"] = module_bytes(self.model)
        return out

    def metrics(self) -> dict[str, float]:
        """Each stage's training-log scalars, keyed ``<plugin>/<name>`` (``<plugin><i>/`` when a plugin appears
        twice). Every rank of a distributed run calls it at the same steps."""
        out: dict[str, float] = {}
        for prefix, plugin in self._prefixed():
            out.update({f"{prefix}/{k}": v if isinstance(v, int) else float(v)
                        for k, v in plugin.metrics(self.ctx).items()})
        return out

    def figures(self, log: list[dict[str, float]]) -> list[Any]:
        """Each stage's report plots (:class:`compresskit.plots.Figure`), given the training log's rows (each
        stage sees its own metrics under their plain names)."""
        figures = []
        for prefix, plugin in self._prefixed():
            own = [{**{k: v for k, v in row.items() if "/" not in k},
                    **{k[len(prefix) + 1:]: v for k, v in row.items() if k.startswith(prefix + "/")}} for row in log]
            figures += plugin.figures(self.ctx, own)
        return figures

    def _prefixed(self) -> list[tuple[str, Plugin]]:
        names = [p.name for p in self.plugins]
        return [(p.name if names.count(p.name) == 1 else f"{p.name}{i}", p) for i, p in enumerate(self.plugins)]

    def state_dict(self) -> dict[str, Any]:
        """The step count and each plugin's state; save it beside ``model.state_dict()`` and the optimizer's."""
        return {"steps": self.steps, "plugins": [p.state_dict() for p in self.plugins]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Order on resume: :func:`prepare`, ``model.load_state_dict``, build the
        optimizer, ``optimizer.load_state_dict``, :meth:`attach_optimizer`, then this."""
        plugin_states = state.get("plugins", [])
        if len(plugin_states) != len(self.plugins):
            raise ConfigError("state_dict", f"holds {len(plugin_states)} plugin states, this compression has "
                                            f"{len(self.plugins)} stages ({', '.join(p.name for p in self.plugins)})")
        for plugin, pstate in zip(self.plugins, plugin_states):
            plugin.load_state_dict(pstate)
        self.steps = int(state.get("steps", 0))

    def _check_open(self, what: str) -> None:
        if self.finalized:
            raise ConfigError(what, "this compression is finalized; prepare() the model again to train more")


def prepare(model: nn.Module | None, config: Any, *, optimizer: torch.optim.Optimizer | None = None,
            total_steps: int | None = None, data: Any = None, sample_input: tuple | None = None,
            out_dir: str | None = None, collective: Collective | None = None) -> Compression:
    """Apply the plugins ``config`` describes to ``model`` (in place where they can) and return the handle.

    ``config``: a plugin's typed config, a stage dict, a list of them, a recipe dict/path or a :class:`Recipe`
    (its ``train`` section then informs choices such as FIITED's fused optimizer). ``total_steps`` is the
    length of training that fraction-based schedules refer to. ``data`` (a DataBundle) serves plugins that look
    at data before training (FIITED's mixed_dim counts rows). ``sample_input``: a batch of model inputs for
    tracing and tuning; by default the first rows of the first batch the model sees in training. ``collective``:
    the ranks of a distributed run, after :func:`compresskit.distributed.shard_tables` (FIITED then prunes with one
    global threshold over every rank's tables).
    """
    stages, recipe = stages_of(config)
    ctx = RunContext(model=model, data=data, train=recipe.train if recipe else None, total_steps=total_steps or 0,
                     out_dir=out_dir, sample_input=sample_input, collective=collective or Collective.single())
    plugins = [stage.instantiate() for stage in stages]
    if model is None and any(p.kind == "transform" for p in plugins):
        raise ConfigError("model", "required: a transform plugin needs a model to apply to")
    for plugin in plugins:
        model = plugin.apply(model, ctx)
        ctx.model = model
    compression = Compression(model, plugins, ctx)
    compression.attach_optimizer(optimizer)
    compression.capture_sample()
    return compression
