"""The Triton implicit-GEMM conv with fused prologue/epilogues (resnet_fast/triton/conv_bn_act.py).

1. ``conv2d_bn_act`` under the tolerance policy (resnet_fast/verify.py) against a float64
   eager reference (the prologue applied in float64, then F.conv2d, then the epilogue) on the
   same rounded inputs, on tiny shapes: 1x1, 3x3 and 7x7 kernels, stride 1 and 2,
   padding 0/1/3, dilation 2, groups 1 and 4 (2 to 4 channels a group), channel counts that are
   not multiples of the blocks (3 -> 24, 20 -> 36), batch 1, every prologue and epilogue option,
   the statistics, float32, bfloat16, float16 and float64, NCHW, channels_last and sliced
   inputs. Eager PyTorch in the same dtype is the same chain of ops on the activations in that
   dtype and the per-channel tensors in its accumulation dtype (the prologue rounded to the
   dtype, the conv in the dtype, the epilogue on its rounded output); the statistics
   (``stats_mean``, ``stats_var``) are judged against theirs computed by eager in the
   accumulation dtype from that conv output (verify.batch_stats), as verify judges the running
   statistics; a case past its bounds is judged on the mean over more draws, as verify does.
   float32 compares with TF32 off (the CPU never uses it; on a GPU both sides would). They run
   on ``triton_device`` (tests/conftest.py): CUDA tensors where a GPU is present, else CPU
   tensors under Triton's interpreter, which rounds a bfloat16 prologue's output toward zero:
   there the statistics after a bfloat16 prologue are not compared (see
   check_against_reference).
2. Statistics: mean and biased variance per channel against float64, and a channel with mean
   1e3 and a small spread keeps its variance in float32.
3. Bad arguments raise ValueError/TypeError naming the argument.
4. Ahead-of-time compilation for sm_80 and sm_90 of the kernel at every entry of CONV_CONFIGS,
   for float16, bfloat16 and float32 (and float64 where autotuning may pick the entry): no
   spills, at most 255 registers, shared memory within the device. No GPU needed.
"""

import functools
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is not installed")

from resnet_fast import verify  # noqa: E402
from resnet_fast._conventions import acc_dtype_of, conv_output_shape  # noqa: E402
from resnet_fast.triton import conv_bn_act  # noqa: E402  (after the Triton check)
from resnet_fast.triton.conv_bn_act import conv2d_bn_act  # noqa: E402
from _triton_aot import (  # noqa: E402  (tests/_triton_aot.py)
    TYPE_NAMES, _compile_spec, _resource_usage)


