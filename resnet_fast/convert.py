"""``convert(model)``: fuse an existing model in place, by class for torchvision's ResNets and by
dataflow for everything else.

Two paths, both keeping every module object (parameters, buffers, hooks, state_dict keys and
optimizer parameter groups carry on, and so do ``.to()``, ``train()``/``eval()``,
``load_state_dict``, ``copy.deepcopy`` and pickling):

* **Class swap**, for modules with torchvision's child names (``conv1``, ``bn1`` and ``relu``):
  a recognised block or ResNet only changes class, to the fused
  :class:`resnet_fast.models.BasicBlock`, :class:`~resnet_fast.models.Bottleneck` or
  :class:`~resnet_fast.models.ResNet`, whose forwards run the same computation through the
  fused ops.
* **Dataflow** (:mod:`resnet_fast.graph_fusion`), for every other module that holds a
  BatchNorm (timm's ResNets, ResNet-D stems and shortcuts, VGG-style ``nn.Sequential`` stacks,
  and the torchvision-named modules the class swap refuses): ``torch.fx`` finds
  ``conv -> BN (-> ReLU)``, ``conv -> BN -> add (-> ReLU)`` and deferred hand-offs by what
  feeds what, and the module keeps its class and gets a fused ``forward`` of its own. The
  model's own forward (and methods such as ``forward_features``) is kept as it is, so what it
  runs itself (timm's ``bn1`` after the stem) stays unfused; a plain ``nn.Sequential`` model
  is rewritten itself.

Recognised by the class swap ("plain" means the module's class keeps ``torch.nn``'s forward and
has no hooks):

* a BasicBlock: children ``conv1, bn1, relu, conv2, bn2, downsample`` (any order), of
  torchvision's or resnet_fast's block classes or of any other class (duck-typed);
* a Bottleneck: the same plus ``conv3, bn3``;
* a ResNet: children ``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``, of
  torchvision's or resnet_fast's ``ResNet`` (or a class derived from one that keeps its
  forward). The stem of any other class is left alone: its forward is where models differ
  (feature outputs, dropout, extra heads), so replacing it is never safe to guess; its
  blocks are still fused;

with plain ``nn.Conv2d`` convs (zero padding; a bias is fused too), plain ``nn.BatchNorm2d``
or synchronised (``nn.SyncBatchNorm``, :class:`resnet_fast.SyncBatchNorm`) norms each matching
its conv's output channels (BatchNorm before conv, as in a pre-activation block, is refused), a
plain ``nn.ReLU``, and ``downsample`` either ``None`` or ``nn.Sequential(conv, BatchNorm2d)``.
A class derived from a recognised one that overrides its forward is refused: its forward may
compute something else.

Reported in a :class:`ConvertWarning` (or a ``ValueError`` with ``strict=True``, before anything
changes), each naming the module and the reason: a module with torchvision's child names that
the class swap refuses (fused by dataflow instead where that matches), and whatever dataflow
fusion leaves unfused: a BatchNorm outside any fused op, an add after a fused conv + BatchNorm
that is not fused with it (a squeeze-excitation or DropPath module between them), an
activation other than ReLU that runs eagerly after a fused conv + BatchNorm, a module that
``torch.fx`` cannot trace. :func:`eager_batch_norms` tells which BatchNorms of a model ran on
their own in a forward.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

from torch import nn

from resnet_fast import graph_fusion, models, reference_models
from resnet_fast.nn import FusedModule, is_fusable_batch_norm, is_fusable_conv, is_relu, \
    validate_backend
from resnet_fast.sync_batchnorm import adopt_sync_batch_norms, is_fusable_sync_batch_norm

__all__ = ["convert", "ConvertWarning", "eager_batch_norms"]


class ConvertWarning(UserWarning):
    """Some modules of a model given to :func:`convert` were left unfused."""


_BASIC = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")
_BOTTLENECK = _BASIC + ("conv3", "bn3")
_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
           "avgpool", "fc")

# torchvision's classes are known by name (torchvision is not a dependency).
_TORCHVISION_MODULE = "torchvision.models.resnet"


def _known_forward(cls: type, names: tuple[str, ...], known: tuple[type, ...],
                   duck_typed: bool) -> Optional[str]:
    """``None`` if ``cls`` computes a recognised forward, else why not.

    For each of ``names`` (the methods the forward runs through), the class in ``cls``'s MRO
    that defines it must be a known class (torchvision's, ours). A class unrelated to any known
    one is accepted when ``duck_typed`` (a copy of the structure written elsewhere).
    """
    def is_known(c: type) -> bool:
        return c in known or (c.__module__ == _TORCHVISION_MODULE
                              and c.__name__ in ("ResNet", "BasicBlock", "Bottleneck"))

    mro = cls.__mro__
    if not any(is_known(c) for c in mro):
        return None if duck_typed else (
            f"{cls.__qualname__} is not torchvision's ResNet (nor derived from it): fusing its "
            f"stem would replace its own forward, which runs as written over the fused blocks")
    for name in names:
        owner = next((c for c in mro if name in vars(c)), None)
        if owner is not None and not is_known(owner) and owner is not nn.Module:
            return f"{owner.__qualname__} overrides {name}()"
    return None


def _children(module: nn.Module) -> dict[str, Optional[nn.Module]]:
    """The module's children by name; a block's ``downsample = None`` is a plain attribute,
    not a child, and is added as ``None``."""
    kids = dict(module._modules)
    if "downsample" not in kids and getattr(module, "downsample", False) is None:
        kids["downsample"] = None
    return kids


def _check_conv_bn(conv, bn, conv_name: str, bn_name: str) -> Optional[str]:
    if not is_fusable_conv(conv):
        return (f"{conv_name} is not a plain zero-padded nn.Conv2d without hooks "
                f"({type(conv).__name__})")
    if not (is_fusable_batch_norm(bn) or is_fusable_sync_batch_norm(bn, convertible=True)):
        return f"{bn_name} is not a plain nn.BatchNorm2d without hooks ({type(bn).__name__})"
    if bn.num_features != conv.out_channels:
        return (f"{bn_name} has {bn.num_features} features but {conv_name} has "
                f"{conv.out_channels} output channels")
    return None


def _check_block(module: nn.Module) -> tuple[Optional[type], Optional[str]]:
    """(the fused class for ``module``, None) if it is a recognised block, else (None, why)."""
    kids = _children(module)
    if set(kids) == set(_BOTTLENECK):
        target, pairs = models.Bottleneck, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    elif set(kids) == set(_BASIC):
        target, pairs = models.BasicBlock, (("conv1", "bn1"), ("conv2", "bn2"))
    else:
        return None, (f"children {sorted(kids)} are neither a BasicBlock's {sorted(_BASIC)} "
                      f"nor a Bottleneck's {sorted(_BOTTLENECK)}")
    reason = _known_forward(type(module), ("forward",),
                            (reference_models.BasicBlock, reference_models.Bottleneck,
                             models.BasicBlock, models.Bottleneck), duck_typed=True)
    if reason is not None:
        return None, reason
    for conv_name, bn_name in pairs:
        reason = _check_conv_bn(kids[conv_name], kids[bn_name], conv_name, bn_name)
        if reason is not None:
            return None, reason
    for (c_prev, _), (c_next, _) in zip(pairs, pairs[1:]):
        if kids[c_next].in_channels != kids[c_prev].out_channels:
            return None, f"{c_next} does not take {c_prev}'s output channels"
    if not is_relu(kids["relu"]):
        return None, f"relu is {type(kids['relu']).__name__}, not a plain nn.ReLU"
    ds = kids["downsample"]
    last = kids[pairs[-1][0]]
    if ds is None:
        if kids["conv1"].in_channels != last.out_channels:
            return None, "no downsample, but the block changes the number of channels"
    else:
        if not (type(ds) is nn.Sequential and len(ds) == 2 and not ds._forward_hooks
                and not ds._forward_pre_hooks):
            return None, "downsample is not nn.Sequential(nn.Conv2d, nn.BatchNorm2d)"
        reason = _check_conv_bn(ds[0], ds[1], "downsample.0", "downsample.1")
        if reason is not None:
            return None, reason
        if ds[0].out_channels != last.out_channels:
            return None, "downsample's output channels differ from the block's"
    return target, None


def _check_resnet(module: nn.Module) -> Optional[str]:
    """None if ``module`` is a recognised ResNet (its stem can be fused), else why not."""
    kids = _children(module)
    if set(kids) != set(_RESNET):
        return f"children {sorted(kids)} are not a ResNet's {sorted(_RESNET)}"
    reason = _known_forward(type(module), ("forward", "_forward_impl", "_stem"),
                            (reference_models.ResNet, models.ResNet), duck_typed=False)
    if reason is not None:
        return reason
    reason = _check_conv_bn(kids["conv1"], kids["bn1"], "conv1", "bn1")
    if reason is not None:
        return reason
    if not is_relu(kids["relu"]):
        return f"relu is {type(kids['relu']).__name__}, not a plain nn.ReLU"
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if not isinstance(kids[name], nn.Sequential):
            return f"{name} is not an nn.Sequential"
    if not isinstance(kids["fc"], nn.Module) or not isinstance(kids["avgpool"], nn.Module):
        return "avgpool or fc is missing"
    return None


def _has_torchvision_names(module: nn.Module) -> bool:
    """Whether ``module`` is named as a torchvision block or ResNet is (``conv1``, ``bn1``,
    ``relu``): the modules the class swap is for."""
    kids = _children(module)
    return "conv1" in kids and "bn1" in kids and "relu" in kids


def _swap_class(module: nn.Module, target: type) -> Optional[str]:
    if not isinstance(module, target):
        try:
            module.__class__ = target
        except TypeError as exc:  # a class with __slots__ or another C layout
            return f"its class cannot become {target.__name__} ({exc})"
    return None


def convert(model: nn.Module, backend: Optional[str] = None, *, strict: bool = False,
            memory_efficient: bool = False) -> nn.Module:
    """Fuses ``model`` in place; returns ``model``.

    Modules with torchvision's child names that are recognised change class; every other
    module holding a BatchNorm is fused by dataflow (see the module docstring). Every plain
    ``nn.SyncBatchNorm`` becomes a :class:`resnet_fast.SyncBatchNorm` (same object, its
    ``process_group`` kept), which runs after its conv with the residual add and ReLU fused.
    Parameters, buffers, hooks and state_dict keys are kept. ``backend`` is used by every fused op
    (``None``: the default for the input's device), and ``memory_efficient`` set on each
    fused module and plan (see :mod:`resnet_fast.models`). What is not fused, and the modules
    with torchvision's names the class swap refuses, are listed in a :class:`ConvertWarning`
    (``strict=True``: a ``ValueError``, before anything changes); so is a model with nothing to
    fuse. Converting again re-plans the dataflow fusion and reports the same.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes a torch.nn.Module, got {type(model).__name__}")
    backend = validate_backend(backend)
    swaps: list[tuple[nn.Module, type]] = []
    refused: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if not _has_torchvision_names(module):
            continue
        label = f"{name or '<model>'} ({type(module).__name__})"
        kids = _children(module)
        if "layer1" in kids:
            reason = _check_resnet(module)
            target = models.ResNet
        else:
            target, reason = _check_block(module)
        if reason is None:
            swaps.append((module, target))
        else:
            refused.append((label, module, reason))
    graph = graph_fusion.plan(model, exclude=tuple(m for m, _ in swaps),
                              explained=tuple(m for _, m, _ in refused))
    units = {id(m) for m in graph.units}
    skipped = [f"{label}: {reason}" + (" (fused by dataflow instead)" if id(module) in units
                                       else "")
               for label, module, reason in refused] + graph.notes
    if strict and skipped:
        raise ValueError("convert(strict=True): not fused as asked, nothing changed: "
                         + "; ".join(skipped))
    adopt_sync_batch_norms(model)
    for module, target in swaps:
        reason = _swap_class(module, target)
        if reason is not None:
            skipped.append(f"{type(module).__name__}: {reason}")
    graph.install(backend, memory_efficient)
    for module in model.modules():
        if isinstance(module, FusedModule):
            module.backend = backend
            module.memory_efficient = bool(memory_efficient)
    if skipped:
        warnings.warn("resnet_fast.convert: " + "; ".join(skipped), ConvertWarning,
                      stacklevel=2)
    elif not swaps and not units:
        warnings.warn(f"resnet_fast.convert found no ResNet block or stem, and no conv + "
                      f"BatchNorm to fuse, in {type(model).__name__}", ConvertWarning,
                      stacklevel=2)
    return model


@contextlib.contextmanager
def eager_batch_norms(model: nn.Module) -> Iterator[set[str]]:
    """Collects, while the ``with`` block runs, the names of ``model``'s BatchNorm modules
    whose own forward runs: those not fused (a fused op reads a BatchNorm's tensors and never
    calls it). Nothing is added to the modules: a global forward hook watches every call.

    ``with eager_batch_norms(model) as eager: model(x)``; then ``eager`` holds the names.
    """
    names = {id(m): n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen: set[str] = set()

    def record(module, args, output):
        name = names.get(id(module))
        if name is not None:
            seen.add(name)

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()
