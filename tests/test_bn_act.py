"""Parity of the fused BatchNorm (+ add) + ReLU ops with the reference, on every backend (a
recorded skip where one cannot run here), under the tolerance policy (resnet_fast.verify)."""

import itertools

import pytest
import torch

from resnet_fast import functional, reference
from resnet_fast.verify import CONV_OPS, LAYOUTS, OPS, Case, check_case

BN_OPS = [op for op in OPS if op not in CONV_OPS]  # conv_bn_relu: tests/test_conv_bn_act.py

SHAPES = [(2, 7, 5, 3), (8, 64, 16, 16), (4, 2048, 7, 7), (3, 33, 4, 5)]
# Triton's interpreter is slow: it gets the small shapes only.
SMALL_SHAPES = [(2, 7, 5, 3), (3, 33, 4, 5)]
DTYPES = [torch.float32, torch.bfloat16]


def _assert_passes(case, backend, device):
    result = check_case(case, backend, device)
    assert result.passed, f"{case.describe()} [{backend}]: " + "; ".join(result.failures())


PARITY_CASES = [Case(op, shape, dtype, layout, training) for op, shape, dtype, layout, training
                in itertools.product(BN_OPS, SHAPES, DTYPES, LAYOUTS, (True, False))]


@pytest.mark.parametrize("case", PARITY_CASES, ids=Case.describe)
def test_parity(case, backend, device, interpreted):
    if interpreted and case.shape not in SMALL_SHAPES:
        pytest.skip("interpreter: the small shapes only")
    _assert_passes(case, backend, device)


@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize(
    "variant",
    [
        dict(shape=(1, 3, 1, 1), training=False),  # N=1, 1x1 spatial, eval
        dict(shape=(2, 5, 1, 1)),  # 1x1 spatial in training
        dict(shape=(2, 6, 3, 3), momentum=None),  # cumulative moving average
        dict(shape=(2, 6, 3, 3), track_running_stats=False),  # batch statistics, no tracking
        dict(shape=(2, 6, 3, 3), track_running_stats=False, training=False),
        dict(shape=(2, 6, 3, 3), affine=False),  # weight and bias None
        dict(shape=(2, 6, 3, 3), dtype=torch.float64),
        dict(shape=(2, 6, 3, 3), dtype=torch.float16, layout="channels_last"),
        # a mean 1e4 times the spread, and constant channels (variance 0): x is centred before
        # it is scaled, as eager does (the folded x * scale + shift fails both)
        dict(shape=(4, 3, 6, 6), input_offset=100.0, input_spread=0.01),
        dict(shape=(2, 6, 3, 3), input_offset=0.7, input_spread=0.0),
        dict(shape=(2, 6, 3, 3), input_offset=0.7, input_spread=0.0, training=False,
             track_running_stats=False),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]}" for k in v),
)
def test_corners(backend, device, op, variant):
    _assert_passes(Case(op, **variant), backend, device)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_output_keeps_memory_format(backend, device, memory_format):
    x = torch.randn(2, 8, 3, 5, device=device).to(memory_format=memory_format)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    y = functional.batch_norm_add_relu(x, torch.randn_like(x), rm, rv, training=True,
                                       backend=backend)
    assert y.is_contiguous(memory_format=memory_format)


