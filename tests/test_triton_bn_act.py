"""The Triton kernels of resnet_fast::bn_act (resnet_fast/triton/bn_act.py).

1. ``forward`` / ``backward`` under the tolerance policy (resnet_fast/verify.py) on tiny shapes
   with odd sizes, both layouts, every residual mode, ReLU on and off, training and eval: the
   output, the gradients and the updated running statistics against F.batch_norm (+ add +
   relu) in float64 on the same rounded inputs, gradients from torch.autograd.grad, with eager
   PyTorch's error in the same dtype (activations in it, per-channel tensors in its
   accumulation dtype, as verify.run_case runs eager); the saved statistics (mean, invstd:
   ``stats_*``) against theirs computed by eager in the accumulation dtype (verify.batch_stats,
   in eval the running statistics), judged as the running statistics are; a case past its
   bounds is judged on the mean over more draws, as verify does. They run on ``triton_device``
   (tests/conftest.py): CUDA tensors where a GPU is present, else CPU tensors under Triton's
   interpreter.
2. Numerics: a channel with mean 1e4 and std 1 keeps its variance in float32; a constant
   channel gives variance 0 and a finite output.
3. Ahead-of-time compilation for sm_80 and sm_90 of every kernel, at the configurations
   ``pick_config`` gives ResNet-50's BatchNorm shapes at batch 256: no spills, at most 255
   registers, shared memory within the device. No GPU needed.
"""

import dataclasses
import functools
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is not installed")

from resnet_fast import verify  # noqa: E402
from resnet_fast._conventions import acc_dtype_of  # noqa: E402
from resnet_fast.triton import bn_act  # noqa: E402  (after the Triton check)
from _triton_aot import _compile_spec, _resource_usage  # noqa: E402  (tests/_triton_aot.py)

EPS = 1e-5
MOMENTUM = 0.1
RESIDUAL_MODES = ("none", "add", "bn")
# The BatchNorm branches by residual mode: the prefix of a branch's per-channel tensors and
# quantities (verify's names: "residual_running_mean", ...) and its input.
BRANCHES = {
    "none": [("", "x")],
    "add": [("", "x")],
    "bn": [("", "x"), ("residual_", "residual")],
}
# The inputs with a gradient by residual mode, and the names of their gradients (verify's).
INPUTS = {
    "none": ("x", "weight", "bias"),
    "add": ("x", "weight", "bias", "residual"),
    "bn": ("x", "weight", "bias", "residual", "residual_weight", "residual_bias"),
}
GRAD_NAMES = {"x": "grad_input", "residual": "grad_residual", "weight": "grad_weight",
              "bias": "grad_bias", "residual_weight": "grad_residual_weight",
              "residual_bias": "grad_residual_bias"}