@pytest.fixture(autouse=True)
def _ieee_float32(monkeypatch):
    """float32 convs in IEEE precision on both sides (see the module docstring)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# --------------------------------------------------------------------------- reference


def make_case(x_shape, cout, kernel, groups=1, stride=1, padding=0, dilation=1, *, device,
              dtype=torch.float32, layout="nchw", bias=True, prologue=False, in_relu=False,
              out_affine=False, residual=False, relu=False, stats=False, in_shift_offset=0.0,
              seed=0):
    """Tensors and arguments of one conv2d_bn_act call, on ``device``. ``layout``: "nchw",
    "channels_last" or "sliced" (a strided view of a larger tensor)."""
    g = torch.Generator().manual_seed(seed)
    N, cin, H, W = x_shape
    acc = acc_dtype_of(dtype)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    kh, kw = pair(kernel)

    def rand(*shape, scale=1.0, shift=0.0, to=dtype):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(to).to(device)

    def activation(shape):
        if layout == "sliced":  # every other row of a wider, channels_last tensor
            big = rand(shape[0], shape[1], 2 * shape[2], shape[3] + 1)
            t = big.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:]
            assert not t.is_contiguous() and not t.is_contiguous(
                memory_format=torch.channels_last)
            return t
        t = rand(*shape)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    fan_in = cin // groups * kh * kw
    _, _, ho, wo = conv_output_shape(x_shape, (cout, cin // groups, kh, kw), stride, padding,
                                     dilation)
    case = dict(
        x=activation(x_shape),
        weight=rand(cout, cin // groups, kh, kw, scale=fan_in ** -0.5),
        conv_bias=rand(cout, scale=0.5, to=acc) if bias else None,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        kwargs=dict(in_relu=in_relu, relu=relu, stats=stats),
    )
    kw_ = case["kwargs"]
    if prologue:
        kw_["in_scale"] = rand(cin, scale=0.3, shift=1.0, to=acc)
        kw_["in_shift"] = rand(cin, scale=0.5, shift=in_shift_offset, to=acc)
    if out_affine:
        kw_["out_scale"] = rand(cout, scale=0.3, shift=1.0, to=acc)
        kw_["out_shift"] = rand(cout, scale=0.5, to=acc)
    if residual:
        kw_["residual"] = activation((N, cout, ho, wo))
    return case


def eager(case, dtype):
    """The quantities of eager PyTorch in ``dtype`` by name (with float64, the reference): y, the
    prologue in the accumulation dtype rounded to ``dtype``, F.conv2d in ``dtype`` (bias
    included), the epilogue in the accumulation dtype on its output, y rounded to ``dtype``;
    with stats=True the per-channel mean and biased variance of the conv output, computed in
    the accumulation dtype (verify.batch_stats)."""
    acc_t = acc_dtype_of(dtype)
    kw = case["kwargs"]
    a = case["x"].to(acc_t)
    if "in_scale" in kw:
        a = a * kw["in_scale"].to(acc_t)[:, None, None] + kw["in_shift"].to(acc_t)[:, None, None]
        if kw["in_relu"]:
            a = a.relu()
    bias = case["conv_bias"]
    out = F.conv2d(a.to(dtype), case["weight"].to(dtype),
                   None if bias is None else bias.to(dtype), case["stride"], case["padding"],
                   case["dilation"], case["groups"])
    v = out.to(acc_t)
    if "out_scale" in kw:
        v = v * kw["out_scale"].to(acc_t)[:, None, None] + kw["out_shift"].to(acc_t)[:, None, None]
    if "residual" in kw:
        v = v + kw["residual"].to(acc_t)
    if kw["relu"]:
        v = v.relu()
    quantities = {"y": v.to(dtype)}
    if kw["stats"]:
        quantities["stats_mean"], quantities["stats_var"] = verify.batch_stats(out, acc_t)
    return quantities


def run_triton(case):
    return conv2d_bn_act(case["x"], case["weight"], case["conv_bias"], case["stride"],
                         case["padding"], case["dilation"], case["groups"], **case["kwargs"])


def check_against_reference(device, within_policy, *args, **kwargs):
    """Draws of ``make_case(*args, **kwargs)`` on ``device``, run by the kernel and checked
    against the policy (y is always channels_last; with stats, a (2, C) tensor of the
    accumulation dtype); returns the case of the first draw and its y."""
    first = make_case(*args, device=device, **kwargs)
    dtype = first["x"].dtype
    outputs = []

    # Triton's interpreter converts float32 to bfloat16 toward zero (a GPU and eager round to
    # nearest): the prologue's output, which the kernel rounds to bfloat16 for the dot, is then
    # biased toward zero, and so are the statistics summed from it, past eager's error. Those
    # statistics are compared on a GPU only (their code is the float32 one, which test_fusions
    # compares here).
    compared = ("y",) if (device.type == "cpu" and dtype == torch.bfloat16
                          and "in_scale" in first["kwargs"]) else ("y", "stats_mean", "stats_var")

    def runs(seed):
        case = make_case(*args, device=device, seed=seed, **kwargs) if seed else first
        y, stats = run_triton(case)
        outputs.append(y)
        ref, same_dtype = eager(case, torch.float64), eager(case, dtype)
        assert y.shape == ref["y"].shape and y.is_contiguous(memory_format=torch.channels_last)
        fused = {"y": y}
        if case["kwargs"]["stats"]:
            assert stats.shape == (2, y.shape[1]) and stats.dtype == acc_dtype_of(dtype)
            fused["stats_mean"], fused["stats_var"] = stats
        else:
            assert stats is None
        return tuple({k: v for k, v in run.items() if k in compared}
                     for run in (ref, same_dtype, fused))

    within_policy(runs, dtype)
    return first, outputs[0]


@pytest.fixture
def check(triton_device, within_policy):
    """check(*args, **kwargs): check_against_reference of make_case(*args, **kwargs) on
    ``triton_device``."""
    return functools.partial(check_against_reference, triton_device, within_policy)


# --------------------------------------------------------------------------- shapes

SHAPES = {
    # name: (x_shape, cout, kernel, groups, stride, padding, dilation)
    "1x1": ((2, 20, 3, 5), 36, 1, 1, 1, 0, 1),
    "1x1_stride2": ((2, 8, 5, 6), 24, 1, 1, 2, 0, 1),
    "3x3_3to24": ((2, 3, 5, 4), 24, 3, 1, 1, 1, 1),
    "3x3_stride2_20to36": ((1, 20, 6, 5), 36, 3, 1, 2, 1, 1),
    "7x7_stride2_pad3": ((1, 3, 9, 8), 16, 7, 1, 2, 3, 1),
    "3x3_dilation2": ((1, 5, 7, 6), 12, 3, 1, 1, 2, 2),
    "3x3_groups4_3to2": ((2, 12, 4, 5), 8, 3, 4, 1, 1, 1),
    "3x3_groups4_4to4_stride2": ((1, 16, 7, 7), 16, 3, 4, 2, 1, 1),
    "rect_kernel_no_pad": ((2, 6, 5, 7), 10, (1, 3), 1, (2, 1), 0, 1),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(check, name):
    check(*SHAPES[name])


# --------------------------------------------------------------------------- fusions

FUSIONS = {
    "prologue": dict(prologue=True),
    "prologue_relu": dict(prologue=True, in_relu=True),
    "out_affine": dict(out_affine=True),
    "residual": dict(residual=True),
    "relu": dict(relu=True),
    "everything": dict(prologue=True, in_relu=True, out_affine=True, residual=True, relu=True),
    "stats": dict(stats=True),
    "prologue_relu_stats": dict(prologue=True, in_relu=True, stats=True),
}


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fusions(check, fusion):
    # 3x3, padding 1, Cin = 5 and Cout = 20 against 16-wide blocks, M = 50 over 4 tiles.
    check((2, 5, 5, 5), 20, 3, padding=1, layout="channels_last", **FUSIONS[fusion])


@pytest.mark.parametrize("in_relu", [False, True], ids=["shift", "shift_relu"])
def test_padding_is_zero_after_the_prologue(check, in_relu):
    """in_shift of about 5: a padded tap must contribute 0, not the shift (a conv of the
    transformed input zero-padded afterwards, checked by the policy), and the border outputs of
    shifting the zero-padded input instead differ clearly."""
    case, y = check((1, 4, 4, 4), 16, 3, padding=1, prologue=True, in_relu=in_relu,
                    in_shift_offset=5.0, bias=False)
    kw = case["kwargs"]
    x_pad = F.pad(case["x"].double(), (1, 1, 1, 1))
    scale, shift = kw["in_scale"].double()[:, None, None], kw["in_shift"].double()[:, None, None]
    a_wrong = x_pad * scale + shift
    if in_relu:
        a_wrong = a_wrong.relu()
    wrong = F.conv2d(a_wrong, case["weight"].double())
    assert (y.double().cpu() - wrong.cpu()).abs().max() > 1.0


# --------------------------------------------------------------------------- dtypes, layouts

DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64],
                                 ids=["bf16", "fp16", "fp64"])


@DTYPES
@pytest.mark.parametrize("fusion", ["everything", "prologue_relu_stats"])
def test_dtypes(check, dtype, fusion):
    check((2, 6, 4, 5), 20, 3, stride=1, padding=1, dtype=dtype, **FUSIONS[fusion])


@DTYPES
def test_dtypes_grouped(check, dtype):
    check((1, 12, 5, 5), 8, 3, groups=4, stride=2, padding=1, dtype=dtype, prologue=True,
          in_relu=True, stats=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_layouts(check, layout):
    # The residual takes the same layout as the input (a sliced view: not dense in either); y
    # is channels_last whatever the input's layout (check_against_reference).
    check((2, 5, 4, 3), 18, 3, padding=1, layout=layout, prologue=True, residual=True,
          relu=True)


# --------------------------------------------------------------------------- statistics

def test_stats_large_mean_keeps_variance(triton_device):
    """Channel 0 has mean 1e3 (its conv bias) and a spread of about 0.1: in float32 a raw
    sum of squares would lose the variance (its rounding, 1e6 * 6e-8, exceeds the 0.013
    variance); the tile mean / M2 partials keep it to 1e-4 relative. Channel 1 is constant:
    variance exactly 0."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) * 0.02
    w[1] = 0.0
    bias = torch.tensor([1e3, -7.0], dtype=torch.float64)
    x32, w32, b32 = (t.float().to(triton_device) for t in (x, w, bias))
    _, stats = conv2d_bn_act(x32, w32, b32, (1, 1), (1, 1), (1, 1), 1, stats=True)
    exact = verify.batch_stats(F.conv2d(x32.double(), w32.double(), b32.double(), padding=1),
                               torch.float64).cpu()
    stats = stats.double().cpu()
    assert abs(stats[0, 0] / exact[0, 0] - 1) < 1e-6
    assert exact[1, 0] < 0.05 and abs(stats[1, 0] / exact[1, 0] - 1) < 1e-4, (stats, exact)
    assert stats[0, 1] == -7.0 and stats[1, 1] == 0.0