def test_cumulative_average_matches_module(backend, device):
    """momentum=None over several steps, with num_batches_tracked as nn.BatchNorm2d keeps it."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6, momentum=None).to(device)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    count = bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(4, 6, 3, 3, device=device) * 3 + 1
        expected = torch.relu(bn(x))
        got = functional.batch_norm_relu(x, rm, rv, bn.weight, bn.bias, True, None,
                                         num_batches_tracked=count, backend=backend)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    assert count.item() == bn.num_batches_tracked.item() == 3


def test_large_mean_keeps_variance(backend, device, interpreted):
    """A channel with mean 1e4 and std 1: float32 statistics keep the variance to < 1e-3."""
    torch.manual_seed(0)
    shape = (4, 3, 6, 6) if interpreted else (16, 3, 32, 32)
    x64 = torch.randn(shape, dtype=torch.float64)
    x64[:, 1] += 1e4
    x64[:, 2] = 7.0  # constant channel
    x = x64.float().to(device)
    rm, rv = torch.zeros(3, device=device), torch.zeros(3, device=device)
    y = functional.batch_norm_relu(x, rm, rv, training=True, momentum=1.0, backend=backend)
    exact = x.double().cpu().transpose(0, 1).reshape(3, -1).var(dim=1)  # unbiased
    rel = ((rv.double().cpu() - exact).abs() / exact.clamp_min(1e-30))[:2]
    assert rel.max().item() < 1e-3, rel
    assert rv[2].item() == 0.0
    assert torch.isfinite(y).all()


def test_autocast_bfloat16_activations_with_float32_parameters(backend, device):
    """Under autocast, half-precision activations meet float32 weights and running statistics
    (as nn.BatchNorm2d does), and a float32 residual is cast to the activations' dtype."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5, device=device, dtype=torch.bfloat16)
    residual = torch.randn(4, 8, 5, 5, device=device)
    w, b = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = functional.batch_norm_add_relu(x, residual, rm, rv, w, b, True, backend=backend)
    assert y.dtype == torch.bfloat16 and rm.dtype == rv.dtype == torch.float32
    expected = reference.batch_norm_add_relu(x.float(), residual.bfloat16().float(), rm_ref,
                                             rv_ref, w, b, True)
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(rm, rm_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rv, rv_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("op", ["batch_norm_relu", "dual_batch_norm_add_relu"])
def test_large_mean_keeps_gradients(backend, device, interpreted, op):
    """Channels whose mean (1e3) is large against their spread (1): float32 input gradients stay
    within the tolerance policy (the backward centres x before scaling it)."""
    torch.manual_seed(0)
    shape = (2, 4, 3, 3) if interpreted else (8, 4, 8, 8)
    x64 = torch.randn(shape, dtype=torch.float64) + 1e3
    r64 = torch.randn(shape, dtype=torch.float64) - 1e3
    g64 = torch.randn(shape, dtype=torch.float64)
    w64, b64 = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)

    def grads(fn, dtype, **kwargs):
        x = x64.to(device, dtype).requires_grad_()
        r = r64.to(device, dtype).requires_grad_()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = w64.to(device, acc), b64.to(device, acc)
        bn = [None, None, w, b]
        if op == "batch_norm_relu":
            out = fn(x, *bn, True, **kwargs)
            return torch.autograd.grad(out, [x], g64.to(device, dtype))
        out = fn(x, r, *bn, *bn, True, **kwargs)
        return torch.autograd.grad(out, [x, r], g64.to(device, dtype))

    ref = grads(getattr(reference, op), torch.float64)
    eager = grads(getattr(reference, op), torch.float32)
    fused = grads(getattr(functional, op), torch.float32, backend=backend)
    for f, e, r in zip(fused, eager, ref):
        err = (f.double().cpu() - r.cpu()).abs().max().item()
        bound = 2 * (e.double().cpu() - r.cpu()).abs().max().item() + 1e-5 * max(
            1.0, r.abs().max().item())
        assert err <= bound, (err, bound)


def test_one_by_one_spatial_mixed_strides(backend, device):
    """(N, C, 1, 1) tensors are both NCHW and channels_last: input, residual and gradient may
    carry either layout's strides and still go through together."""
    x = torch.randn(4, 6, 1, 1, device=device).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(4, 6, 1, 1, device=device).requires_grad_()
    w = (torch.rand(6, device=device) + 0.5).requires_grad_()
    args = (None, None, w, None, True)
    out = functional.batch_norm_add_relu(x, r, *args, backend=backend)
    expected = reference.batch_norm_add_relu(x, r, *args)
    grad = torch.randn(4, 6, 1, 1, device=device).contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, [x, r, w], grad)
    want = torch.autograd.grad(expected, [x, r, w], grad)
    torch.testing.assert_close(out, expected)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