def make_case(device, shape, dtype, channels_last, residual, seed=0):
    """Activation, residual, grad_out (dtype) and per-channel tensors (acc dtype), on device."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    acc = acc_dtype_of(dtype)

    def act(scale, shift):
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        t = t.to(device)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    def per_channel(lo, hi):
        return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(acc).to(device)

    case = {
        "x": act(2.0, 0.5),
        "residual": act(1.0, 0.0) if residual != "none" else None,
        "grad_out": act(1.0, 0.0),
        "weight": per_channel(0.5, 1.5), "bias": per_channel(-0.5, 0.5),
        "running_mean": per_channel(-1.0, 1.0), "running_var": per_channel(0.5, 2.0),
        "residual_weight": per_channel(0.5, 1.5), "residual_bias": per_channel(-0.5, 0.5),
        "residual_running_mean": per_channel(-1.0, 1.0),
        "residual_running_var": per_channel(0.5, 2.0),
    }
    return case


def eager(case, residual, training, relu, dtype):
    """The quantities of eager PyTorch in ``dtype`` by name: activations in ``dtype``,
    per-channel tensors in its accumulation dtype (with float64, the float64 reference), as
    verify.run_case runs it: the output, the per-channel statistics the kernels normalise with
    (verify.batch_stats of the input, in eval the running statistics; invstd = rsqrt(var + eps)),
    the updated running statistics (training) and the gradients."""
    acc = acc_dtype_of(dtype)
    leaves = {k: case[k].detach().to(dtype if k in ("x", "residual") else acc).requires_grad_()
              for k in INPUTS[residual]}
    quantities, y = {}, None
    for prefix, inp in BRANCHES[residual]:
        run_mean = case[prefix + "running_mean"].to(acc).clone()
        run_var = case[prefix + "running_var"].to(acc).clone()
        mean, var = verify.batch_stats(case[inp], acc) if training else (run_mean, run_var)
        quantities[prefix + "stats_mean"] = mean
        quantities[prefix + "stats_invstd"] = (var + EPS).rsqrt()
        t = F.batch_norm(leaves[inp], run_mean, run_var, leaves[prefix + "weight"],
                         leaves[prefix + "bias"], training, MOMENTUM, EPS)
        y = t if y is None else y + t
        if training:
            quantities[prefix + "running_mean"] = run_mean
            quantities[prefix + "running_var"] = run_var
    if residual == "add":
        y = y + leaves["residual"]
    if relu:
        y = F.relu(y)
    go = case["grad_out"].to(dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), go)
    quantities["output"] = y.detach()
    quantities.update({GRAD_NAMES[k]: g for k, g in zip(leaves, grads)})
    return quantities


def run_triton(case, residual, training, relu):
    bn = residual == "bn"
    r = case["residual"]
    out, save_stats, new_running = bn_act.forward(
        case["x"], case["weight"], case["bias"], case["running_mean"], case["running_var"], r,
        case["residual_weight"], case["residual_bias"], case["residual_running_mean"],
        case["residual_running_var"], bn, training, MOMENTUM, EPS, relu)
    grads = bn_act.backward(case["grad_out"], case["x"], case["weight"], case["bias"], r,
                            case["residual_weight"], case["residual_bias"], save_stats, bn,
                            training, relu)
    names = ("x", "weight", "bias", "residual", "residual_weight", "residual_bias")
    return out, save_stats, new_running, dict(zip(names, grads))


def fused_quantities(case, residual, training, relu):
    """The kernels' quantities by eager's names, after checking what the policy does not: the
    shapes and dtypes of the packed statistics, the activation gradients' strides, the empty
    gradients of a residual mode's absent inputs, and that no two results share storage."""
    out, save_stats, new_running, grads = run_triton(case, residual, training, relu)
    branches, C = len(BRANCHES[residual]), case["x"].shape[1]
    acc = acc_dtype_of(case["x"].dtype)
    assert out.stride() == case["x"].stride()
    assert save_stats.shape == (branches, 2, C) and save_stats.dtype == acc
    if training:
        assert new_running.shape == (branches, 2, C) and new_running.dtype == acc
    else:
        assert new_running.numel() == 0 and new_running.dtype == acc
    returned = [out, save_stats, new_running, *grads.values()]
    assert len({id(t) for t in returned}) == len(returned)
    storages = [t.untyped_storage().data_ptr() for t in returned if t.numel()]
    assert len(set(storages)) == len(storages)
    for name, g in grads.items():
        if name not in INPUTS[residual]:
            assert g.numel() == 0 and g.dtype == acc, name
        elif name in ("x", "residual"):
            assert g.stride() == case["x"].stride(), name
    fused = {"output": out, **{GRAD_NAMES[k]: grads[k] for k in INPUTS[residual]}}
    for b, (prefix, _) in enumerate(BRANCHES[residual]):
        fused[prefix + "stats_mean"], fused[prefix + "stats_invstd"] = save_stats[b]
        if training:
            fused[prefix + "running_mean"], fused[prefix + "running_var"] = new_running[b]
    return fused


def check_against_reference(device, within_policy, shape, dtype, channels_last, residual,
                            training, relu):
    def runs(seed):
        case = make_case(device, shape, dtype, channels_last, residual, seed)
        ref = eager(case, residual, training, relu, torch.float64)
        fused = fused_quantities(case, residual, training, relu)
        assert fused.keys() == ref.keys()
        return ref, eager(case, residual, training, relu, dtype), fused

    within_policy(runs, dtype)


@pytest.fixture
def check(triton_device, within_policy):
    """check(shape, dtype, channels_last, residual, training, relu): check_against_reference
    on ``triton_device``."""
    return functools.partial(check_against_reference, triton_device, within_policy)


LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


@LAYOUTS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("residual", RESIDUAL_MODES)
def test_float32_modes(check, channels_last, training, relu, residual):
    # M = 24 and HW = 12: neither a multiple of the interpreter's 16-wide tiles.
    check((2, 7, 4, 3), torch.float32, channels_last, residual, training, relu)


