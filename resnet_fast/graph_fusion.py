"""Fusion by dataflow: the conv + BatchNorm (+ residual) (+ ReLU) chains of any module, found
with ``torch.fx`` and run as resnet_fast's fused ops.

A *unit* is a module whose own forward holds the chains: a ResNet block of any naming (timm's
``conv1, bn1, act1, ..., downsample``), a stem or a VGG-style ``nn.Sequential``. Its forward is
traced symbolically with every child a leaf except plain ``nn.Sequential`` containers, which are
traced through (so a ``downsample = Sequential(AvgPool2d, Conv2d, BatchNorm2d)`` is seen op by
op). On that graph, by dataflow (which node feeds which, and how many users each has), never by
attribute names:

* ``conv -> BN (-> ReLU)``: the conv has no user but the BN, the BN none but the ReLU; one
  :func:`resnet_fast.nn.conv_bn_act` call;
* ``conv -> BN -> add (-> ReLU)``, the other operand of the add being any tensor (an identity
  shortcut) or itself ``conv -> BN`` (a projection shortcut, after an average pool or not): one
  :func:`resnet_fast.nn.block_end`, the dual BatchNorm + add + ReLU of resnet_fast's own blocks
  in training;
* a fused step whose only user is the conv of another fused step hands its output on deferred
  (``defer=True``): that conv normalises (and rectifies) its input as it loads it, which is
  exact because the fused conv keeps its zero padding after the normalisation. In eval (running
  statistics) there is nothing to defer and the tensor is handed on.

ReLU is ``nn.ReLU`` (in place or not), ``F.relu``, ``torch.relu`` or ``Tensor.relu``. Plain
``nn.Identity`` children (timm's ``drop_block`` and ``aa`` when not configured) are transparent.
Everything else runs as it did: a module between a BatchNorm and the add (squeeze-excitation,
ECA, a ``DropPath`` of non-zero rate, which resnet_fast does not look into, so also not in eval)
leaves that add unfused while the conv + BatchNorm before it is fused; an activation other than
ReLU (SiLU, GELU, ...) runs eagerly after the fused conv + BatchNorm; a conv or BatchNorm that is
not plain (:func:`resnet_fast.nn.is_fusable_conv`, :func:`~resnet_fast.nn.is_fusable_batch_norm`)
or has hooks, or whose output has another user, is not fused. Each such case is a note, naming
the module, for :func:`resnet_fast.convert` to report.

The rewrite keeps every module object: the unit keeps its class, children, parameters, buffers
and hooks, and only gets an instance attribute ``forward``, a :class:`FusedForward` that replays
the traced graph with the fused steps in place of their nodes (:mod:`resnet_fast.graph_plan`).
The plan names child modules by their attribute paths and looks them up on each call, so
``.to()``, ``train()``/``eval()`` (each fused op reads its BatchNorm's mode when it runs),
``load_state_dict``, ``copy.deepcopy`` and pickling behave as before; a fused step whose modules
stop being fusable (a hook added later, a child swapped for another activation) runs them
eagerly, as ``conv_bn_act`` does.

What a unit's forward decides in Python is decided once, when it is traced: a unit whose graph
differs between training and eval, whose forward takes optional or variable arguments, or that
``torch.fx`` cannot trace, is left as it is (and its children are tried as units in turn).
Hooks added later to the Sequentials or Identity modules a unit was traced through, and
replacing those containers, are not seen by the plan: convert again after such changes.
``nn.DataParallel`` replicas would run the original module's children: use
``DistributedDataParallel``.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import pickle
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from resnet_fast.fused_module import FusedModule, has_hooks
from resnet_fast.graph_plan import Call, FusedBlockEnd, FusedConv, FusedForward, Ref, Step
from resnet_fast.nn import block_end, is_fusable_batch_norm, is_fusable_conv, is_relu
from resnet_fast.sync_batchnorm import is_fusable_sync_batch_norm

__all__ = ["FusedForward", "GraphPlan", "block_end", "plan"]

_BatchNorm = nn.modules.batchnorm._BatchNorm

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


# ------------------------------------------------------------------------------- tracing


class _Refused(Exception):
    """A unit that is left as it is; the message says why."""


class _Tracer(fx.Tracer):
    """Traces through plain ``nn.Sequential`` containers (recorded in ``inlined``); every other
    module is a leaf, its own forward deciding at run time (training, hooks, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.inlined: list[nn.Module] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Sequential and not has_hooks(m) and "forward" not in vars(m):
            self.inlined.append(m)
            return False
        return True


def _trace_once(unit: nn.Module) -> tuple[fx.Graph, list[nn.Module]]:
    before = set(vars(unit))
    tracer = _Tracer()
    try:
        graph = tracer.trace(unit)
    except Exception as exc:  # whatever the forward does with a Proxy
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _Refused(f"torch.fx cannot trace its forward ({type(exc).__name__}: "
                       f"{first[:120]})") from None
    finally:
        added = set(vars(unit)) - before
        for name in added:  # tensor constants torch.fx stores on the root
            del vars(unit)[name]
    if added:
        raise _Refused("its forward makes tensors while traced (they would be kept as "
                       "constants)")
    return graph, tracer.inlined


def _trace(unit: nn.Module) -> tuple[fx.Graph, list[nn.Module]]:
    """The unit's graph, the same in training and in eval, and the Sequentials traced through;
    raises :class:`_Refused` when there is none."""
    instance_forward = vars(unit).get("forward")
    if instance_forward is not None and not isinstance(instance_forward, FusedForward):
        raise _Refused("its forward is replaced on the instance")
    params = list(inspect.signature(type(unit).forward).parameters.values())[1:]
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty
           for p in params):
        raise _Refused("its forward takes optional or variable arguments")
    modes = [(m, m.training) for m in unit.modules()]
    try:
        traces = []
        for training in (unit.training, not unit.training):
            for m, _ in modes:  # not train(): an overridden train() may do more
                m.training = training
            traces.append(_trace_once(unit))
    finally:
        for m, training in modes:
            m.training = training
    if str(traces[0][0]) != str(traces[1][0]):
        raise _Refused("its forward traces differently in training and in eval")
    return traces[0]


