"""Eager definitions of every fused op: the ground truth the kernels are checked against.

Written with ``torch.nn.functional`` only (and ``torch.distributed.all_reduce`` for
:func:`sync_batch_norm`), so each function is exactly what a PyTorch user would write by hand.
The signatures match :mod:`resnet_fast.functional` (minus ``backend``), so a test can call
either module with the same arguments. Running statistics are updated in place by
``F.batch_norm``, as ``nn.BatchNorm2d`` does.

``momentum=None`` means a cumulative moving average, as in ``nn.BatchNorm2d``: the factor is
``1 / num_batches_tracked`` after the counter is incremented. Here the counter is the optional
``num_batches_tracked`` tensor, incremented in place when statistics are tracked in training
(``nn.BatchNorm2d`` keeps it as a buffer and does the same).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu", "conv_bn_relu",
           "sync_batch_norm"]


def _momentum_factor(
    momentum: Optional[float],
    training: bool,
    running_mean: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    count: bool = True,
) -> float:
    """The exponential-average factor ``nn.BatchNorm2d.forward`` would pass to ``F.batch_norm``,
    counting this batch in ``num_batches_tracked`` as it does when ``count`` (the fused ops
    count it themselves: with ``count=False`` the counter is read, not updated)."""
    if not (training and running_mean is not None):
        return 0.0 if momentum is None else momentum
    if momentum is None and num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative moving average) needs num_batches_tracked, the count of "
            "batches seen so far, as nn.BatchNorm2d keeps it"
        )
    if num_batches_tracked is not None and count:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    return 1.0 / (float(num_batches_tracked) + (0 if count else 1))


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    # F.batch_norm uses batch statistics when there are no running statistics, in eval too.
    factor = _momentum_factor(momentum, training, running_mean, num_batches_tracked)
    return F.batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training or running_mean is None,
        factor,
        eps,
    )


def batch_norm_relu(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(batch_norm(input))``."""
    y = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked,
    )
    return F.relu(y)


def batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(batch_norm(input) + residual)``: the end of a ResNet block with an identity shortcut."""
    y = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked,
    )
    return F.relu(y + residual)


def dual_batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual_running_mean: Optional[Tensor],
    residual_running_var: Optional[Tensor],
    residual_weight: Optional[Tensor],
    residual_bias: Optional[Tensor],
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    residual_num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(batch_norm(input) + batch_norm(residual))``: a block end whose shortcut is a
    downsampling conv followed by its own BatchNorm (same ``training``, ``momentum``, ``eps``)."""
    y = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked,
    )
    r = _batch_norm(
        residual, residual_running_mean, residual_running_var, residual_weight, residual_bias,
        training, momentum, eps, residual_num_batches_tracked,
    )
    return F.relu(y + r)


def conv_bn_relu(
    input: Tensor,
    conv_weight: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    conv_bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``act(batch_norm(conv2d(input)) + residual)``: a conv layer, its BatchNorm, the optional
    shortcut add and ReLU (``relu=True``) or identity (``relu=False``)."""
    y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    y = _batch_norm(
        y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
        num_batches_tracked,
    )
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


class _AllReduce(torch.autograd.Function):
    """The sum of ``tensor`` over the processes of ``group``; the gradient is summed alike
    (each process's output feeds its own loss, and the input feeds all of them)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduce.apply(grad, ctx.group), None


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    num_batches_tracked: Optional[Tensor] = None,
    process_group=None,
) -> Tensor:
    """``act(batch_norm(input) + residual)`` with the batch statistics of every process of
    ``process_group`` (``None``: the default group), as ``nn.SyncBatchNorm`` computes in
    training: the ground truth of :class:`resnet_fast.SyncBatchNorm`.

    Plain ops and a differentiable all_reduce (:class:`_AllReduce`, whose backward
    all-reduces the gradients): one all_reduce of each process's count and per-channel sum
    gives the global mean, a second one of the per-channel sum of squared deviations from it
    the (biased) variance; backward runs one for each. ``input`` is ``(N, C, ...)``; the running
    statistics (when given) are updated in place with the unbiased variance over the global
    count, and ``num_batches_tracked`` counted, as ``nn.SyncBatchNorm`` does.
    """
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    count = input.new_full((1,), input.numel() // input.shape[1])
    sums = _AllReduce.apply(torch.cat([count, input.sum(dims)]), process_group)
    n, mean = sums[0], sums[1:] / sums[0]
    centered = input - mean.view(shape)
    var = _AllReduce.apply(centered.square().sum(dims), process_group) / n
    y = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if running_mean is not None:
        factor = _momentum_factor(momentum, True, running_mean, num_batches_tracked)
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            unbiased = (var * (n / (n - 1))).to(running_var.dtype)
            running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


# ---------------------------------------------------------------------------------------------
# Reference models: eager ResNets with torchvision's structure.
#
# ``ResNet``, ``BasicBlock`` and ``Bottleneck`` build the same modules under the same attribute
# names as torchvision's ``models/resnet.py`` (so the same state_dict keys, shapes, parameter
# counts and initialisation) and run them as torchvision does, module by module, with no fused
# op. The fused models of :mod:`resnet_fast.models` subclass these classes and replace only
# ``forward``, so the two load each other's state_dicts.
# ---------------------------------------------------------------------------------------------

import os  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any, Callable, Sequence, Union  # noqa: E402

from torch import nn  # noqa: E402

__all__ += [
    "ResNet", "BasicBlock", "Bottleneck", "conv3x3", "conv1x1", "ARCHITECTURES",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, bias-free, padded to keep the spatial size at stride 1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, bias-free."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x)))))
    + shortcut(x))``, the shortcut being ``downsample(x)`` or ``x``."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        # conv1 carries the block's stride (and downsample the shortcut's).
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped, strided, dilated), 1x1 expand, each followed by BatchNorm, and
    a shortcut: ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``.

    The stride sits on the 3x3 conv (ResNet v1.5), as in torchvision. The middle width is
    ``int(planes * base_width / 64) * groups``; the output has ``planes * 4`` channels.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet with torchvision's modules, attribute names and initialisation.

    ``small_input=True`` gives the CIFAR-style stem for small images: ``conv1`` is a 3x3
    stride-1 conv and ``maxpool`` an ``nn.Identity`` (kept so the state_dict keys stay those of
    the ImageNet stem; only ``conv1.weight``'s shape differs).
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
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # Each entry replaces the 2x2 stride of layer2, layer3 or layer4 with a dilation.
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, "
                f"got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.small_input = small_input
        if small_input:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1,
                                   bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3,
                                   bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if small_input
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero the last BatchNorm's scale of every block, so each block starts as the identity
        # (Goyal et al., "Accurate, Large Minibatch SGD", 2017).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# name -> (block, blocks per stage, fixed constructor arguments), as torchvision defines them.
ARCHITECTURES: dict[str, tuple[str, tuple[int, int, int, int], dict[str, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2), {}),
    "resnet34": ("basic", (3, 4, 6, 3), {}),
    "resnet50": ("bottleneck", (3, 4, 6, 3), {}),
    "resnet101": ("bottleneck", (3, 4, 23, 3), {}),
    "resnet152": ("bottleneck", (3, 8, 36, 3), {}),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), {"width_per_group": 128}),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), {"width_per_group": 128}),
}

