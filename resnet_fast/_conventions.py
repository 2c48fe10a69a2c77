"""What every layer of resnet_fast's fused ops agrees on: the layout an op computes in, its
accumulation dtype, a conv's output shape and ``groups``, and the residual modes of ``bn_act``.

A leaf: it imports nothing else of resnet_fast, so the Triton kernels (which need these and
nothing else of the package) import without the compiled extension ``resnet_fast._C``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["memory_format_of", "acc_dtype_of", "conv_output_shape", "check_groups",
           "NO_RESIDUAL", "ADD_RESIDUAL", "BN_RESIDUAL", "residual_mode"]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The dense layout a fused op computes in and returns: the input's own when it is dense in
    NCHW or channels_last, else the one PyTorch suggests for it (a strided view is copied)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fused op accumulates in and keeps its per-channel tensors in: float64 for
    float64 activations, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_output_shape(input_shape: Sequence[int], weight_shape: Sequence[int],
                      stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """``(N, Cout, Ho, Wo)`` of ``conv2d``; ``Ho`` or ``Wo`` below 1 means the input is too
    small for the kernel."""
    N, _, H, W = input_shape
    Cout, _, kh, kw = weight_shape
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return N, Cout, Ho, Wo


def check_groups(groups: object) -> None:
    """Refuses a conv's ``groups`` that is not a positive int (a bool is not one)."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")


# The residual modes of bn_act's kernels (RESIDUAL_MODE in the Triton kernels, ResidualMode in
# the C++ ones): the term added before the activation is 0, the residual r, or r BatchNorm'ed
# with its own statistics, (r - r_mean) * r_scale + r_b.
NO_RESIDUAL, ADD_RESIDUAL, BN_RESIDUAL = 0, 1, 2


def residual_mode(residual: Optional[Tensor], residual_bn: bool) -> int:
    """The residual mode of a ``bn_act`` call given ``residual`` (or ``None``) and
    ``residual_bn``."""
    if residual is None:
        return NO_RESIDUAL
    return BN_RESIDUAL if residual_bn else ADD_RESIDUAL
