"""The plan a unit's fused forward replays (:mod:`resnet_fast.graph_fusion` makes it):
:class:`FusedForward` and its steps.

A plan is a list of steps, each producing one value; values are the forward's arguments
followed by the steps' results, and a step's arguments refer to earlier values by index
(:class:`Ref`). A step is a node of the traced graph run as it is (:class:`Call`), or a fused
conv + BatchNorm (+ ReLU) (:class:`FusedConv`) or block end (:class:`FusedBlockEnd`). Steps name
the unit's child modules by their attribute paths and look them up on each call, so a plan
follows ``.to()``, ``train()``/``eval()``, ``load_state_dict``, ``copy.deepcopy`` and pickling
of the unit it belongs to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from torch import Tensor, nn

from resnet_fast.nn import block_end, conv_bn_act

__all__ = ["Ref", "Call", "FusedConv", "FusedBlockEnd", "Step", "FusedForward", "load"]

# The module a functional ReLU is fused as (conv_bn_act takes the activation as a module).
_RELU = nn.ReLU()


@dataclasses.dataclass(frozen=True)
class Ref:
    """An argument that is the ``index``-th value of the plan."""

    index: int


def load(arg: Any, values: list) -> Any:
    """``arg`` with every :class:`Ref` in it replaced by its value."""
    if isinstance(arg, Ref):
        return values[arg.index]
    if isinstance(arg, tuple):
        items = tuple(load(a, values) for a in arg)
        return type(arg)(*items) if hasattr(arg, "_fields") else items
    if isinstance(arg, list):
        return [load(a, values) for a in arg]
    if isinstance(arg, dict):
        return {k: load(v, values) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(load(arg.start, values), load(arg.stop, values), load(arg.step, values))
    return arg


def _resolve(root: nn.Module, path: tuple[str, ...]) -> Any:
    for name in path:
        root = getattr(root, name)
    return root


@dataclasses.dataclass(frozen=True)
class Call:
    """A node of the traced graph, run as it is: ``op`` is fx's (``call_module``,
    ``call_function``, ``call_method``, ``get_attr``), ``target`` a module or attribute path,
    a function or a method name."""

    op: str
    target: Any
    args: tuple
    kwargs: dict

    def run(self, root: nn.Module, values: list, forward: "FusedForward") -> Any:
        if self.op == "get_attr":
            return _resolve(root, self.target)
        args, kwargs = load(self.args, values), load(self.kwargs, values)
        if self.op == "call_module":
            return _resolve(root, self.target)(*args, **kwargs)
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)

    def describe(self) -> str:
        name = ".".join(self.target) if isinstance(self.target, tuple) else (
            self.target if isinstance(self.target, str) else
            getattr(self.target, "__name__", repr(self.target)))
        return f"{self.op} {name}"


@dataclasses.dataclass(frozen=True)
class _FusedStep:
    """``act(bn(conv(input)) ...)``: what both fused steps hold. ``act`` is the path of the
    activation module, or ``None``: a functional ReLU when ``functional_relu``, else none."""

    input: Ref
    conv: tuple[str, ...]
    bn: tuple[str, ...]
    act: Optional[tuple[str, ...]]
    functional_relu: bool

    def _input_and_modules(self, root: nn.Module, values: list) -> tuple:
        """(input, conv, bn, act) of one call."""
        act = (_resolve(root, self.act) if self.act is not None
               else _RELU if self.functional_relu else None)
        return values[self.input.index], _resolve(root, self.conv), _resolve(root, self.bn), act

    def _describe(self, kind: str, *shortcut: str) -> str:
        parts = [".".join(self.conv), ".".join(self.bn), *shortcut]
        parts += [".".join(self.act)] if self.act else ["relu"] if self.functional_relu else []
        return f"{kind} " + " + ".join(parts)


@dataclasses.dataclass(frozen=True)
class FusedConv(_FusedStep):
    """``act(bn(conv(input)))`` as one :func:`resnet_fast.nn.conv_bn_act` call, handed on
    deferred when ``defer``."""

    defer: bool

    def run(self, root: nn.Module, values: list, forward: "FusedForward") -> Any:
        return conv_bn_act(*self._input_and_modules(root, values), defer=self.defer,
                           recompute=forward.memory_efficient and not self.defer,
                           backend=forward.backend)

    def describe(self) -> str:
        return self._describe("conv_bn_act") + (" (deferred)" if self.defer else "")


@dataclasses.dataclass(frozen=True)
class FusedBlockEnd(_FusedStep):
    """``act(bn(conv(input)) + shortcut)``, the shortcut optionally ``conv -> BN`` itself, as
    one :func:`resnet_fast.nn.block_end` call."""

    shortcut: Ref
    shortcut_conv: Optional[tuple[str, ...]]
    shortcut_bn: Optional[tuple[str, ...]]

    def run(self, root: nn.Module, values: list, forward: "FusedForward") -> Tensor:
        projection = () if self.shortcut_conv is None else (
            _resolve(root, self.shortcut_conv), _resolve(root, self.shortcut_bn))
        return block_end(*self._input_and_modules(root, values), values[self.shortcut.index],
                         *projection, recompute=forward.memory_efficient,
                         backend=forward.backend)

    def describe(self) -> str:
        shortcut = ("shortcut" if self.shortcut_conv is None
                    else f"{'.'.join(self.shortcut_bn)}({'.'.join(self.shortcut_conv)})")
        return self._describe("block_end", shortcut)


Step = Union[Call, FusedConv, FusedBlockEnd]


@dataclasses.dataclass(eq=False, repr=False)
class FusedForward:
    """The forward of ``module`` with its conv + BatchNorm (+ residual) (+ ReLU) chains fused:
    installed as the module's instance attribute ``forward`` (see
    :mod:`resnet_fast.graph_fusion`).

    ``inputs`` are the names of the forward's arguments; ``steps`` produce one value each, the
    fused ones running resnet_fast's ops with ``backend`` (``None``: the default for the
    input's device) and, when ``memory_efficient``, recomputing in backward the outputs of
    the convs they do not hand on deferred; ``output`` is the returned structure.
    """

    module: nn.Module
    inputs: tuple[str, ...]
    steps: tuple[Step, ...]
    output: Any
    backend: Optional[str] = None
    memory_efficient: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = list(args) if not kwargs and len(args) == len(self.inputs) else \
            self._bind(args, kwargs)
        root = self.module
        for step in self.steps:
            values.append(step.run(root, values, self))
        return load(self.output, values)

    def _bind(self, args: tuple, kwargs: dict) -> list:
        name = f"{type(self.module).__name__}.forward()"
        if len(args) > len(self.inputs):
            raise TypeError(f"{name} takes {len(self.inputs)} arguments, got {len(args)}")
        values, kwargs = list(args), dict(kwargs)
        for arg in self.inputs[len(args):]:
            if arg not in kwargs:
                raise TypeError(f"{name} missing argument {arg!r}")
            values.append(kwargs.pop(arg))
        if kwargs:
            raise TypeError(f"{name} got unexpected arguments {sorted(kwargs)}")
        return values

    def __repr__(self) -> str:
        fused = [s.describe() for s in self.steps if not isinstance(s, Call)]
        return (f"FusedForward({type(self.module).__name__}: {len(self.steps)} steps, "
                f"{len(fused)} fused: {'; '.join(fused)})")