# --------------------------------------------------------------------------- arguments


def _bad_call(device, **over):
    x = torch.randn(2, 4, 5, 5, device=device)
    args = dict(x=x, weight=torch.randn(6, 2, 3, 3, device=device), conv_bias=None,
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in over.items()})
    positional = [args.pop(k) for k in ("x", "weight", "conv_bias", "stride", "padding",
                                        "dilation", "groups")]
    return conv2d_bn_act(*positional, **args)


# Tensors made on the CPU, moved to the device the test runs on by _bad_call.
BAD_ARGUMENTS = [
    (dict(x=torch.randn(2, 4, 5)), ValueError, r"x must be 4-D"),
    (dict(x=[1.0]), TypeError, r"x must be a Tensor"),
    (dict(x=torch.ones(2, 4, 5, 5, dtype=torch.int32)), TypeError,
     r"x must be float16, bfloat16, float32 or float64"),
    (dict(weight=torch.randn(6, 2, 3)), ValueError, r"weight must be 4-D"),
    (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), TypeError,
     r"weight must have x's dtype"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError,
     r"weight.shape\[1\] \* groups = 3 \* 2 must equal x's 4 input channels"),
    (dict(weight=torch.randn(5, 2, 3, 3)), ValueError,
     r"5 output channels are not divisible by groups=2"),
    (dict(groups=0), ValueError, r"groups must be a positive int"),
    (dict(stride=(1,)), ValueError, r"stride must be a sequence of 2 ints"),
    (dict(stride=(0, 1)), ValueError, r"stride must be positive"),
    (dict(padding=(1, -1)), ValueError, r"padding must be non-negative"),
    (dict(padding=(1.0, 1)), ValueError, r"padding must be a sequence of 2 ints"),
    (dict(dilation=(1, 2, 3)), ValueError, r"dilation must be a sequence of 2 ints"),
    (dict(dilation=(0, 1)), ValueError, r"dilation must be positive"),
    (dict(padding=(0, 0), dilation=(3, 3)), ValueError, r"smaller than the 3x3 kernel"),
    (dict(conv_bias=torch.zeros(5)), ValueError, r"conv_bias must have shape \(6,\)"),
    (dict(conv_bias=torch.zeros(6, dtype=torch.float64)), TypeError,
     r"conv_bias must be torch.float32"),
    (dict(in_scale=torch.ones(4)), ValueError, r"in_scale and in_shift must be given"),
    (dict(in_relu=True), ValueError, r"in_relu needs the prologue"),
    (dict(in_scale=torch.ones(6), in_shift=torch.zeros(6)), ValueError,
     r"in_scale must have shape \(4,\), got \(6,\)"),
    (dict(in_scale=torch.ones(4), in_shift=torch.zeros(4, dtype=torch.float16)),
     TypeError, r"in_shift must be torch.float32 \(the accumulation dtype\)"),
    (dict(out_shift=torch.zeros(6)), ValueError, r"out_scale and out_shift must be given"),
    (dict(out_scale=torch.ones(4), out_shift=torch.zeros(4)), ValueError,
     r"out_scale must have shape \(6,\)"),
    (dict(residual=torch.randn(2, 6, 5, 4)), ValueError,
     r"residual must have the output's shape \(2, 6, 5, 5\), got \(2, 6, 5, 4\)"),
    (dict(residual=torch.randn(2, 6, 5, 5, dtype=torch.float64)), TypeError,
     r"residual must have x's dtype"),
    (dict(stats=True, relu=True), ValueError, r"stats=True needs the bare conv output"),
    (dict(stats=True, residual=torch.randn(2, 6, 5, 5)), ValueError,
     r"stats=True needs the bare conv output"),
]


