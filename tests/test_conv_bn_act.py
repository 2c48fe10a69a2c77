"""Parity of the fused conv + BatchNorm (+ residual) + ReLU op with the reference, on every backend
(a recorded skip where one cannot run here), under the tolerance policy (resnet_fast.verify):
output, the gradients of input, conv weight and bias, BatchNorm weight and bias and residual, and
running statistics. Also the one-pass eval path (no autograd), the DeferredBatchNorm hand-off
between two convs, and autocast."""

import copy
import itertools
import pickle

import pytest
import torch

from resnet_fast import folded_weights, functional, ops, reference
from resnet_fast.functional import DeferredBatchNorm
from resnet_fast.verify import LAYOUTS, Case, Conv, check_case, tolerance

# (input shape, conv): the kernels, strides, paddings, dilation and groups of the ResNet family,
# channel counts that are no multiple of any block, batch 1.
CONVS = [
    ((2, 8, 9, 9), Conv(12, kernel=3, stride=1, padding=1)),
    ((2, 8, 9, 9), Conv(12, kernel=3, stride=2, padding=1, bias=True, residual=True)),
    ((2, 3, 11, 11), Conv(24, kernel=7, stride=2, padding=3)),
    ((1, 20, 6, 5), Conv(36, kernel=1, stride=1, padding=0, residual=True)),
    ((2, 20, 7, 7), Conv(36, kernel=1, stride=2, padding=0, relu=False)),
    ((2, 16, 7, 7), Conv(16, kernel=3, padding=2, dilation=2, relu=False, residual=True)),
    ((2, 64, 5, 5), Conv(64, kernel=3, padding=1, groups=32)),
]
# Triton's interpreter is slow: it gets these only.
TINY_CONVS = [
    ((2, 3, 5, 5), Conv(5, kernel=3, stride=1, padding=1, bias=True, residual=True)),
    ((1, 4, 6, 6), Conv(6, kernel=3, stride=2, padding=1, groups=2, relu=False)),
]
DTYPES = [torch.float32, torch.bfloat16]


def _assert_passes(case, backend, device):
    result = check_case(case, backend, device)
    assert result.passed, f"{case.describe()} [{backend}]: " + "; ".join(result.failures())


def _parity_cases(convs):
    """Every dtype and mode per conv, every layout on the first conv, channels_last on the rest."""
    for (shape, conv), dtype, training in itertools.product(convs, DTYPES, (True, False)):
        for layout in LAYOUTS if conv == convs[0] else ("channels_last",):
            yield Case("conv_bn_relu", shape, dtype, layout, training, conv=conv)


PARITY_CASES = list(_parity_cases(CONVS))
TINY_PARITY_CASES = list(_parity_cases(TINY_CONVS))


@pytest.mark.parametrize("case", PARITY_CASES + TINY_PARITY_CASES, ids=Case.describe)
def test_parity(case, backend, device, interpreted):
    if interpreted and case not in TINY_PARITY_CASES:
        pytest.skip("interpreter: the tiny convs only")
    _assert_passes(case, backend, device)


@pytest.mark.parametrize(
    "variant",
    [
        dict(shape=(1, 3, 1, 1), training=False, conv=Conv(5, kernel=1, padding=0)),
        dict(shape=(2, 3, 1, 1), conv=Conv(5, kernel=3, padding=1)),  # 1x1 spatial, training
        dict(shape=(2, 4, 3, 3), momentum=None),
        dict(shape=(2, 4, 3, 3), track_running_stats=False),
        dict(shape=(2, 4, 3, 3), track_running_stats=False, training=False),
        dict(shape=(2, 4, 3, 3), affine=False),
        dict(shape=(2, 4, 3, 3), dtype=torch.float64, conv=Conv(6, bias=True, residual=True)),
        # One input channel into a 1x1 conv: training BatchNorm makes the conv's weight gradient
        # 0 by symmetry, so what comes out is rounding, which must stay within eager's.
        dict(shape=(1, 1, 5, 5), conv=Conv(9, kernel=1, padding=0, relu=False)),
        dict(shape=(1, 1, 5, 5), layout="channels_last", conv=Conv(9, kernel=1, padding=0,
                                                                   relu=False)),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]}" for k in v),
)
def test_corners(backend, device, variant):
    _assert_passes(Case("conv_bn_relu", **variant), backend, device)