# ------------------------------------------------------------------------------- matching


def _single_input(node: fx.Node) -> Optional[fx.Node]:
    """The node's argument when it is called on one node and nothing else."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _add_operands(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(a, b)`` when ``node`` is ``a + b`` of two distinct nodes."""
    if node.kwargs or len(node.args) != 2 or not (
            (node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS)):
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b:
        return a, b
    return None


def _label(node: fx.Node, module: Optional[nn.Module]) -> str:
    if module is not None:
        return f"{node.target} ({type(module).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


_PICKLABLE: dict[Any, bool] = {}


def _picklable(fn: Callable) -> bool:
    """Whether ``fn`` pickles (by reference), as the plan of a pickled model must."""
    if fn not in _PICKLABLE:
        try:
            _PICKLABLE[fn] = pickle.loads(pickle.dumps(fn)) is fn
        except Exception:
            _PICKLABLE[fn] = False
    return _PICKLABLE[fn]


class _Matcher:
    """Finds the fused steps of one traced unit and what stays unfused, and builds its plan."""

    def __init__(self, unit: nn.Module, graph: fx.Graph) -> None:
        self.unit = unit
        self.graph = graph
        self._notes: list[tuple[int, str]] = []  # (position of the node, unit-relative note)
        self.batch_norm_notes: dict[str, str] = {}  # bn target -> why it is not fused
        self._remove_identities()
        self._position = {node: i for i, node in enumerate(graph.nodes)}
        self.pairs: dict[fx.Node, fx.Node] = {}  # bn node -> its conv node
        for node in graph.nodes:
            bn = self.module(node)
            if isinstance(bn, _BatchNorm):
                reason = self._pair_refusal(node, bn)
                if reason is None:
                    self.pairs[node] = node.args[0]
                else:
                    self.batch_norm_notes[node.target] = reason

    @property
    def notes(self) -> list[str]:
        """What stays unfused around the fused steps, in forward order."""
        return [note for _, note in sorted(self._notes)]

    def _note(self, node: fx.Node, note: str) -> None:
        self._notes.append((self._position[node], note))

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.unit.get_submodule(node.target) if node.op == "call_module" else None

    def _remove_identities(self) -> None:
        for node in list(self.graph.nodes):
            m = self.module(node)
            source = _single_input(node)
            if type(m) is nn.Identity and not has_hooks(m) and source is not None:
                node.replace_all_uses_with(source)
                self.graph.erase_node(node)

    def _pair_refusal(self, node: fx.Node, bn: nn.Module) -> Optional[str]:
        if not (is_fusable_batch_norm(bn) or is_fusable_sync_batch_norm(bn, convertible=True)):
            return f"it is not a plain nn.BatchNorm2d without hooks ({type(bn).__name__})"
        src = _single_input(node)
        conv = None if src is None else self.module(src)
        if not isinstance(conv, nn.Conv2d):
            return "its input is not the output of a conv"
        if not is_fusable_conv(conv) or _single_input(src) is None:
            return f"{src.target} is not a plain zero-padded nn.Conv2d without hooks"
        if len(src.users) != 1:
            return f"the output of {src.target} has other users"
        if bn.num_features != conv.out_channels:
            return (f"it has {bn.num_features} features but {src.target} has "
                    f"{conv.out_channels} output channels")
        return None

    def _relu(self, node: fx.Node) -> Optional[fx.Node]:
        """The ReLU applied to ``node`` when that is its only user."""
        user = _only_user(node)
        if user is None or user.args[:1] != (node,):
            return None
        if user.op == "call_module":
            return user if is_relu(self.module(user)) and _single_input(user) else None
        if user.op == "call_method" and user.target in _RELU_METHODS:
            return user if _single_input(user) else None
        if user.op == "call_function" and user.target in _RELU_FUNCTIONS:
            if user.target is F.relu:  # F.relu(x, inplace)
                return user if len(user.args) <= 2 and set(user.kwargs) <= {"inplace"} else None
            return user if _single_input(user) else None
        return None

    def _eager_activation_note(self, anchor: fx.Node, fused: str) -> None:
        user = _only_user(anchor)
        m = None if user is None else self.module(user)
        if m is not None and type(m).__module__ == nn.modules.activation.__name__:
            self._note(user, f"{_label(user, m)} runs eagerly after the fused {fused} (only a "
                             f"plain nn.ReLU fuses)")

    def build(self) -> tuple[tuple[str, ...], tuple[Step, ...], Any, set[str]]:
        """``(inputs, steps, output, fused BatchNorm targets)`` of the unit's plan."""
        absorbed: set[fx.Node] = set()
        anchors: dict[fx.Node, dict] = {}  # the node whose value a fused step produces
        heads: set[fx.Node] = set()  # the convs fused steps start from
        for node in self.graph.nodes:
            operands = _add_operands(node)
            main = None if operands is None else next(
                (o for o in operands if o in self.pairs and len(o.users) == 1
                 and o not in absorbed), None)
            if main is None:
                continue
            short = operands[1] if main is operands[0] else operands[0]
            spec = dict(kind="block_end", bn=main, conv=self.pairs[main], shortcut=short,
                        shortcut_bn=None, shortcut_conv=None)
            absorbed |= {main, self.pairs[main], node}
            if short in self.pairs and len(short.users) == 1 and short not in absorbed:
                spec.update(shortcut_bn=short, shortcut_conv=self.pairs[short],
                            shortcut=self.pairs[short].args[0])
                absorbed |= {short, self.pairs[short]}
                heads.add(self.pairs[short])
            heads.add(self.pairs[main])
            self._anchor(anchors, absorbed, node, spec)
        for bn, conv in self.pairs.items():
            if bn not in absorbed:
                absorbed |= {bn, conv}
                heads.add(conv)
                self._anchor(anchors, absorbed, bn, dict(kind="conv", bn=bn, conv=conv))
        for anchor, spec in anchors.items():
            spec["defer"] = spec["kind"] == "conv" and _only_user(anchor) in heads
        self._unfused_add_notes(absorbed, anchors)

        inputs: list[str] = []
        index: dict[fx.Node, int] = {}
        steps: list[Step] = []
        output: Any = None

        def ref(arg):
            return fx.node.map_arg(arg, lambda n: Ref(index[n]))

        for node in self.graph.nodes:
            if node.op == "placeholder":
                index[node] = len(inputs)
                inputs.append(node.target)
                continue
            if node.op == "output":
                output = _plain(ref(node.args[0]))
                break
            if node in anchors:
                steps.append(self._fused_step(anchors[node], index))
            elif node in absorbed:
                continue
            else:
                if node.op == "call_function" and not _picklable(node.target):
                    raise _Refused(f"its forward calls {node.target!r}, which does not pickle")
                target = tuple(node.target.split(".")) if node.op in (
                    "call_module", "get_attr") else node.target
                steps.append(Call(node.op, target, _plain(ref(node.args)),
                                   _plain(ref(node.kwargs))))
            index[node] = len(inputs) + len(steps) - 1
        fused_bns = {spec[k].target for spec in anchors.values()
                     for k in ("bn", "shortcut_bn") if spec.get(k) is not None}
        return tuple(inputs), tuple(steps), output, fused_bns

    def _anchor(self, anchors: dict, absorbed: set, node: fx.Node, spec: dict) -> None:
        """Records the step ``spec`` ending at ``node``, extended by the ReLU after it."""
        relu = self._relu(node)
        spec["act"] = relu
        if relu is None:
            what = (f"{spec['conv'].target} + {spec['bn'].target}"
                    + (" + add" if spec["kind"] == "block_end" else ""))
            self._eager_activation_note(node, what)
            anchors[node] = spec
        else:
            absorbed.add(node)
            anchors[relu] = spec

    def _fused_step(self, spec: dict, index: dict[fx.Node, int]) -> Step:
        def path(node):
            return None if node is None else tuple(node.target.split("."))

        act = spec["act"]
        act_path = path(act) if act is not None and act.op == "call_module" else None
        functional_relu = act is not None and act.op != "call_module"
        common = dict(input=Ref(index[spec["conv"].args[0]]), conv=path(spec["conv"]),
                      bn=path(spec["bn"]), act=act_path, functional_relu=functional_relu)
        if spec["kind"] == "conv":
            return FusedConv(**common, defer=spec["defer"])
        return FusedBlockEnd(**common, shortcut=Ref(index[spec["shortcut"]]),
                              shortcut_conv=path(spec["shortcut_conv"]),
                              shortcut_bn=path(spec["shortcut_bn"]))

    def _unfused_add_notes(self, absorbed: set[fx.Node], anchors: dict) -> None:
        """A note for each add that follows a fused conv + BatchNorm (through at most three
        other nodes, none of them a fused step, a conv or a BatchNorm) but is not fused with
        it, naming what runs between them."""
        for node in self.graph.nodes:
            operands = _add_operands(node)
            if operands is None or node in absorbed:
                continue
            for operand in operands:
                between, source = [], operand
                while (source not in self.pairs and source not in absorbed
                       and source not in anchors and len(between) < 3
                       and source.op in ("call_module", "call_function", "call_method")
                       and source.all_input_nodes
                       and not isinstance(self.module(source), (nn.Conv2d, _BatchNorm))):
                    between.append(source)
                    source = source.all_input_nodes[0]
                if source not in self.pairs:
                    continue
                if between:
                    names = ", ".join(_label(n, self.module(n)) for n in reversed(between))
                    why = f"{names} run{'s' if len(between) == 1 else ''} between them"
                else:
                    why = f"the output of {source.target} has other users"
                self._note(node, f"the add after {source.target} is not fused: {why}")
                break