_NO_DOWNLOAD = (
    "resnet_fast downloads no weights: pass weights=None, a state_dict, or the path of a file "
    "holding one (torch.save(model.state_dict(), path)). torchvision's pretrained weights load "
    "as a state_dict: torchvision.models.resnet50(weights=...).state_dict()"
)


def load_weights(weights: Any) -> Optional[Mapping[str, Tensor]]:
    """The state_dict that ``weights`` names: ``None``, a mapping of tensors, or a path to a
    file saved with ``torch.save`` (loaded with ``weights_only=True`` onto the CPU)."""
    if weights is None or isinstance(weights, Mapping):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise ValueError(f"weights={weights!r} is not a file. {_NO_DOWNLOAD}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{os.fspath(weights)!r} holds a {type(state).__name__}, not a state_dict"
            )
        return state
    raise TypeError(f"weights must be None, a state_dict or a path, got "
                    f"{type(weights).__name__} {weights!r}. {_NO_DOWNLOAD}")


def _set_fixed_argument(kwargs: dict, name: str, value: Any) -> None:
    """Sets ``kwargs[name] = value``, refusing a different value the caller gave."""
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got "
                         f"{kwargs[name]} instead.")
    kwargs[name] = value


def build_resnet(arch: str, resnet_class: type, blocks: Mapping[str, type], weights: Any,
                 progress: bool, **kwargs: Any) -> nn.Module:
    """``resnet_class(blocks[kind], layers, **kwargs)`` for the architecture ``arch``, with the
    state_dict ``weights`` (see :func:`load_weights`) loaded strictly, as torchvision does.
    ``progress`` is accepted for torchvision's signature; nothing is downloaded."""
    del progress
    kind, layers, fixed = ARCHITECTURES[arch]
    state = load_weights(weights)
    for name, value in fixed.items():
        _set_fixed_argument(kwargs, name, value)
    if state is not None and isinstance(state.get("fc.weight"), Tensor):
        _set_fixed_argument(kwargs, "num_classes", state["fc.weight"].shape[0])
    model = resnet_class(blocks[kind], list(layers), **kwargs)
    if state is not None:
        model.load_state_dict(state)
    return model


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def resnet18(*, weights: Any = None, progress: bool = True, small_input: bool = False,
             **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al., 2015): BasicBlocks [2, 2, 2, 2], 11,689,512 parameters."""
    return build_resnet("resnet18", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, small_input: bool = False,
             **kwargs: Any) -> ResNet:
    """ResNet-34: BasicBlocks [3, 4, 6, 3]."""
    return build_resnet("resnet34", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, small_input: bool = False,
             **kwargs: Any) -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3], 25,557,032 parameters."""
    return build_resnet("resnet50", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, small_input: bool = False,
              **kwargs: Any) -> ResNet:
    """ResNet-101: Bottlenecks [3, 4, 23, 3]."""
    return build_resnet("resnet101", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, small_input: bool = False,
              **kwargs: Any) -> ResNet:
    """ResNet-152: Bottlenecks [3, 8, 36, 3]."""
    return build_resnet("resnet152", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                    **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., 2016): ResNet-50 with 32 groups of width 4."""
    return build_resnet("resnext50_32x4d", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                     **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d: ResNet-101 with 32 groups of width 8."""
    return build_resnet("resnext101_32x8d", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                     **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d: ResNet-101 with 64 groups of width 4."""
    return build_resnet("resnext101_64x4d", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                    **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016): ResNet-50 with twice the Bottleneck
    width."""
    return build_resnet("wide_resnet50_2", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                     **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2: ResNet-101 with twice the Bottleneck width."""
    return build_resnet("wide_resnet101_2", ResNet, _BLOCKS, weights, progress,
                        small_input=small_input, **kwargs)