def _eval_tensors(dtype, layout, residual, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 7, 7, generator=g, dtype=torch.float64)
    w = torch.randn(24, 16, 3, 3, generator=g, dtype=torch.float64) / 12
    cb = torch.randn(24, generator=g, dtype=torch.float64)
    bn = [torch.randn(24, generator=g, dtype=torch.float64) * 0.2,
          torch.rand(24, generator=g, dtype=torch.float64) + 0.5,
          torch.rand(24, generator=g, dtype=torch.float64) + 0.5,
          torch.randn(24, generator=g, dtype=torch.float64)]
    r = torch.randn(2, 24, 4, 4, generator=g, dtype=torch.float64) if residual else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def cast(t, act):
        if t is None:
            return None
        t = t.to(device, dtype if act else torch.float32)
        return t.contiguous(memory_format=fmt) if act and t.dim() == 4 and t is not w else t

    return cast(x, True), w.to(device, dtype), cast(cb, True), [cast(t, False) for t in bn], \
        cast(r, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False),
                                           (False, False)])
def test_eval_without_autograd(backend, device, interpreted, dtype, layout, residual, relu):
    """Inference (no tensor needs a gradient) takes the one-pass path: oneDNN with the
    BatchNorm folded into the weights on the CPU, the conv epilogue on GPU backends."""
    if interpreted and (dtype, layout) != (torch.float32, "channels_last"):
        pytest.skip("interpreter: one dtype and layout")
    x, w, cb, bn, r = _eval_tensors(dtype, layout, residual, device)
    kwargs = dict(conv_bias=cb, stride=2, padding=1, residual=r, relu=relu)
    with torch.no_grad():
        out = functional.conv_bn_relu(x, w, *bn, False, backend=backend, **kwargs)
    eager = reference.conv_bn_relu(x, w, *bn, False, **kwargs)
    ref = reference.conv_bn_relu(
        x.double(), w.double(), *[t.double() for t in bn], False,
        **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    err = (out.double() - ref).abs().max().item()
    bound = tolerance(ref, (eager.double() - ref).abs().max().item(), dtype)
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_eval_folds_into_onednn_only_the_dtypes_it_takes_here(dtype):
    """The cpu backend's eval is one folded oneDNN call for float32, and for bfloat16 exactly
    where oneDNN runs bfloat16 on this CPU (an AVX2-only CPU refuses it); the other cases
    compose the conv with the BN kernels."""
    x = torch.empty(1, 2, 3, 3, dtype=dtype)
    folds = dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert ops._cpu_composite("cpu", x, batch_stats=False, save_raw=False) is not folds
    assert ops._cpu_composite("cpu", x, batch_stats=True, save_raw=False)
    assert ops._cpu_composite("cpu", x, batch_stats=False, save_raw=True)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_eval_folds_and_packs_once_per_parameter_version(backend, device):
    """The CPU eval path folds the BatchNorm into the conv and prepacks the weight once, and
    refolds when a parameter or running statistic changes in place."""
    x, w, cb, bn, _ = _eval_tensors(torch.float32, "channels_last", False, device)

    def run():
        with torch.no_grad():
            return functional.conv_bn_relu(x, w, *bn, False, conv_bias=cb, padding=1,
                                           backend="cpu")

    def packed_weight():
        return folded_weights._CACHE[id(w)][2][0]

    first = run()
    packed = packed_weight()
    torch.testing.assert_close(run(), first)
    assert packed_weight() is packed
    for t in (w, bn[1], cb):  # a weight update, a running statistic, the conv bias
        with torch.no_grad():
            t.mul_(1.5)
        expected = reference.conv_bn_relu(x, w, *bn, False, conv_bias=cb, padding=1)
        torch.testing.assert_close(run(), expected, atol=1e-4, rtol=1e-4)
        assert packed_weight() is not packed
        packed = packed_weight()
    conv = torch.nn.Conv2d(16, 24, 3, padding=1, bias=False)
    with torch.no_grad():
        functional.conv_bn_relu(x, conv.weight, *bn, False, padding=1, backend="cpu")
    copy.deepcopy(conv)  # the cache lives beside the parameter, not on it
    pickle.dumps(conv)
    key = id(conv.weight)
    assert key in folded_weights._CACHE
    del conv
    assert key not in folded_weights._CACHE


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
def test_eval_runs_in_the_input_layout(backend, device, layout, residual):
    """The folded oneDNN call runs in the input's layout: a prepacked weight only for a
    channels_last input (with an NCHW float32 one it would make oneDNN convert the input to
    channels_last and the output back), and no activation-sized copy either way."""
    x, w, cb, bn, r = _eval_tensors(torch.float32, layout, residual, device)

    def run():
        with torch.no_grad():
            return functional.conv_bn_relu(x, w, *bn, False, conv_bias=cb, padding=1,
                                           stride=2, residual=r, backend="cpu")

    run()  # folds and packs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        out = run()
    copies = [e.input_shapes for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone") and e.input_shapes
              and len(e.input_shapes[0]) == 4]
    assert copies == []
    assert folded_weights._CACHE[id(w)][2][0].is_mkldnn == (layout == "channels_last")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    expected = reference.conv_bn_relu(x.double(), w.double(), *(t.double() for t in bn), False,
                                      conv_bias=cb.double(), padding=1, stride=2,
                                      residual=None if r is None else r.double())
    eager = reference.conv_bn_relu(x, w, *bn, False, conv_bias=cb, padding=1, stride=2,
                                   residual=r)
    err = (out.double() - expected).abs().max().item()
    assert err <= tolerance(expected, (eager.double() - expected).abs().max().item(),
                            torch.float32), err


def _chain(fn, x, p, defer, backend=None):
    """conv1 -> BN1 -> ReLU -> conv2 -> BN2 (+ x) -> ReLU, the first BatchNorm deferred."""
    kwargs = {} if backend is None else dict(backend=backend, defer=defer)
    a = fn(x, p["w1"], p["rm1"], p["rv1"], p["g1"], p["b1"], True, padding=1, **kwargs)
    if backend is not None:
        kwargs.pop("defer")
    return a, fn(a, p["w2"], p["rm2"], p["rv2"], p["g2"], p["b2"], True, padding=1, residual=x,
                 **kwargs)


def _chain_params(dtype, device, C=6, memory_format=torch.channels_last):
    g = torch.Generator().manual_seed(1)
    p = {f"w{i}": torch.randn(C, C, 3, 3, generator=g) / 5 for i in (1, 2)}
    for i in (1, 2):
        p[f"g{i}"] = torch.rand(C, generator=g) + 0.5
        p[f"b{i}"] = torch.randn(C, generator=g) * 0.3
        p[f"rm{i}"] = torch.zeros(C)
        p[f"rv{i}"] = torch.ones(C)
    x = torch.randn(2, C, 5, 5, generator=g) + 0.2
    p = {k: v.to(device, dtype if k.startswith("w") else (torch.float64 if dtype == torch.float64
                                                          else torch.float32))
         for k, v in p.items()}
    return x.to(device, dtype).contiguous(memory_format=memory_format), p


@pytest.mark.parametrize("dtype,memory_format", [
    (torch.float64, torch.channels_last), (torch.float32, torch.channels_last),
    (torch.float32, torch.contiguous_format)])
def test_deferred_batch_norm_hand_off(backend, device, dtype, memory_format):
    """A conv's output deferred with its batch statistics and normalised inside the next conv's
    load gives the eager chain's output, gradients and running statistics."""
    x, p = _chain_params(dtype, device, memory_format=memory_format)
    x_ref, p_ref = x.clone(), {k: v.clone() for k, v in p.items()}
    leaves = ["w1", "w2", "g1", "b1", "g2", "b2"]
    for t in [x, x_ref] + [d[k] for d in (p, p_ref) for k in leaves]:
        t.requires_grad_(True)
    a, out = _chain(functional.conv_bn_relu, x, p, True, backend)
    assert isinstance(a, DeferredBatchNorm) and a.raw.shape == (2, 6, 5, 5)
    a_ref, expected = _chain(reference.conv_bn_relu, x_ref, p_ref, True)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(a.materialize(), a_ref, **tol)
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + [p[k] for k in leaves], grad)
    want = torch.autograd.grad(expected, [x_ref] + [p_ref[k] for k in leaves], grad)
    for name, g, w in zip(["x"] + leaves, got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"grad of {name}: {m}")
    for k in ("rm1", "rv1", "rm2", "rv2"):
        torch.testing.assert_close(p[k], p_ref[k], **tol)


