"""torch.library registration: opcheck, float64 gradcheck and torch.compile for every op."""

import pytest
import torch

from resnet_fast import functional, ops

from _samples import CONV_MODES, args_of, batch_norm_state, bn_act_args, by_name, conv_bn_act_args

OPCHECK_CASES = [
    ("none", True, True), ("add", True, True), ("bn", True, True), ("none", False, True),
    ("add", False, True), ("bn", False, True), ("add", True, False),
]


@pytest.mark.parametrize("mode,batch_stats,track", OPCHECK_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck_bn_act(backend, device, mode, batch_stats, track, memory_format):
    args = bn_act_args(mode, batch_stats, track, backend=backend, device=device,
                       memory_format=memory_format)
    torch.library.opcheck(ops.bn_act, args)


@pytest.mark.parametrize("mode,batch_stats,track", OPCHECK_CASES[:6])
def test_opcheck_bn_act_backward(backend, device, mode, batch_stats, track):
    args = by_name(ops.bn_act, bn_act_args(mode, batch_stats, track, backend=backend,
                                           device=device, requires_grad=False))
    out, save_stats = ops.bn_act(**args)
    torch.library.opcheck(ops.bn_act_backward, args_of(
        ops.bn_act_backward, dict(args, grad_out=torch.randn_like(out), save_stats=save_stats)))


@pytest.mark.parametrize("mode", ["none", "add", "bn"])
@pytest.mark.parametrize("batch_stats,track", [(True, True), (False, True), (True, False)])
def test_gradcheck_float64(backend, device, interpreted, mode, batch_stats, track):
    """float64 gradcheck of resnet_fast::bn_act for every residual mode: batch statistics with
    and without running statistics, and eval with running statistics (the fast, random
    projection mode under Triton's interpreter, which runs each call in Python)."""
    args = by_name(ops.bn_act, bn_act_args(mode, batch_stats, track, backend=backend,
                                           device=device, shape=(2, 3, 3, 2),
                                           dtype=torch.float64))

    def f(*tensors):
        # Running statistics are buffers: gradcheck must not see them change between calls.
        it = iter(tensors)
        call = {n: next(it) if isinstance(a, torch.Tensor) and a.requires_grad else
                (a.clone() if isinstance(a, torch.Tensor) else a) for n, a in args.items()}
        return ops.bn_act(**call)[0]

    inputs = [a for a in args.values() if isinstance(a, torch.Tensor) and a.requires_grad]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=interpreted)


def test_compile_fullgraph(backend, device):
    """A block end written with the fused ops compiles with no graph break and matches eager."""
    torch.manual_seed(0)

    def block_end(x, r, s, bn1, bn2, bn3):
        y = functional.batch_norm_relu(x, *bn1[:4], training=True, backend=backend)
        z = functional.dual_batch_norm_add_relu(y, s, *bn2[:4], *bn3[:4], training=True,
                                                backend=backend)
        return functional.batch_norm_add_relu(z, r, *bn1[:4], training=False, backend=backend)

    x, r, s = (torch.randn(2, 6, 4, 4, device=device, requires_grad=True) for _ in range(3))
    states = [batch_norm_state(6, device=device) for _ in range(3)]
    eager_states = [[t.detach().clone().requires_grad_(t.requires_grad) for t in st]
                    for st in states]
    compiled = torch.compile(block_end, fullgraph=True)
    out = compiled(x, r, s, *states)
    out.sum().backward()
    grads = [x.grad, r.grad, s.grad] + [t.grad for st in states for t in st[2:4]]
    for t in (x, r, s):
        t.grad = None
    expected = block_end(x, r, s, *eager_states)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    expected_grads = [x.grad, r.grad, s.grad] + [t.grad for st in eager_states for t in st[2:4]]
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    for st, est in zip(states, eager_states):
        torch.testing.assert_close(st[0], est[0])
        torch.testing.assert_close(st[1], est[1])


