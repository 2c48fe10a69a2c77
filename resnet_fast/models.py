"""The ResNet family, a drop-in for torchvision's, running on resnet_fast's fused ops.

Same builders and arguments as ``torchvision.models`` (``resnet18`` ... ``wide_resnet101_2``,
``ResNet(block, layers, num_classes, zero_init_residual, groups, width_per_group,
replace_stride_with_dilation, norm_layer)``), same modules under the same names, hence the same
state_dict keys, shapes, parameter counts and initialisation: the classes subclass the eager
models of :mod:`resnet_fast.reference` and replace only ``forward``.

What each forward fuses (one :func:`resnet_fast.functional.conv_bn_relu` call per conv):

* stem: ``relu(bn1(conv1(x)))``;
* block: ``relu(bn1(conv1(x)))`` and, in a Bottleneck, ``relu(bn2(conv2(.)))``, each handed to
  the next conv as a ``DeferredBatchNorm`` in training (the next conv normalises its input as
  it loads it; the activation is never written out), then the block end
  ``relu(bn_last(conv_last(.)) + shortcut)``, the shortcut being ``x`` or
  ``bn(conv1x1(x))`` of ``downsample``: in training both convs stop before their BatchNorm and
  one dual BatchNorm + add + ReLU ends the block; in eval the shortcut is one fused call and the
  block end another.

``model.train()`` / ``model.eval()`` switch each BatchNorm between batch and running statistics
as usual; a BatchNorm left in eval inside a training model (frozen) uses its running statistics.
``norm_layer=nn.SyncBatchNorm`` (or :class:`resnet_fast.SyncBatchNorm`, or a ``functools.partial``
of either with a ``process_group``) gives synchronised BatchNorms, each a
:class:`resnet_fast.SyncBatchNorm`: every conv runs as its own op, then its BatchNorm (+ the
block's residual add) + ReLU as one fused, synchronised pass.

Extra keyword arguments of the builders and ``ResNet``: ``small_input=True`` (3x3 stride-1
``conv1`` and no max-pool, for 32x32 images; ``maxpool`` stays as ``nn.Identity`` so the
state_dict keys do not change), ``backend=`` (see :mod:`resnet_fast.backends`; also
``model.set_backend(name)``) and ``memory_efficient=True`` (also
``model.set_memory_efficient()``): the stem's conv, each block end's conv and the downsample's
recompute their output in backward instead of keeping it, so a block keeps only its input, the
outputs of its inner convs and, in a downsampling block, the shortcut's output for backward
(the gradients are the same; the recomputed 1x1 convs of a Bottleneck add about a fifth to its
forward FLOPs, the second 3x3 of a BasicBlock about half). ``weights`` is ``None``, a
state_dict or the path of a saved one; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor, nn

from resnet_fast import functional, reference
from resnet_fast.nn import FusedModule, check_input, conv_bn_act, is_fusable_batch_norm, \
    is_fusable_conv, is_relu, validate_backend
from resnet_fast.sync_batchnorm import adopt_sync_batch_norms

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def _fusable_downsample(ds: Optional[nn.Module]) -> bool:
    return (type(ds) is nn.Sequential and len(ds) == 2 and not ds._forward_hooks
            and not ds._forward_pre_hooks and is_fusable_conv(ds[0])
            and is_fusable_batch_norm(ds[1]))


def _uses_batch_statistics(bn: nn.BatchNorm2d) -> bool:
    # as nn.BatchNorm2d.forward decides
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _block_end(block: FusedModule, out: Any, x: Tensor, conv: nn.Conv2d,
               bn: nn.Module) -> Tensor:
    """``relu(bn(conv(out)) + shortcut(x))``, the shortcut being ``x``, ``bn_d(conv_d(x))`` of
    a ``Sequential(conv_d, bn_d)`` downsample, or any other ``downsample`` module.

    With a downsample whose BatchNorm and ``bn`` both normalise with batch statistics
    (training), both convs stop before their BatchNorm (their running statistics already
    updated) and one dual BatchNorm + add + ReLU ends the block: the shortcut's normalised
    activation is never written out or kept for backward. Otherwise the shortcut is one fused
    conv + BatchNorm and the block end a conv + BatchNorm + residual + ReLU.

    A ``memory_efficient`` block takes the second way in training too, and both convs
    recompute their output in backward instead of keeping it.
    """
    backend, recompute = block.backend, block.memory_efficient
    ds = block.downsample
    if ds is None:
        return conv_bn_act(out, conv, bn, block.relu, residual=x, recompute=recompute,
                           backend=backend)
    if not _fusable_downsample(ds):
        return conv_bn_act(out, conv, bn, block.relu, residual=ds(x), recompute=recompute,
                           backend=backend)
    ds_bn = ds[1]
    if (not recompute and is_fusable_conv(conv) and is_fusable_batch_norm(bn)
            and is_relu(block.relu) and _uses_batch_statistics(bn)
            and _uses_batch_statistics(ds_bn) and bn.eps == ds_bn.eps):
        main = conv_bn_act(out, conv, bn, None, defer=True, backend=backend)
        short = conv_bn_act(x, ds[0], ds_bn, None, defer=True, backend=backend)
        return functional.dual_batch_norm_add_relu(
            main.raw, short.raw, None, None, main.weight, main.bias, None, None, short.weight,
            short.bias, True, 0.0, bn.eps, backend=backend)
    identity = conv_bn_act(x, ds[0], ds_bn, None, recompute=recompute, backend=backend)
    return conv_bn_act(out, conv, bn, block.relu, residual=identity, recompute=recompute,
                       backend=backend)


class BasicBlock(FusedModule, reference.BasicBlock):
    """torchvision's BasicBlock (same arguments, modules and state_dict), fused:
    ``relu(bn1(conv1(x)))`` handed on deferred, then ``relu(bn2(conv2(.)) + shortcut(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.conv1.in_channels, type(self).__name__)
        out = conv_bn_act(x, self.conv1, self.bn1, self.relu, defer=True, backend=self.backend)
        return _block_end(self, out, x, self.conv2, self.bn2)


class Bottleneck(FusedModule, reference.Bottleneck):
    """torchvision's Bottleneck (same arguments, modules and state_dict), fused:
    ``relu(bn1(conv1(x)))`` and ``relu(bn2(conv2(.)))`` handed on deferred, then
    ``relu(bn3(conv3(.)) + shortcut(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.conv1.in_channels, type(self).__name__)
        out = conv_bn_act(x, self.conv1, self.bn1, self.relu, defer=True, backend=self.backend)
        out = conv_bn_act(out, self.conv2, self.bn2, self.relu, defer=True,
                          backend=self.backend)
        return _block_end(self, out, x, self.conv3, self.bn3)


class ResNet(FusedModule, reference.ResNet):
    """torchvision's ResNet (same arguments, modules, state_dict and initialisation) with the
    fused stem and blocks; ``small_input``, ``backend`` and ``memory_efficient`` as in the
    module docstring.

    ``block`` is :class:`BasicBlock` or :class:`Bottleneck` (or any block class with their
    constructor; the fused ones are what make the blocks fast).
    """

    def __init__(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[Sequence[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        small_input: bool = False,
        backend: Optional[str] = None,
        memory_efficient: bool = False,
    ) -> None:
        validate_backend(backend)  # before building: a bad name fails fast
        super().__init__(block, layers, num_classes, zero_init_residual, groups,
                         width_per_group, replace_stride_with_dilation, norm_layer,
                         small_input=small_input)
        adopt_sync_batch_norms(self)  # norm_layer=nn.SyncBatchNorm: fused, and DDP on the CPU
        self.set_backend(backend)
        self.set_memory_efficient(memory_efficient)

    def _forward_impl(self, x: Tensor) -> Tensor:
        check_input(x, self.conv1.in_channels, type(self).__name__)
        x = conv_bn_act(x, self.conv1, self.bn1, self.relu, recompute=self.memory_efficient,
                        backend=self.backend)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _resnet(arch: str, weights: Any, progress: bool, small_input: bool, backend: Optional[str],
            **kwargs: Any) -> ResNet:
    return reference.build_resnet(arch, ResNet, _BLOCKS, weights, progress,
                                  small_input=small_input, backend=backend, **kwargs)


def resnet18(*, weights: Any = None, progress: bool = True, small_input: bool = False,
             backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al., 2015): BasicBlocks [2, 2, 2, 2], 11,689,512 parameters.

    ``weights``: ``None``, a state_dict or the path of one (``num_classes`` follows its ``fc``);
    ``progress`` is accepted for torchvision's signature. Other keyword arguments go to
    :class:`ResNet` (``num_classes``, ``zero_init_residual``, ``norm_layer``, ...,
    ``small_input``, ``backend``).
    """
    return _resnet("resnet18", weights, progress, small_input, backend, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, small_input: bool = False,
             backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNet-34: BasicBlocks [3, 4, 6, 3]; arguments as :func:`resnet18`."""
    return _resnet("resnet34", weights, progress, small_input, backend, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, small_input: bool = False,
             backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3], 25,557,032 parameters; arguments as
    :func:`resnet18`."""
    return _resnet("resnet50", weights, progress, small_input, backend, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, small_input: bool = False,
              backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNet-101: Bottlenecks [3, 4, 23, 3]; arguments as :func:`resnet18`."""
    return _resnet("resnet101", weights, progress, small_input, backend, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, small_input: bool = False,
              backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNet-152: Bottlenecks [3, 8, 36, 3]; arguments as :func:`resnet18`."""
    return _resnet("resnet152", weights, progress, small_input, backend, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                    backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., 2016): 32 groups of width 4; arguments as
    :func:`resnet18` (``groups``/``width_per_group`` are fixed)."""
    return _resnet("resnext50_32x4d", weights, progress, small_input, backend, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                     backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d: 32 groups of width 8; arguments as :func:`resnext50_32x4d`."""
    return _resnet("resnext101_32x8d", weights, progress, small_input, backend, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                     backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d: 64 groups of width 4; arguments as :func:`resnext50_32x4d`."""
    return _resnet("resnext101_64x4d", weights, progress, small_input, backend, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                    backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016): twice the Bottleneck width; arguments
    as :func:`resnet18` (``width_per_group`` is fixed)."""
    return _resnet("wide_resnet50_2", weights, progress, small_input, backend, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                     backend: Optional[str] = None, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2: twice the Bottleneck width; arguments as :func:`wide_resnet50_2`."""
    return _resnet("wide_resnet101_2", weights, progress, small_input, backend, **kwargs)