@pytest.mark.parametrize("over,error,pattern", BAD_ARGUMENTS,
                         ids=[p for _, _, p in BAD_ARGUMENTS])
def test_bad_arguments(device, over, error, pattern):
    with pytest.raises(error, match=pattern):
        _bad_call(device, **over)


# --------------------------------------------------------------------------- host-side logic


def test_input_precision_follows_cudnn_allow_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert conv_bn_act.input_precision(torch.float32) == "tf32"
    assert conv_bn_act.input_precision(torch.bfloat16) == "ieee"
    assert conv_bn_act.input_precision(torch.float64) == "ieee"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert conv_bn_act.input_precision(torch.float32) == "ieee"


def test_pruning_keeps_a_fitting_config():
    """Every (dtype, group width) keeps at least one config; float64 never gets more than
    64 x 64 accumulators + 64 x 32 operands' worth of tile; a 4-channel group gets 16-wide
    blocks."""
    configs = list(conv_bn_act.CONV_CONFIGS)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.empty(0, dtype=dtype)
        for cin_g, cout_g in ((3, 64), (4, 4), (64, 64), (512, 2048), (1, 1)):
            kept = conv_bn_act._prune_configs(configs, {"x_ptr": x, "CIN_G": cin_g,
                                                        "COUT_G": cout_g})
            assert kept, (dtype, cin_g, cout_g)
            for c in kept:
                if dtype == torch.float64:
                    kw = c.kwargs
                    assert kw["BLOCK_M"] * (kw["BLOCK_N"] + kw["BLOCK_K"]) <= 64 * (64 + 32)
                if cin_g == cout_g == 4:
                    assert c.kwargs["BLOCK_N"] == 16 and c.kwargs["BLOCK_K"] == 16
    for c in configs:  # tl.dot needs 16 at least; the interpreter's config too
        assert min(c.kwargs.values()) >= 16
    assert min(conv_bn_act.INTERPRETER_CONFIG.kwargs.values()) >= 16


