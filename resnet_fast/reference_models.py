"""Eager ResNets with torchvision's structure: the ground truth of :mod:`resnet_fast.models`.

``ResNet``, ``BasicBlock`` and ``Bottleneck`` build the same modules under the same attribute
names as torchvision's ``models/resnet.py`` (so the same state_dict keys, shapes, parameter
counts and initialisation) and run them as torchvision does, module by module, with no fused
op. The fused models of :mod:`resnet_fast.models` subclass these classes and replace only
the blocks' ``forward`` and the ResNet's ``_stem``, so the two load each other's state_dicts;
both families' builders (``resnet18`` ... ``wide_resnet101_2``) are made by
:func:`make_builders`. Nothing here uses resnet_fast's own ops, so the eager model stays an
independent reference for the fused one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "conv3x3", "conv1x1", "ARCHITECTURES", "load_weights",
    "build_resnet", "make_builder", "make_builders",
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


class _Block(nn.Module):
    """What torchvision's two blocks share: the constructor's arguments, ``norm_layer``'s
    default (``nn.BatchNorm2d``), and the shortcut (``downsample``) and ``stride`` kept after
    the layers each block builds in ``_build_layers``."""

    expansion: int

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
        self._build_layers(inplanes, planes, stride, groups, base_width, dilation,
                           nn.BatchNorm2d if norm_layer is None else norm_layer)
        self.downsample = downsample
        self.stride = stride


class BasicBlock(_Block):
    """Two 3x3 conv + BatchNorm layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x)))))
    + shortcut(x))``, the shortcut being ``downsample(x)`` or ``x``."""

    expansion: int = 1

    def _build_layers(self, inplanes: int, planes: int, stride: int, groups: int,
                      base_width: int, dilation: int,
                      norm_layer: Callable[..., nn.Module]) -> None:
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

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (grouped, strided, dilated), 1x1 expand, each followed by BatchNorm, and
    a shortcut: ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``.

    The stride sits on the 3x3 conv (ResNet v1.5), as in torchvision. The middle width is
    ``int(planes * base_width / 64) * groups``; the output has ``planes * 4`` channels.
    """

    expansion: int = 4

    def _build_layers(self, inplanes: int, planes: int, stride: int, groups: int,
                      base_width: int, dilation: int,
                      norm_layer: Callable[..., nn.Module]) -> None:
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

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

    def _stem(self, x: Tensor) -> Tensor:
        """``relu(bn1(conv1(x)))``, before the max-pool."""
        return self.relu(self.bn1(self.conv1(x)))

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))
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


# What each architecture is, the first line of its builders' docstrings.
_SUMMARIES = {
    "resnet18": "ResNet-18 (He et al., 2015): BasicBlocks [2, 2, 2, 2], 11,689,512 parameters.",
    "resnet34": "ResNet-34: BasicBlocks [3, 4, 6, 3].",
    "resnet50": "ResNet-50: Bottlenecks [3, 4, 6, 3], 25,557,032 parameters.",
    "resnet101": "ResNet-101: Bottlenecks [3, 4, 23, 3].",
    "resnet152": "ResNet-152: Bottlenecks [3, 8, 36, 3].",
    "resnext50_32x4d": "ResNeXt-50 32x4d (Xie et al., 2016): ResNet-50 with 32 groups of "
                       "width 4.",
    "resnext101_32x8d": "ResNeXt-101 32x8d: ResNet-101 with 32 groups of width 8.",
    "resnext101_64x4d": "ResNeXt-101 64x4d: ResNet-101 with 64 groups of width 4.",
    "wide_resnet50_2": "Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016): ResNet-50 with twice "
                       "the Bottleneck width.",
    "wide_resnet101_2": "Wide ResNet-101-2: ResNet-101 with twice the Bottleneck width.",
}


def make_builder(arch: str, resnet_class: type, blocks: Mapping[str, type],
                 arguments: str) -> Callable[..., nn.Module]:
    """The torchvision-style builder of architecture ``arch`` (a key of ``ARCHITECTURES``):
    ``arch(*, weights=None, progress=True, small_input=False, **kwargs)``, building
    ``resnet_class`` from ``blocks`` with :func:`build_resnet`; its docstring is the
    architecture's summary and ``arguments``."""

    def builder(*, weights: Any = None, progress: bool = True, small_input: bool = False,
                **kwargs: Any) -> nn.Module:
        return build_resnet(arch, resnet_class, blocks, weights, progress,
                            small_input=small_input, **kwargs)

    builder.__name__ = builder.__qualname__ = arch
    builder.__module__ = resnet_class.__module__
    builder.__doc__ = f"{_SUMMARIES[arch]}\n\n{arguments}"
    return builder


def make_builders(resnet_class: type, blocks: Mapping[str, type],
                  extra_keywords: Sequence[str] = ()) -> tuple[Callable[..., nn.Module], ...]:
    """:func:`make_builder`'s builder of every architecture, in ``ARCHITECTURES``' order; the
    docstrings name ``extra_keywords``, the keyword arguments ``resnet_class`` takes beyond
    :class:`ResNet`'s."""
    keywords = "".join(f", ``{k}``" for k in extra_keywords)
    arguments = ("``weights``: ``None``, a state_dict or the path of one (``num_classes`` "
                 "follows its ``fc``); ``progress`` is accepted for torchvision's signature. "
                 "Other keyword arguments go to :class:`ResNet` (``num_classes``, "
                 f"``zero_init_residual``, ``norm_layer``, ..., ``small_input``{keywords}); the "
                 "architecture's own ``groups`` and ``width_per_group`` are fixed.")
    return tuple(make_builder(arch, resnet_class, blocks, arguments) for arch in ARCHITECTURES)


(resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
 resnext101_64x4d, wide_resnet50_2, wide_resnet101_2) = make_builders(
    ResNet, {"basic": BasicBlock, "bottleneck": Bottleneck})