def _plain(arg: Any) -> Any:
    """``arg`` with torch.fx's immutable containers made plain lists and dicts."""
    if isinstance(arg, tuple):
        items = tuple(_plain(a) for a in arg)
        return type(arg)(*items) if hasattr(arg, "_fields") else items
    if isinstance(arg, list):
        return [_plain(a) for a in arg]
    if isinstance(arg, dict):
        return {k: _plain(v) for k, v in arg.items()}
    return arg


# ------------------------------------------------------------------------------- models


@dataclasses.dataclass
class GraphPlan:
    """What :func:`plan` found in a model: the units to rewrite (``None``: a plan installed by
    an earlier call, now removed), the notes on what stays unfused (``"name (Class): why"``)
    and the ids of the BatchNorm modules that run inside a fused op."""

    rewrites: list[tuple[nn.Module, Optional[FusedForward]]]
    notes: list[str]
    fused_batch_norms: set[int]

    @property
    def units(self) -> list[nn.Module]:
        return [m for m, forward in self.rewrites if forward is not None]

    def install(self, backend: Optional[str] = None, memory_efficient: bool = False) -> None:
        """Installs the plans, each running with ``backend`` and ``memory_efficient``."""
        for module, forward in self.rewrites:
            if forward is None:
                del vars(module)["forward"]
            else:
                forward.backend = backend
                forward.memory_efficient = bool(memory_efficient)
                module.forward = forward