@LAYOUTS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", RESIDUAL_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_dtypes(check, channels_last, training, residual, dtype):
    check((2, 5, 3, 7), dtype, channels_last, residual, training, True)


@LAYOUTS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16(check, channels_last, training):
    check((2, 5, 3, 7), torch.float16, channels_last, "bn", training, True)


@LAYOUTS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 5), (3, 5, 1, 1), (2, 3, 5, 7), (1, 1, 6, 6),
                                   (4, 33, 3, 3)], ids=str)
def test_odd_shapes(check, channels_last, training, shape):
    check(shape, torch.float32, channels_last, "bn", training, True)


@LAYOUTS
def test_32_wide_interpreter_blocks(monkeypatch, triton_device, check, channels_last):
    # C = 33 against 32-wide channel blocks leaves a last block of one channel (test_odd_shapes
    # runs it with the default 16-wide ones).
    if triton_device.type != "cpu":
        pytest.skip("block sizes are the GPU's own outside the interpreter")
    monkeypatch.setattr(bn_act, "INTERPRETER_BLOCK", 32)
    check((4, 33, 3, 3), torch.float32, channels_last, "bn", True, True)


@LAYOUTS
def test_large_mean_and_constant_channel(triton_device, channels_last):
    """Variance of a channel with mean 1e4 and std 1 to < 1e-3 relative error in float32, and
    a constant channel: variance 0, invstd 1/sqrt(eps), finite output and gradients."""
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 8, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, 0] += 1e4
    x[:, 1] = 3.0
    x32 = x.float().to(triton_device)
    if channels_last:
        x32 = x32.contiguous(memory_format=torch.channels_last)
    ones = torch.ones(2, device=triton_device)
    zeros = torch.zeros(2, device=triton_device)
    out, save_stats, new_running = bn_act.forward(
        x32, ones, zeros, zeros.clone(), ones.clone(), None, None, None, None, None, False,
        True, MOMENTUM, EPS, True)
    exact = x32.double().cpu()
    var_exact = exact.var((0, 2, 3), unbiased=False)
    invstd = save_stats[0, 1].double().cpu()
    var = 1.0 / invstd**2 - EPS
    assert abs(var[0] / var_exact[0] - 1) < 1e-3, (var[0].item(), var_exact[0].item())
    assert abs(save_stats[0, 0, 0].double().cpu() - exact[:, 0].mean()) < 1e-2
    m = exact[:, 0].numel()
    running_var = new_running[0, 1].double().cpu()
    expected = (1 - MOMENTUM) + MOMENTUM * var_exact[0] * m / (m - 1)
    assert abs(running_var[0] / expected - 1) < 1e-3
    assert invstd[1].item() == pytest.approx(EPS**-0.5, rel=1e-5)
    assert torch.isfinite(out).all()
    grads = bn_act.backward(torch.ones_like(x32), x32, ones, zeros, None, None, None, save_stats,
                            False, True, True)
    assert all(torch.isfinite(t).all() for t in grads)


# --------------------------------------------------------------------------- ahead of time

