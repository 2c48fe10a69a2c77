"""torch.library registration: opcheck, float64 gradcheck and torch.compile for every op."""

import pytest
import torch

import resnet_fast
from resnet_fast import functional, ops

from conftest import DEVICE

BACKENDS = [b for b in resnet_fast.available_backends(DEVICE) if b != "reference"]
INTERPRETED = DEVICE.type == "cpu"  # the triton backend runs under Triton's interpreter


def _bn_act_args(mode, training, track, backend, dtype=torch.float32, memory_format=None,
                 requires_grad=True):
    """Arguments of resnet_fast::bn_act for a residual mode ('none', 'add', 'bn')."""
    torch.manual_seed(0)
    C = 5
    x = torch.randn(3, C, 4, 3, dtype=dtype, device=DEVICE)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    acc = ops.acc_dtype_of(dtype)

    def per_channel(offset, grad):
        return (torch.rand(C, dtype=acc, device=DEVICE) + offset).requires_grad_(
            grad and requires_grad)

    r = torch.randn_like(x).requires_grad_(requires_grad) if mode != "none" else None
    rbn = mode == "bn"
    stats = (lambda: (per_channel(-0.5, False), per_channel(0.5, False))) if track else (
        lambda: (None, None))
    rm, rv = stats()
    rrm, rrv = stats() if rbn else (None, None)

    def counter(present):
        return torch.tensor(3, device=DEVICE) if present and track else None

    return (x.requires_grad_(requires_grad), per_channel(0.5, True), per_channel(-0.5, True),
            rm, rv, counter(True), r,
            per_channel(0.5, True) if rbn else None, per_channel(-0.5, True) if rbn else None,
            rrm, rrv, counter(rbn), rbn, training, 0.1, 1e-5, True, backend)


OPCHECK_CASES = [
    ("none", True, True), ("add", True, True), ("bn", True, True), ("none", False, True),
    ("add", False, True), ("bn", False, True), ("add", True, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,training,track", OPCHECK_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck_bn_act(backend, mode, training, track, memory_format):
    args = _bn_act_args(mode, training, track, backend, memory_format=memory_format)
    torch.library.opcheck(ops.bn_act, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,training,track", OPCHECK_CASES[:6])
def test_opcheck_bn_act_backward(backend, mode, training, track):
    args = _bn_act_args(mode, training, track, backend, requires_grad=False)
    out, save_stats = ops.bn_act(*args)
    x, w, b, _rm, _rv, _count, r, rw, rb = args[:9]
    grad = torch.randn_like(out)
    torch.library.opcheck(
        ops.bn_act_backward, (grad, x, w, b, r, rw, rb, save_stats, mode == "bn", training, True,
                              backend))


def _gradcheck_inputs(op, training, track):
    torch.manual_seed(0)
    C = 3
    kw = dict(dtype=torch.float64, device=DEVICE)
    x = (torch.randn(2, C, 3, 2, **kw) + 0.3).requires_grad_()
    args = [x]
    if op != "batch_norm_relu":
        args.append(torch.randn(2, C, 3, 2, **kw).requires_grad_())

    def bn():
        rm = torch.randn(C, **kw) * 0.1 if track else None
        rv = torch.rand(C, **kw) + 0.5 if track else None
        return [rm, rv, (torch.rand(C, **kw) + 0.5).requires_grad_(),
                torch.randn(C, **kw).requires_grad_()]

    args += bn()
    if op == "dual_batch_norm_add_relu":
        args += bn()
    return args + [training]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["batch_norm_relu", "batch_norm_add_relu",
                                "dual_batch_norm_add_relu"])
@pytest.mark.parametrize("training,track", [(True, True), (False, True), (False, False)])
def test_gradcheck_float64(backend, op, training, track):
    args = _gradcheck_inputs(op, training, track)
    fn = getattr(functional, op)

    def f(*tensors):
        # Running statistics are buffers: gradcheck must not see them change between calls.
        it = iter(tensors)
        call = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else
                (a.clone() if isinstance(a, torch.Tensor) else a) for a in args]
        return fn(*call, backend=backend)

    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """A block end written with the fused ops compiles with no graph break and matches eager."""
    torch.manual_seed(0)

    def block_end(x, r, s, bn1, bn2, bn3):
        y = functional.batch_norm_relu(x, *bn1, training=True, backend=backend)
        z = functional.dual_batch_norm_add_relu(y, s, *bn2, *bn3, training=True, backend=backend)
        return functional.batch_norm_add_relu(z, r, *bn1, training=False, backend=backend)

    def bn_state():
        return [torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE),
                (torch.rand(6, device=DEVICE) + 0.5).requires_grad_(),
                torch.randn(6, device=DEVICE).requires_grad_()]

    x, r, s = (torch.randn(2, 6, 4, 4, device=DEVICE, requires_grad=True) for _ in range(3))
    states = [bn_state() for _ in range(3)]
    eager_states = [[t.detach().clone().requires_grad_(t.requires_grad) for t in st]
                    for st in states]
    compiled = torch.compile(block_end, fullgraph=True)
    out = compiled(x, r, s, *states)
    out.sum().backward()
    grads = [x.grad, r.grad, s.grad] + [t.grad for st in states for t in st[2:]]
    for t in (x, r, s):
        t.grad = None
    expected = block_end(x, r, s, *eager_states)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    expected_grads = [x.grad, r.grad, s.grad] + [t.grad for st in eager_states for t in st[2:]]
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    for st, est in zip(states, eager_states):
        torch.testing.assert_close(st[0], est[0])
        torch.testing.assert_close(st[1], est[1])


