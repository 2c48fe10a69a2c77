"""Sample arguments of resnet_fast's ops, shared by the registration tests (opcheck, gradcheck,
torch.compile; tests/test_ops_registration.py).

``bn_act_args`` and ``conv_bn_act_args`` return the positional arguments of
``resnet_fast::bn_act`` and ``resnet_fast::conv_bn_act`` in their schemas' order
(``csrc/ops.cpp``); ``by_name`` and ``args_of`` translate between those tuples and dicts keyed by
the schema's argument names, so a backward op's arguments are the forward's plus its outputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from resnet_fast import ops

BN_ACT_SHAPE = (3, 5, 4, 3)


class BatchNormState(NamedTuple):
    """One BatchNorm's per-channel tensors, in the order the functional API takes them."""
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]


NO_BATCH_NORM = BatchNormState(None, None, None, None, None)


def batch_norm_state(channels: int, *, device, dtype=torch.float32, track: bool = True,
                     requires_grad: bool = True, count: int = 3) -> BatchNormState:
    """A BatchNorm's tensors in the accumulation dtype ``dtype``: running mean in [-0.5, 0.5),
    variance in [0.5, 1.5) and batch counter ``count`` (all None when not ``track``), weight in
    [0.5, 1.5) and bias in [-0.5, 0.5) (leaves that need a gradient with ``requires_grad``)."""
    def rand(offset):
        return torch.rand(channels, dtype=dtype, device=device) + offset

    running = (rand(-0.5), rand(0.5), torch.tensor(count, device=device)) if track else (
        None, None, None)
    return BatchNormState(running[0], running[1], rand(0.5).requires_grad_(requires_grad),
                          rand(-0.5).requires_grad_(requires_grad), running[2])


def by_name(op, args) -> dict:
    """``op``'s positional ``args`` keyed by its schema's argument names."""
    names = [a.name for a in op._schema.arguments]
    assert len(names) == len(args), (op, len(args))
    return dict(zip(names, args))


def args_of(op, named: dict) -> tuple:
    """The positional arguments of ``op`` taken by name from ``named``."""
    return tuple(named[a.name] for a in op._schema.arguments)


def bn_act_args(mode: str, batch_stats: bool, track: bool, *, backend: str, device,
                shape=BN_ACT_SHAPE, dtype=torch.float32,
                memory_format=torch.contiguous_format, requires_grad: bool = True) -> tuple:
    """The 18 arguments of resnet_fast::bn_act for a residual ``mode``: 'none', 'add' or 'bn'
    (the residual batch-normalised too, as behind a downsample) with the op's ``batch_stats``;
    ``track`` gives running statistics and batch counters."""
    torch.manual_seed(0)
    acc = ops.acc_dtype_of(dtype)
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(
        memory_format=memory_format).requires_grad_(requires_grad)
    r = torch.randn_like(x).requires_grad_(requires_grad) if mode != "none" else None

    def bn():
        return batch_norm_state(shape[1], device=device, dtype=acc, track=track,
                                requires_grad=requires_grad)

    main = bn()
    res = bn() if mode == "bn" else NO_BATCH_NORM
    return (x, main.weight, main.bias, main.running_mean, main.running_var,
            main.num_batches_tracked, r, res.weight, res.bias, res.running_mean,
            res.running_var, res.num_batches_tracked, mode == "bn", batch_stats, 0.1, 1e-5, True,
            backend)


CONV_MODES = ("train", "eval", "eval_inference", "defer", "prologue", "residual", "recompute")


def conv_bn_act_args(mode: str, *, backend: str, device, dtype=torch.float32,
                     memory_format=torch.channels_last, requires_grad: bool = True) -> tuple:
    """The 25 arguments of resnet_fast::conv_bn_act (a 4 -> 6 channel 3x3 conv, stride 2, on
    2x4x5x5); ``mode`` names the path (CONV_MODES): 'train', 'eval', 'eval_inference' (no
    autograd: the one-pass path), 'defer', 'prologue' (input normalised on load), 'residual'
    (training, + conv bias + residual, no ReLU), 'recompute' (training, input normalised on
    load, + conv bias + residual + ReLU, the conv output recomputed in backward)."""
    assert mode in CONV_MODES, mode
    torch.manual_seed(0)
    Cin, Cout = 4, 6
    acc = ops.acc_dtype_of(dtype)
    grad = requires_grad and mode != "eval_inference"
    x = torch.randn(2, Cin, 5, 5, dtype=dtype, device=device).contiguous(
        memory_format=memory_format).requires_grad_(grad)
    w = (torch.randn(Cout, Cin, 3, 3, dtype=dtype, device=device) / 6).requires_grad_(grad)
    prologue = [None, None, None]
    if mode in ("prologue", "recompute"):
        in_bn = batch_norm_state(Cin, device=device, dtype=acc, track=False, requires_grad=grad)
        prologue = [in_bn.weight, in_bn.bias,
                    torch.stack([torch.randn(Cin, dtype=acc, device=device) * 0.1,
                                 torch.rand(Cin, dtype=acc, device=device) + 0.5])]
    residual = mode in ("residual", "recompute")
    conv_bias = (torch.randn(Cout, dtype=dtype, device=device).requires_grad_(grad)
                 if residual else None)
    r = (torch.randn(2, Cout, 3, 3, dtype=dtype, device=device).contiguous(
        memory_format=memory_format).requires_grad_(grad) if residual else None)
    bn = batch_norm_state(Cout, device=device, dtype=acc, requires_grad=grad)
    batch_stats = mode not in ("eval", "eval_inference")
    return (x, w, conv_bias, [2, 2], [1, 1], [1, 1], 1, *prologue, True,
            bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, r,
            batch_stats, 0.1, 1e-5, mode != "residual", mode == "defer",
            mode != "eval_inference", mode == "recompute", backend)