def _label_of(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plan(model: nn.Module, exclude: tuple[nn.Module, ...] = (),
         explained: tuple[nn.Module, ...] = ()) -> GraphPlan:
    """Finds the fused steps of every unit of ``model`` (see the module docstring); changes
    nothing (:meth:`GraphPlan.install` does).

    The units are the modules below ``model`` (and ``model`` itself when it is a plain
    ``nn.Sequential``: the model's own forward and methods are otherwise kept as they are)
    that hold a BatchNorm, outside ``exclude`` and outside resnet_fast's fused modules, whose
    BatchNorms count as fused. A BatchNorm left unfused gets a note, except one that is a
    child of a module in ``explained`` (reported by the caller).
    """
    excluded = {id(m) for m in exclude}
    explained_ids = {id(m) for m in explained}
    result = GraphPlan([], [], set())
    batch_norm_notes: dict[int, str] = {}
    refusals: dict[int, str] = {}
    covered: set[int] = set()  # Sequentials a planned unit traced through

    def visit(name: str, module: nn.Module) -> None:
        # convert() makes a plain nn.SyncBatchNorm a SyncBatchNorm, a fused module.
        if (id(module) in excluded or isinstance(module, FusedModule)
                or type(module) is nn.SyncBatchNorm):
            result.fused_batch_norms.update(
                id(m) for m in module.modules() if isinstance(m, _BatchNorm))
            if isinstance(vars(module).get("forward"), FusedForward):
                result.rewrites.append((module, None))
            return
        candidate = (module._modules and (name or type(module) is nn.Sequential)
                     and id(module) not in covered
                     and any(isinstance(m, _BatchNorm) for m in module.modules()))
        forward = None
        if candidate:
            try:
                forward = _plan_unit(name, module, result, batch_norm_notes, covered)
            except _Refused as exc:
                refusals[id(module)] = str(exc)
        if forward is not None:
            result.rewrites.append((module, forward))
        elif isinstance(vars(module).get("forward"), FusedForward):
            result.rewrites.append((module, None))
        for child_name, child in module.named_children():
            visit(_join(name, child_name), child)

    visit("", model)
    unexplained: dict[str, list[str]] = {}
    parents = {id(c): (n, m) for n, m in model.named_modules() for c in m.children()}
    for name, bn in model.named_modules():
        if not isinstance(bn, _BatchNorm) or id(bn) in result.fused_batch_norms:
            continue
        if id(bn) in batch_norm_notes:
            result.notes.append(batch_norm_notes[id(bn)])
            continue
        parent_name, parent = parents[id(bn)]
        if id(parent) not in explained_ids:
            unexplained.setdefault(parent_name, []).append(name.rpartition(".")[2])
    modules = dict(model.named_modules())
    for parent_name, names in unexplained.items():
        parent = modules[parent_name]
        why = refusals.get(id(parent), f"{type(parent).__name__}'s own forward runs "
                                       f"{'it' if len(names) == 1 else 'them'}, and convert() "
                                       f"keeps that forward")
        result.notes.append(f"{_label_of(parent_name, parent)}: {', '.join(names)} not fused: "
                            f"{why}")
    return result


def _plan_unit(name: str, unit: nn.Module, result: GraphPlan, batch_norm_notes: dict[int, str],
               covered: set[int]) -> Optional[FusedForward]:
    """The plan of one unit (``None``: nothing to fuse in its own graph), with its notes added
    to ``result`` and ``batch_norm_notes``; raises :class:`_Refused`."""
    graph, inlined = _trace(unit)
    matcher = _Matcher(unit, graph)
    inputs, steps, output, fused = matcher.build()
    label = _label_of(name, unit)
    for target, reason in matcher.batch_norm_notes.items():
        batch_norm_notes[id(unit.get_submodule(target))] = f"{label}: {target} not fused: {reason}"
    if not fused:
        return None
    for target in fused:
        bn = unit.get_submodule(target)
        result.fused_batch_norms.add(id(bn))
        batch_norm_notes.pop(id(bn), None)
    result.notes.extend(f"{label}: {note}" for note in matcher.notes)
    covered.update(id(m) for m in inlined)
    return FusedForward(unit, inputs, steps, output)