def _conv_bn_act_args(backend, mode, requires_grad=True, dtype=torch.float32,
                      memory_format=torch.channels_last):
    """Arguments of resnet_fast::conv_bn_act; ``mode`` names the path: 'train', 'eval',
    'eval_inference' (no autograd: the one-pass path), 'defer', 'prologue' (input normalised
    on load), 'residual' (training, + conv bias + residual, no ReLU), 'recompute' (training,
    input normalised on load, + conv bias + residual + ReLU, the conv output recomputed in
    backward)."""
    torch.manual_seed(0)
    Cin, Cout = 4, 6
    acc = ops.acc_dtype_of(dtype)
    grad = requires_grad and mode != "eval_inference"
    x = torch.randn(2, Cin, 5, 5, dtype=dtype, device=DEVICE).contiguous(
        memory_format=memory_format).requires_grad_(grad)
    w = (torch.randn(Cout, Cin, 3, 3, dtype=dtype, device=DEVICE) / 6).requires_grad_(grad)

    def per_channel(C, offset, needs_grad):
        return (torch.rand(C, dtype=acc, device=DEVICE) + offset).requires_grad_(
            needs_grad and grad)

    prologue = [None, None, None]
    if mode in ("prologue", "recompute"):
        prologue = [per_channel(Cin, 0.5, True), per_channel(Cin, -0.5, True),
                    torch.stack([torch.randn(Cin, dtype=acc, device=DEVICE) * 0.1,
                                 torch.rand(Cin, dtype=acc, device=DEVICE) + 0.5])]
    residual = mode in ("residual", "recompute")
    conv_bias = (torch.randn(Cout, dtype=dtype, device=DEVICE).requires_grad_(grad)
                 if residual else None)
    r = (torch.randn(2, Cout, 3, 3, dtype=dtype, device=DEVICE).contiguous(
        memory_format=memory_format).requires_grad_(grad) if residual else None)
    training = mode not in ("eval", "eval_inference")
    return (x, w, conv_bias, [2, 2], [1, 1], [1, 1], 1, *prologue, True, True,
            per_channel(Cout, 0.5, True), per_channel(Cout, -0.5, True),
            per_channel(Cout, -0.5, False), per_channel(Cout, 0.5, False),
            torch.tensor(3, device=DEVICE), r,
            training, 0.1, 1e-5, mode != "residual", mode == "defer",
            mode != "eval_inference", mode == "recompute", backend)