# ResNet-50's BatchNorm inputs at batch 256: (C, H = W) of the stem, every bn1/bn2/bn3 and the
# downsample branches.
RESNET50_BN = [(64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (512, 28), (256, 28),
               (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]
# Compiling takes about 0.7 s per kernel and arch: by default the three shapes that span the
# tilings (wide planes, the widest 16-divisible layer, 7x7 planes) and the training launches
# (each kernel once, in its variant with the most live values); RESNET_FAST_AOT_ALL=1 compiles
# every shape above, eval launches included (about 4 minutes on 2 cores).
AOT_ALL = os.environ.get("RESNET_FAST_AOT_ALL") == "1"
AOT_SHAPES = RESNET50_BN if AOT_ALL else [(64, 112), (256, 56), (2048, 7)]
AOT_TRAINING = (True, False) if AOT_ALL else (True,)
ARCHS = (80, 90)
ARCH_SHARED_LIMIT = {80: 164 * 1024, 90: 228 * 1024}


def _launches(shape, channels_last, dtype):
    """(kernel, num_warps, arguments, constexprs) of each launch forward + backward make on
    meta tensors, recorded instead of run: with a BatchNorm'ed residual and ReLU (the variants
    with the most live values), in training (and eval) as AOT_TRAINING says."""
    calls = []
    bn_act._launch = lambda kernel, grid, num_warps, *args, **constexprs: calls.append(
        (kernel, num_warps, args, constexprs))
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    acc = acc_dtype_of(dtype)
    pc = [torch.empty(shape[1], dtype=acc, device="meta") for _ in range(8)]
    for training in AOT_TRAINING:
        _, save_stats, _ = bn_act.forward(x, pc[0], pc[1], pc[2], pc[3], torch.empty_like(x),
                                          pc[4], pc[5], pc[6], pc[7], True, training, MOMENTUM,
                                          EPS, True)
        bn_act.backward(torch.empty_like(x), x, pc[0], pc[1], torch.empty_like(x), pc[4], pc[5],
                        save_stats, True, training, True)
    return calls


def aot_report(arch):
    """Resource usage of every distinct kernel specialisation launched at AOT_SHAPES
    (both layouts, bf16 and fp32), compiled for sm_<arch>. Needs real JITFunctions, so it runs
    in a process without TRITON_INTERPRET (the aot_reports fixture, tests/conftest.py)."""
    from triton.backends.compiler import GPUTarget

    specs = {}
    for c, hw in AOT_SHAPES:
        for channels_last in (False, True):
            for dtype in (torch.bfloat16, torch.float32):
                for kernel, num_warps, args, constexprs in _launches((256, c, hw, hw),
                                                                     channels_last, dtype):
                    signature, consts, attrs = _compile_spec(kernel, args, constexprs)
                    key = repr((kernel.__name__, num_warps, signature, consts, attrs))
                    specs.setdefault(key, (kernel, num_warps, signature, consts, attrs))
    report = []
    for kernel, num_warps, signature, consts, attrs in specs.values():
        compiled = triton.compile(
            triton.compiler.ASTSource(kernel, signature, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        usage = _resource_usage(compiled.asm["cubin"])
        usage["shared_metadata"] = compiled.metadata.shared
        report.append({"kernel": kernel.__name__, "num_warps": num_warps,
                       "x": signature["x_ptr"], "constexprs": consts, **usage})
    return report


@pytest.mark.parametrize("arch", ARCHS)
def test_aot_compile_resnet50_configs(aot_reports, arch):
    failures = []
    for r in aot_reports[arch]:
        shared = max(r["SHARED"], r["shared_metadata"])
        print(f"sm_{arch} {r['kernel']} x={r['x']} num_warps={r['num_warps']} "
              f"{r['constexprs']}: REG {r['REG']} LOCAL {r['LOCAL']} STACK {r['STACK']} "
              f"shared {shared}")
        if r["LOCAL"] or r["STACK"] or r["REG"] > 255 or shared > ARCH_SHARED_LIMIT[arch]:
            failures.append(repr(r))
    assert not failures, "\n".join(failures)


def test_pick_config_fills_an_h100():
    """At ResNet-50's shapes a pass has enough programs for 132 SMs, and NCHW planes of
    16-divisible size (and channels_last rows) are tiled along whole 16-byte vectors."""
    for c, hw in RESNET50_BN:
        for channels_last in (False, True):
            for dtype in (torch.bfloat16, torch.float32):
                cfg = bn_act.pick_config(256, c, hw, hw, channels_last, dtype)
                programs = cfg.row_programs * cfg.channel_blocks
                assert programs >= 2 * 132, (c, hw, channels_last, dtype, cfg)
                contiguous = cfg.block_c if channels_last else cfg.block_r
                vector = 16 // torch.empty((), dtype=dtype).element_size()
                if channels_last or hw * hw % 16 == 0:
                    assert contiguous % vector == 0, (c, hw, channels_last, dtype, cfg)
                assert dataclasses.asdict(cfg)["num_warps"] == 8


def test_pick_config_scales_with_the_device_multiprocessors():
    """The grid follows the device's SM count (an H200 or H100 has 132, an RTX 4090 128, an
    A100 108): fewer SMs, fewer programs, each with more rows."""
    for sms in (16, 108, 132):
        cfg = bn_act.pick_config(256, 64, 56, 56, True, torch.float32, multiprocessors=sms)
        programs = cfg.row_programs * cfg.channel_blocks
        assert 2 * sms <= programs <= 8 * sms, (sms, cfg)


if __name__ == "__main__":
    # aot_reports runs this file as a script, without TRITON_INTERPRET: print one JSON line.
    print(json.dumps(aot_report(int(sys.argv[1]))))
