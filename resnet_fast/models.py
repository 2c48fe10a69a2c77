"""The ResNet family, a drop-in for torchvision's, running on resnet_fast's fused ops.

Same builders and arguments as ``torchvision.models`` (``resnet18`` ... ``wide_resnet101_2``,
``ResNet(block, layers, num_classes, zero_init_residual, groups, width_per_group,
replace_stride_with_dilation, norm_layer)``), same modules under the same names, hence the same
state_dict keys, shapes, parameter counts and initialisation: the classes subclass the eager
models of :mod:`resnet_fast.reference_models` and replace only the blocks' ``forward`` and the
ResNet's stem.

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

from typing import Any, Optional

from torch import Tensor, nn

from resnet_fast import reference_models
from resnet_fast.nn import FusedModule, block_end, check_input, conv_bn_act, \
    is_fusable_batch_norm, is_fusable_conv, validate_backend
from resnet_fast.reference_models import make_builders
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


def _block_end(block: FusedModule, out: Any, x: Tensor, conv: nn.Conv2d,
               bn: nn.Module) -> Tensor:
    """``relu(bn(conv(out)) + shortcut(x))`` as :func:`resnet_fast.nn.block_end`, the shortcut
    being ``x``, ``bn_d(conv_d(x))`` of a ``Sequential(conv_d, bn_d)`` downsample (fused with
    the block end), or the output of any other ``downsample`` module; ``memory_efficient``
    blocks recompute both convs' outputs in backward."""
    ds = block.downsample
    if _fusable_downsample(ds):
        shortcut, projection = x, (ds[0], ds[1])
    else:
        shortcut, projection = (x if ds is None else ds(x)), ()
    return block_end(out, conv, bn, block.relu, shortcut, *projection,
                     recompute=block.memory_efficient, backend=block.backend)


class BasicBlock(FusedModule, reference_models.BasicBlock):
    """torchvision's BasicBlock (same arguments, modules and state_dict), fused:
    ``relu(bn1(conv1(x)))`` handed on deferred, then ``relu(bn2(conv2(.)) + shortcut(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.conv1.in_channels, type(self).__name__)
        out = conv_bn_act(x, self.conv1, self.bn1, self.relu, defer=True, backend=self.backend)
        return _block_end(self, out, x, self.conv2, self.bn2)


class Bottleneck(FusedModule, reference_models.Bottleneck):
    """torchvision's Bottleneck (same arguments, modules and state_dict), fused:
    ``relu(bn1(conv1(x)))`` and ``relu(bn2(conv2(.)))`` handed on deferred, then
    ``relu(bn3(conv3(.)) + shortcut(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.conv1.in_channels, type(self).__name__)
        out = conv_bn_act(x, self.conv1, self.bn1, self.relu, defer=True, backend=self.backend)
        out = conv_bn_act(out, self.conv2, self.bn2, self.relu, defer=True,
                          backend=self.backend)
        return _block_end(self, out, x, self.conv3, self.bn3)


class ResNet(FusedModule, reference_models.ResNet):
    """torchvision's ResNet (same arguments, modules, state_dict and initialisation) with the
    fused stem and blocks; ``small_input``, ``backend`` and ``memory_efficient`` as in the
    module docstring.

    Its arguments are :class:`resnet_fast.reference_models.ResNet`'s (torchvision's, and
    ``small_input``), plus ``backend`` and ``memory_efficient``. ``block`` is
    :class:`BasicBlock` or :class:`Bottleneck` (or any block class with their constructor; the
    fused ones are what make the blocks fast).
    """

    def __init__(self, *args: Any, backend: Optional[str] = None,
                 memory_efficient: bool = False, **kwargs: Any) -> None:
        validate_backend(backend)  # before building: a bad name fails fast
        super().__init__(*args, **kwargs)
        adopt_sync_batch_norms(self)  # norm_layer=nn.SyncBatchNorm: fused, and DDP on the CPU
        self.set_backend(backend)
        self.set_memory_efficient(memory_efficient)

    def _stem(self, x: Tensor) -> Tensor:
        """``relu(bn1(conv1(x)))`` as one fused call, on a checked input."""
        check_input(x, self.conv1.in_channels, type(self).__name__)
        return conv_bn_act(x, self.conv1, self.bn1, self.relu, recompute=self.memory_efficient,
                           backend=self.backend)


(resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
 resnext101_64x4d, wide_resnet50_2, wide_resnet101_2) = make_builders(
    ResNet, {"basic": BasicBlock, "bottleneck": Bottleneck}, ("backend", "memory_efficient"))