CONV_MODES = ["train", "eval", "eval_inference", "defer", "prologue", "residual", "recompute"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", CONV_MODES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck_conv_bn_act(backend, mode, memory_format):
    torch.library.opcheck(ops.conv_bn_act, _conv_bn_act_args(backend, mode,
                                                              memory_format=memory_format))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval", "defer", "prologue", "residual", "recompute"])
def test_opcheck_conv_bn_act_backward(backend, mode):
    args = _conv_bn_act_args(backend, mode, requires_grad=False)
    out, raw, save_stats = ops.conv_bn_act(*args)
    (x, w, cb, stride, padding, dilation, groups, iw, ib, ist, ibs, irelu, bw, bb, _rm, _rv,
     _count, r, batch_stats, _m, _eps, relu, defer, _save_raw, recompute, _backend) = args
    assert (raw.numel() == 0) == (defer or recompute)
    torch.library.opcheck(ops.conv_bn_act_backward, (
        torch.randn_like(out), x, w, cb, stride, padding, dilation, groups, iw, ib,
        ist, ibs, irelu, bw, bb, r, raw, save_stats, batch_stats, relu, defer, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training,track", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("deferred_input,recompute", [(False, False), (True, False),
                                                      (True, True)])
def test_gradcheck_conv_bn_relu_float64(backend, training, track, deferred_input, recompute):
    """float64 gradcheck of conv_bn_relu (conv bias, residual, stride 2, groups 2) for input,
    conv weight and bias, BatchNorm weight and bias and residual; with ``deferred_input`` the
    input is a DeferredBatchNorm (normalised on load), checked through its producer; with
    ``recompute`` the conv output is recomputed in backward."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=DEVICE)
    x = (torch.randn(2, 4, 5, 5, **kw) + 0.2).requires_grad_()
    w = (torch.randn(6, 2, 3, 3, **kw) / 3).requires_grad_()
    cb = torch.randn(6, **kw).requires_grad_()
    bw, bb = (torch.rand(6, **kw) + 0.5).requires_grad_(), torch.randn(6, **kw).requires_grad_()
    r = torch.randn(2, 6, 3, 3, **kw).requires_grad_()
    w0 = (torch.randn(4, 4, 1, 1, **kw) / 2).requires_grad_()
    g0, b0 = (torch.rand(4, **kw) + 0.5).requires_grad_(), torch.randn(4, **kw).requires_grad_()
    stats = (torch.randn(6, **kw) * 0.1, torch.rand(6, **kw) + 0.5) if track else (None, None)

    def f(x, w, cb, bw, bb, r, w0, g0, b0):
        a = x
        if deferred_input:
            a = functional.conv_bn_relu(x, w0, None, None, g0, b0, True, defer=True,
                                        backend=backend)
        rm, rv = (None, None) if stats[0] is None else (stats[0].clone(), stats[1].clone())
        return functional.conv_bn_relu(a, w, rm, rv, bw, bb, training, conv_bias=cb, stride=2,
                                       padding=1, groups=2, residual=r, recompute=recompute,
                                       backend=backend)

    # Triton's interpreter runs each call in Python: the fast (random projection) mode there.
    assert torch.autograd.gradcheck(f, (x, w, cb, bw, bb, r, w0, g0, b0), eps=1e-6, atol=1e-5,
                                    fast_mode=INTERPRETED and backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_conv_chain_fullgraph(backend):
    """conv -> deferred BN + ReLU -> conv -> BN + residual + ReLU (its conv output recomputed
    in backward) compiles with no graph break and matches eager: output, gradients, running
    statistics and batch counters."""
    torch.manual_seed(0)

    def chain(x, w1, w2, bn1, bn2):
        a = functional.conv_bn_relu(x, w1, *bn1[:4], True, padding=1, defer=True,
                                    num_batches_tracked=bn1[4], backend=backend)
        return functional.conv_bn_relu(a, w2, *bn2[:4], True, padding=1, residual=x,
                                       num_batches_tracked=bn2[4], recompute=True,
                                       backend=backend)

    def state():
        return [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE),
                (torch.rand(4, device=DEVICE) + 0.5).requires_grad_(),
                torch.randn(4, device=DEVICE).requires_grad_(),
                torch.tensor(5, device=DEVICE)]

    x = torch.randn(2, 4, 5, 5, device=DEVICE).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w1, w2 = ((torch.randn(4, 4, 3, 3, device=DEVICE) / 6).requires_grad_() for _ in range(2))
    states = [state(), state()]
    eager_states = [[t.detach().clone().requires_grad_(t.requires_grad) for t in st]
                    for st in states]
    out = torch.compile(chain, fullgraph=True)(x, w1, w2, *states)
    grads = torch.autograd.grad(out.sum(), [x, w1, w2] + [t for st in states for t in st[2:4]])
    expected = chain(x, w1, w2, *eager_states)
    expected_grads = torch.autograd.grad(expected.sum(), [x, w1, w2] + [
        t for st in eager_states for t in st[2:4]])
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    for st, est in zip(states, eager_states):
        torch.testing.assert_close(st[0], est[0])
        torch.testing.assert_close(st[1], est[1])
        assert st[4].item() == est[4].item() == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_ops_update_running_statistics_in_place(backend, training):
    """The forward ops update the running statistics and batch counters they are given, in
    place and with their version counters moved, as nn.BatchNorm2d does, in training; in eval
    they leave them untouched."""
    args = list(_bn_act_args("bn", training, True, backend, requires_grad=False))
    conv_args = list(_conv_bn_act_args(backend, "train" if training else "eval",
                                       requires_grad=False))
    cases = [(ops.bn_act, args, [(3, 4, 5, args[0]), (9, 10, 11, args[6])]),
             (ops.conv_bn_act, conv_args, [(14, 15, 16, None)])]
    for op, op_args, branches in cases:
        before = [(op_args[m].clone(), op_args[v].clone(), op_args[n].item(),
                   [op_args[i]._version for i in (m, v, n)]) for m, v, n, _ in branches]
        outputs = op(*op_args)
        for (m, v, n, source), (mean0, var0, count0, versions0) in zip(branches, before):
            stats = [op_args[i] for i in (m, v, n)]
            if not training:
                torch.testing.assert_close(stats[0], mean0, rtol=0, atol=0)
                torch.testing.assert_close(stats[1], var0, rtol=0, atol=0)
                assert stats[2].item() == count0
                assert [t._version for t in stats] == versions0
                continue
            if source is None:  # the conv output: recomputed from the op's raw output
                source = outputs[1]
            expected_mean, expected_var = mean0.clone(), var0.clone()
            torch.nn.functional.batch_norm(source.double().to(mean0.dtype), expected_mean,
                                           expected_var, training=True, momentum=0.1)
            torch.testing.assert_close(stats[0], expected_mean)
            torch.testing.assert_close(stats[1], expected_var)
            assert stats[2].item() == count0 + 1
            assert all(t._version > v0 for t, v0 in zip(stats, versions0))