def test_deferred_statistics_of_a_channel_far_from_zero(backend, device):
    """The batch statistics a deferred conv output carries stay accurate when the channel's mean
    (1e3, from the conv bias) is large against its spread (about 1)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, generator=g) / 8
    bias = torch.full((8,), 1e3)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    d = functional.conv_bn_relu(x.to(device), w.to(device), rm, rv, training=True,
                                conv_bias=bias.to(device), padding=1, defer=True,
                                backend=backend)
    raw = torch.nn.functional.conv2d(x.double(), w.double(), bias.double(), padding=1)
    var, mean = torch.var_mean(raw, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(d.stats[0].cpu().double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(d.stats[1].cpu().double(), torch.rsqrt(var + 1e-5), rtol=1e-3,
                               atol=0)
    n = raw.numel() // 8
    torch.testing.assert_close(rv.cpu().double(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-4,
                               atol=0)


def test_defer_in_eval_returns_the_tensor(backend, device):
    x, p = _chain_params(torch.float32, device)
    out = functional.conv_bn_relu(x, p["w1"], p["rm1"], p["rv1"], p["g1"], p["b1"], False,
                                  padding=1, defer=True, backend=backend)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, reference.conv_bn_relu(
        x, p["w1"], p["rm1"], p["rv1"], p["g1"], p["b1"], False, padding=1), atol=1e-5,
        rtol=1e-5)


def test_autocast_bfloat16(backend, device):
    """Under autocast the conv runs in bfloat16 (as F.conv2d does) with float32 BatchNorm
    tensors, and a float32 residual is cast."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, device=device)
    w = torch.randn(8, 8, 3, 3, device=device) / 8
    r = torch.randn(2, 8, 6, 6, device=device)
    bn = [torch.zeros(8, device=device), torch.ones(8, device=device),
          torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)]
    bn_ref = [t.clone() for t in bn]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = functional.conv_bn_relu(x, w, *bn, True, padding=1, residual=r, backend=backend)
        expected = reference.conv_bn_relu(x, w, *bn_ref, True, padding=1, residual=r)
    assert y.dtype == torch.bfloat16 and bn[0].dtype == torch.float32
    torch.testing.assert_close(y.float(), expected.float(), atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(bn[1], bn_ref[1], atol=1e-2, rtol=1e-2)


def test_one_by_one_output_with_channels_last_gradient(backend, device):
    """A conv whose output is 1x1 in space, channels_last tensors and a gradient carrying
    channels_last strides (the last stage of a small-input ResNet)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 8, 2, 2, device=device).contiguous(memory_format=cl).requires_grad_()
    w = (torch.randn(8, 8, 3, 3, device=device) / 8).contiguous(memory_format=cl)
    w.requires_grad_()
    r = torch.randn(2, 8, 1, 1, device=device).contiguous(memory_format=cl).requires_grad_()
    bn = [torch.zeros(8, device=device), torch.ones(8, device=device),
          (torch.rand(8, device=device) + 0.5).requires_grad_(), None]
    kwargs = dict(stride=2, padding=1, residual=r)
    y = functional.conv_bn_relu(x, w, *[t.clone() if t is not None and not t.requires_grad
                                        else t for t in bn], True, backend=backend, **kwargs)
    expected = reference.conv_bn_relu(x, w, *bn, True, **kwargs)
    grad = torch.randn(y.shape, device=device).contiguous(memory_format=cl)
    got = torch.autograd.grad(y, [x, w, r, bn[2]], grad)
    want = torch.autograd.grad(expected, [x, w, r, bn[2]], grad)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