@pytest.mark.parametrize("mode", CONV_MODES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck_conv_bn_act(backend, device, mode, memory_format):
    torch.library.opcheck(ops.conv_bn_act, conv_bn_act_args(
        mode, backend=backend, device=device, memory_format=memory_format))


@pytest.mark.parametrize("mode,input_grad",
                         [(m, True) for m in CONV_MODES if m != "eval_inference"]
                         + [("train", False), ("prologue", False)])
def test_opcheck_conv_bn_act_backward(backend, device, mode, input_grad):
    """``input_grad=False`` (a first conv, whose input is the data) leaves the input side's
    gradients empty."""
    args = by_name(ops.conv_bn_act, conv_bn_act_args(mode, backend=backend, device=device,
                                                     requires_grad=False))
    out, raw, save_stats = ops.conv_bn_act(**args)
    assert (raw.numel() == 0) == (args["defer"] or args["recompute"])
    backward_args = args_of(ops.conv_bn_act_backward, dict(
        args, grad_out=torch.randn_like(out), raw=raw, save_stats=save_stats,
        input_grad=input_grad))
    torch.library.opcheck(ops.conv_bn_act_backward, backward_args)
    grads = ops.conv_bn_act_backward(**by_name(ops.conv_bn_act_backward, backward_args))
    assert [g.numel() > 0 for g in grads[:5]] == [
        input_grad, True, args["conv_bias"] is not None,
        input_grad and args["in_stats"] is not None, input_grad and args["in_stats"] is not None]


@pytest.mark.parametrize("training,track", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("deferred_input,recompute", [(False, False), (True, False),
                                                      (True, True)])
def test_gradcheck_conv_bn_relu_float64(backend, device, interpreted, training, track,
                                        deferred_input, recompute):
    """float64 gradcheck of conv_bn_relu (conv bias, residual, stride 2, groups 2) for input,
    conv weight and bias, BatchNorm weight and bias and residual; with ``deferred_input`` the
    input is a DeferredBatchNorm (normalised on load), checked through its producer; with
    ``recompute`` the conv output is recomputed in backward."""
    if interpreted and deferred_input and not training:
        pytest.skip("interpreter (about 10 s a case): a deferred input in eval is checked on "
                    "the other backends")
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    x = (torch.randn(2, 4, 5, 5, **kw) + 0.2).requires_grad_()
    w = (torch.randn(6, 2, 3, 3, **kw) / 3).requires_grad_()
    cb = torch.randn(6, **kw).requires_grad_()
    bn = batch_norm_state(6, track=track, **kw)
    r = torch.randn(2, 6, 3, 3, **kw).requires_grad_()
    w0 = (torch.randn(4, 4, 1, 1, **kw) / 2).requires_grad_()
    in_bn = batch_norm_state(4, track=False, **kw)

    def f(x, w, cb, bw, bb, r, w0, g0, b0):
        a = x
        if deferred_input:
            a = functional.conv_bn_relu(x, w0, None, None, g0, b0, True, defer=True,
                                        backend=backend)
        rm, rv = (None, None) if not track else (bn.running_mean.clone(),
                                                 bn.running_var.clone())
        return functional.conv_bn_relu(a, w, rm, rv, bw, bb, training, conv_bias=cb, stride=2,
                                       padding=1, groups=2, residual=r, recompute=recompute,
                                       backend=backend)

    # The full Jacobian for the plain training case; the fast (random projection) mode for the
    # other configurations and under Triton's interpreter, which runs each call in Python
    # (full mode: 10-35 s per configuration on 2 cores).
    full = not interpreted and training and track and not deferred_input and not recompute
    assert torch.autograd.gradcheck(
        f, (x, w, cb, bn.weight, bn.bias, r, w0, in_bn.weight, in_bn.bias), eps=1e-6,
        atol=1e-5, fast_mode=not full)


def test_compile_conv_chain_fullgraph(backend, device):
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

    x = torch.randn(2, 4, 5, 5, device=device).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w1, w2 = ((torch.randn(4, 4, 3, 3, device=device) / 6).requires_grad_() for _ in range(2))
    states = [batch_norm_state(4, device=device, count=5) for _ in range(2)]
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


@pytest.mark.parametrize("training", [True, False])
def test_ops_update_running_statistics_in_place(backend, device, training):
    """The forward ops update the running statistics and batch counters they are given, in
    place and with their version counters moved, as nn.BatchNorm2d does, in training; in eval
    they leave them untouched."""
    bn_args = by_name(ops.bn_act, bn_act_args("bn", training, True, backend=backend,
                                              device=device, requires_grad=False))
    conv_args = by_name(ops.conv_bn_act, conv_bn_act_args(
        "train" if training else "eval", backend=backend, device=device, requires_grad=False))
    branch = ("running_mean", "running_var", "num_batches_tracked")
    cases = [(ops.bn_act, bn_args, [(branch, "input"),
                                    (tuple("residual_" + n for n in branch), "residual")]),
             (ops.conv_bn_act, conv_args, [(branch, None)])]
    for op, named, branches in cases:
        before = [([named[n].clone() for n in names[:2]], named[names[2]].item(),
                   [named[n]._version for n in names]) for names, _ in branches]
        outputs = op(**named)
        for (names, source), ((mean0, var0), count0, versions0) in zip(branches, before):
            stats = [named[n] for n in names]
            if not training:
                torch.testing.assert_close(stats[0], mean0, rtol=0, atol=0)
                torch.testing.assert_close(stats[1], var0, rtol=0, atol=0)
                assert stats[2].item() == count0
                assert [t._version for t in stats] == versions0
                continue
            # the conv output: recomputed from the op's raw output
            source = outputs[1] if source is None else named[source]
            expected_mean, expected_var = mean0.clone(), var0.clone()
            torch.nn.functional.batch_norm(source.double().to(mean0.dtype), expected_mean,
                                           expected_var, training=True, momentum=0.1)
            torch.testing.assert_close(stats[0], expected_mean)
            torch.testing.assert_close(stats[1], expected_var)
            assert stats[2].item() == count0 + 1
            assert all(t._version > v0 for t, v0 in zip(stats, versions0))


@pytest.mark.parametrize("name,source", [
    ("bn_act", "csrc/op_kernels.cpp"),
    ("bn_act_backward", "csrc/op_kernels.cpp"),
    ("conv_bn_act", "csrc/op_kernels.cpp"),
    ("conv_bn_act_backward", "csrc/conv_bn_act_backward.cpp"),
])
def test_kernels_are_registered_where_documented(name, source):
    """The CPU and CUDA kernels of every op are C++ (in a build without the CUDA kernels too),
    so a call with the device's own backend does not enter Python below the op; none is
    registered from Python."""
    lines = dict(line.split(": ", 1) for line in
                 torch._C._dispatch_dump(f"resnet_fast::{name}").splitlines() if ": " in line)
    assert source in lines["CPU"], lines["CPU"]
    assert source in lines["CUDA"], lines["CUDA"]


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_kernel_errors_keep_their_type(backend_name):
    """An error raised below the op, in the C++ kernel or in the Python kernel it hands a call
    to, reaches the caller as the Python exception it is."""
    args = by_name(ops.conv_bn_act, conv_bn_act_args("train", backend=backend_name,
                                                     device=torch.device("cpu")))
    args.update(defer=True, batch_stats=False)
    with pytest.raises(ValueError, match="defer=True needs batch statistics"):
        ops.conv_bn_act(**args)