@pytest.mark.parametrize("block_m", [7, 16, 128])
def test_merge_stats_of_tile_partials(block_m):
    """_merge_stats (Chan's formula over all tiles) gives the mean and biased variance of the
    whole column, whatever the tile height and a short last tile; entries past the last tile are
    never read."""
    g = torch.Generator().manual_seed(5)
    M, C = 100, 3
    v = torch.randn(M, C, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.01, 5.0])
    v += torch.tensor([0.0, 1e3, -2.0])
    tiles = v.split(block_m)
    partials = torch.full((len(tiles) + 2, 2, C), float("nan"), dtype=torch.float64)
    for t, tile in enumerate(tiles):
        partials[t, 0] = tile.mean(0)
        partials[t, 1] = (tile - tile.mean(0)).square().sum(0)
    merged = conv_bn_act._merge_stats(partials[:len(tiles)], M, block_m)
    torch.testing.assert_close(merged[0], v.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(merged[1], v.var(0, unbiased=False), rtol=1e-11, atol=0)


def test_empty_batch(triton_device):
    x = torch.randn(0, 3, 4, 4, device=triton_device)
    y, stats = conv2d_bn_act(x, torch.randn(5, 3, 3, 3, device=triton_device), None, (1, 1),
                             (1, 1), (1, 1), 1, stats=True)
    assert y.shape == (0, 5, 4, 4) and stats.shape == (2, 5) and stats.isnan().all()


# --------------------------------------------------------------------------- ahead of time

# Compiling takes about 1.2 s per kernel and arch (cached by Triton afterwards). By default
# (aot_cases): the ResNet layer at every config with all fusions in float16, bfloat16, float32
# and float64 (where it fits), and with the statistics in bfloat16; the grouped layer with all
# fusions in bfloat16 and with the statistics in float64 (its most registers).
# RESNET_FAST_AOT_ALL=1 compiles every layer x config x dtype x variant.
AOT_ALL = os.environ.get("RESNET_FAST_AOT_ALL") == "1"
ARCHS = (80, 90)
# Shared memory a block may use: A100 163 KB, H100 227 KB.
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Representative layers at batch 256: a ResNet-50 layer3 3x3 (256 -> 256 at 14x14: wide enough
# for every config, channel counts 16-divisible), and ResNeXt-50 32x4d's first grouped 3x3
# (128 -> 128 at 56x56, 32 groups of 4: channel masks that are not 16-divisible).
AOT_LAYERS = {
    "resnet50_3x3": dict(N=256, Cin=256, Cout=256, H=14, groups=1),
    "resnext50_grouped_3x3": dict(N=256, Cin=128, Cout=128, H=56, groups=32),
}
# Variants compiled per config: every fusion at once (prologue + scale/shift + residual + ReLU),
# and the prologue with the statistics epilogue: the two with the most live values.
AOT_VARIANTS = {
    "all_fusions": dict(PROLOGUE=True, IN_RELU=True, OUT_AFFINE=True, HAS_RESIDUAL=True,
                        RELU=True, STATS=False),
    "prologue_stats": dict(PROLOGUE=True, IN_RELU=True, OUT_AFFINE=False, HAS_RESIDUAL=False,
                           RELU=False, STATS=True),
}


def _aot_launch(layer, dtype, variant, config):
    """(arguments, constexprs) of the kernel launch for one layer (3x3, stride 1, padding 1)."""
    acc = acc_dtype_of(dtype)
    N, cin, cout, H, groups = (layer[k] for k in ("N", "Cin", "Cout", "H", "groups"))
    act = torch.empty(16, dtype=dtype, device="meta")
    per_channel = torch.empty(16, dtype=acc, device="meta")
    args = [act, act, per_channel, per_channel, per_channel, per_channel, per_channel, act, act,
            per_channel, N * H * H, H, H, cin, H, H, cout, cin // groups, cout // groups,
            1, 1, 1, 1, 1, 1]
    constexprs = dict(KH=3, KW=3, HAS_BIAS=True, **AOT_VARIANTS[variant],
                      INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      DOT_IN_FP32=False, **config.kwargs)
    return args, constexprs


_AOT_DEFAULT = {("resnet50_3x3", dtype, "all_fusions") for dtype in AOT_DTYPES} | {
    ("resnet50_3x3", torch.bfloat16, "prologue_stats"),
    ("resnext50_grouped_3x3", torch.bfloat16, "all_fusions"),
    ("resnext50_grouped_3x3", torch.float64, "prologue_stats"),
}


def aot_cases():
    """(layer name, config index, dtype, variant) to compile: the CONV_CONFIGS entries that
    autotuning may pick for the layer and dtype (config_fits), as AOT_ALL says."""
    for layer_name, layer in AOT_LAYERS.items():
        cin_g, cout_g = layer["Cin"] // layer["groups"], layer["Cout"] // layer["groups"]
        for index, config in enumerate(conv_bn_act.CONV_CONFIGS):
            for dtype in AOT_DTYPES:
                if not conv_bn_act.config_fits(config, dtype, cin_g, cout_g):
                    continue
                for variant in AOT_VARIANTS:
                    if AOT_ALL or (layer_name, dtype, variant) in _AOT_DEFAULT:
                        yield layer_name, index, dtype, variant


def aot_report(arch):
    """Resource usage of every aot_cases() compile for sm_<arch>. Needs real JITFunctions, so
    it runs in a process without TRITON_INTERPRET (the aot_reports fixture, tests/conftest.py)."""
    from triton.backends.compiler import GPUTarget

    kernel = conv_bn_act.conv2d_bn_act_kernel.fn
    report = []
    for layer_name, index, dtype, variant in aot_cases():
        config = conv_bn_act.CONV_CONFIGS[index]
        args, constexprs = _aot_launch(AOT_LAYERS[layer_name], dtype, variant, config)
        signature, consts, attrs = _compile_spec(kernel, args, constexprs)
        compiled = triton.compile(
            triton.compiler.ASTSource(kernel, signature, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        usage = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        report.append({
            "layer": layer_name, "config": index, "blocks": config.kwargs,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "dtype": TYPE_NAMES[dtype], "variant": variant, "mma": mma,
            "shared_metadata": compiled.metadata.shared, **usage})
    return report


@pytest.mark.parametrize("arch", ARCHS)
def test_aot_compile_every_config(aot_reports, arch):
    failures = []
    report = aot_reports[arch]
    for r in report:
        shared = max(r["SHARED"], r["shared_metadata"])
        print(f"sm_{arch} {r['layer']} config {r['config']} {r['blocks']} w{r['num_warps']} "
              f"s{r['num_stages']} {r['dtype']} {r['variant']}: REG {r['REG']} "
              f"LOCAL {r['LOCAL']} STACK {r['STACK']} shared {shared} {r['mma']}")
        if (r["LOCAL"] or r["STACK"] or r["REG"] > 255 or shared > SHARED_PER_BLOCK[arch]
                or r["mma"] == "none"):
            failures.append(repr(r))
    assert not failures, "\n".join(failures)
    # Every config was compiled at float16, bfloat16 and float32 for the ungrouped layer.
    seen = {(r["config"], r["dtype"]) for r in report if r["layer"] == "resnet50_3x3"}
    for index in range(len(conv_bn_act.CONV_CONFIGS)):
        for dtype in ("fp16", "bf16", "fp32"):
            assert (index, dtype) in seen, (index, dtype)


if __name__ == "__main__":
    # aot_reports runs this file as a script, without TRITON_INTERPRET: print one JSON line.
    print(json.dumps(aot_report(int(sys.argv[1]))))
