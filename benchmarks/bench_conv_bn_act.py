"""Benchmark of the fused conv + BatchNorm (+ add) + ReLU layer, ``functional.conv_bn_relu``.

Layers: every conv of ResNet-50 with the BatchNorm behind it, deduplicated, each with ``count``,
how many times it occurs in the network: the stem (7x7/2, 3->64, ReLU); per stage the 1x1
reduce, the 3x3 (stride 2 in the first block of stages 2-4), the 1x1 expand that ends the block
(BatchNorm + add of the shortcut + ReLU) and, in the first block, the 1x1 downsample conv of the
shortcut (BatchNorm, no ReLU). Then the 3x3 layers of ResNet-18 (``conv1`` with ReLU,
``conv2`` with the shortcut add + ReLU). Layer names are ``r50.s<stage>.<conv>`` and
``r18.s<stage>.<conv>``; ``.b0`` marks a layer only the first block of a stage has, ``s2`` a
stride-2 conv (``--list-layers`` prints them). Spatial sizes follow the network from the input
image (``--image``): 224 gives the 112/56/28/14/7 of ImageNet, 64 gives 32/16/8/4/2.

Providers, all measured in the same run on the same input values:

``eager``        ``reference.conv_bn_relu``: ``F.conv2d``, ``F.batch_norm``, add and ``F.relu``
                 as separate ops, in the layout under test (``--layout``);
``eager_nchw`` / ``eager_cl``
                 the same eager code in the other layout (input, weights, residual and gradient
                 converted), so that ``best_eager`` is the faster eager layout; measured by
                 default on the CPU, where the targets compare against it;
``compile``      ``torch.compile`` (default mode) of the eager function, compiled once per
                 (layer, mode) after ``torch._dynamo.reset()``; the compiling first call is
                 outside the timing (its wall time is the row's ``first_call_s``), and
                 ``recompiles`` counts its compilations after that call;
``conv_only``    ``F.conv2d`` alone (with its backward in training): the cost of the conv that
                 the fused layer must hide its BatchNorm, add and ReLU behind; measured by
                 default on CUDA, where the eval target is fused time <= conv alone;
``cpu``, ``triton``, ``cuda``
                 ``functional.conv_bn_relu(..., backend=...)``, each resnet_fast backend
                 available on the device. ``cuda`` (CUTLASS) takes float16/bfloat16 with channel
                 counts that are multiples of 8; other layers and dtypes are skipped, saying why;
``fused``        ``functional.conv_bn_relu`` with the default backend, as a user calls it: with
                 measured dispatch (:mod:`resnet_fast.dispatch`) each layer runs the fastest of
                 the device's backends and ATen's sequence, timed in the untimed first call (a
                 warm cache afterwards; ``RESNET_FAST_AUTOTUNE=0``: the static table).

A provider that raises on a layer is reported (``FAILED``, and under ``failed`` in the JSON),
left out of the rows, and the run goes on; the exit status is then 1.

Modes (``--modes``):

``eval``           ``torch.no_grad()``, running statistics; resnet_fast takes its one-pass path
                   with the BatchNorm folded into the conv (oneDNN conv + bias (+ add) (+ ReLU)
                   on the CPU, whose folded, prepacked weight is cached per parameter version,
                   so it is made in the untimed first call, as a model in eval makes it once;
                   one conv launch with the BatchNorm in its epilogue on a GPU);
``train``          training forward (batch statistics, running statistics updated) + backward
                   (``torch.autograd.grad``) giving every gradient the layer has in the network:
                   input (not for the stem, whose input is the image), conv weight, BatchNorm
                   weight and bias, and the residual; the output's gradient is the same random
                   tensor for every provider, with the strides of the provider's output;
``train_deferred`` for the layers that are not the first conv of their block (ResNet-50's 3x3
                   and expand, ResNet-18's conv2), the layer as the model runs it in training:
                   its input is the previous layer's BatchNorm + ReLU, not yet applied.
                   Timed for resnet_fast: one ``conv_bn_relu`` call whose input is a
                   ``DeferredBatchNorm`` (the previous conv's output ``raw_prev``, its batch
                   statistics, that BatchNorm's weight and bias; normalised + ReLU'd as the conv
                   loads it) + its backward, with the gradients of ``train`` plus those of
                   ``raw_prev`` and the previous BatchNorm's weight and bias. Every provider
                   does the previous BatchNorm's whole work inside its timing, as the models
                   run: eager/compile time ``relu(batch_norm(raw_prev))`` (batch statistics,
                   running statistics updated) followed by this layer's conv + BatchNorm
                   (+ add) + ReLU, forward + backward, the same gradients; resnet_fast computes
                   the batch statistics of ``raw_prev`` inside its timed call too: on ``cpu``
                   with the statistics kernel the model runs after the previous conv (running
                   statistics updated); on ``triton``/``cuda``, whose previous conv computes
                   them in its epilogue, with a separate reduction the model does not make
                   (these rows are pessimistic by that pass).

Timing (:mod:`resnet_fast.timing`): per (layer, mode), each provider's first call (untimed:
compilation, weight packing) and ``--warmup`` more, then ``--repeat`` rounds, each measuring
every provider once (at least ``--min-run-time`` seconds of calls) in a freshly shuffled order.
Every row gives median/min/max ms over the rounds and the speed-ups ``vs_eager``, ``vs_best_eager`` (faster eager layout), ``vs_compile``,
``vs_best_baseline`` (fastest of the eager layouts and compile) and ``vs_conv_only``, each the
baseline's median time over the row's (> 1: the row is faster), and ``max_rel_err``, how far
the provider's output (of its first call) is from eager's, relative to eager's largest value; a
warning is printed where it exceeds what rounding explains. The summary gives, per network
(ResNet-50, ResNet-18 3x3, all measured layers), mode and provider, the geometric mean of
those ratios over layers, weighted by ``count`` and unweighted, and the median over layers of
``vs_conv_only``; ``train (model)`` takes each layer as the model trains it (``train_deferred``
where the layer has it, else ``train``). Then the targets, judged on all measured layers
weighted by count:

* CPU eval: resnet_fast >= 1.15x the fastest of eager NCHW, eager channels_last and compile;
* CPU training: >= 1.2x the faster eager layout;
* GPU eval: fused conv + BN + ReLU time <= ``conv_only`` (unweighted median over layers of
  the ratio);
* GPU training: >= 1.25x eager and >= 1.05x compile;
* ``fused`` (measured dispatch), every mode: no layer below 0.97x eager (the worst layer's
  ``vs_eager``, ``worst_vs_eager`` in the summary);

training judged both on ``train (model)`` and on ``train``.

    python benchmarks/bench_conv_bn_act.py                # CPU: float32, channels_last, 16x64x64
    python benchmarks/bench_conv_bn_act.py --device cuda  # bf16, channels_last, 256x224x224
    python benchmarks/bench_conv_bn_act.py --quick        # 3 layers, 3 repeats: a smoke test

Results: the printed table and summary, and CSV + JSON (+ a PNG bar plot of the speed-up vs
eager per layer when matplotlib is installed) in ``benchmarks/results/`` (``--out``), named
``conv_bn_act_<device>`` (``--tag``); the JSON's ``provenance`` records the device, versions,
commit, command line and timing settings, and each row names the device, torch version,
commit, dtype, layout and shapes. On CUDA, ``torch.backends.cudnn.benchmark`` is on (as ResNet training scripts set it).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import resnet_fast
from resnet_fast import functional, reference
from resnet_fast._conventions import acc_dtype_of, conv_output_shape
from resnet_fast.timing import (compiled, error_text, fmt_cell, interleave, provenance, pyplot,
                                recompiles_of, row_provenance, save_figure, synchronize,
                                time_stats, write_result_files)

from _common import RESULTS, geomean, run_name

EPS = 1e-5
MODES = ("eval", "train", "train_deferred")
QUICK_LAYERS = ("r50.s1.3x3", "r50.s3.expand", "r50.s4.down")
OURS = ("cpu", "triton", "cuda", "reference")
FUSED = "fused"  # resnet_fast's default backend: measured dispatch


# ----------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """One conv + BatchNorm (+ add) (+ ReLU) layer; ``size`` is the input's height and width."""

    name: str
    network: str
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int
    relu: bool = True
    residual: bool = False
    deferred: bool = False  # not the first conv of its block: trained with a deferred input
    count: int = 1
    dilation: int = 1

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel // 2)

    @property
    def out_size(self) -> int:
        return out_side(self.size, self.kernel, self.stride, self.padding, self.dilation)

    def in_shape(self, batch: int) -> tuple[int, int, int, int]:
        return batch, self.cin, self.size, self.size

    def out_shape(self, batch: int) -> tuple[int, int, int, int]:
        return batch, self.cout, self.out_size, self.out_size

    @property
    def conv(self) -> str:
        """e.g. ``3x3/2 128>128 +add``."""
        s = f"{self.kernel}x{self.kernel}/{self.stride} {self.cin}>{self.cout}"
        return s + (" +add" if self.residual else "") + ("" if self.relu else " norelu")


def out_side(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output height of a square conv (or pooling window) on a square input."""
    return conv_output_shape((1, 1, size, size), (1, 1, kernel, kernel), (stride, stride),
                             (padding, padding), (dilation, dilation))[2]


class _Dedup:
    """Layers in order of first occurrence, counting repeats of the same name."""

    def __init__(self, network: str):
        self.network = network
        self.layers: dict[str, Layer] = {}

    def add(self, name, cin, cout, kernel, stride, size, **kw) -> None:
        layer = Layer(name, self.network, cin, cout, kernel, stride, size, **kw)
        seen = self.layers.get(name)
        if seen is None:
            self.layers[name] = layer
            return
        assert seen == Layer(**{**layer.__dict__, "count": seen.count}), (seen, layer)
        self.layers[name] = Layer(**{**seen.__dict__, "count": seen.count + 1})


def _stage_input_size(image: int) -> int:
    """Input size of stage 1: after the 7x7/2 stem and the 3x3/2 max-pool (padding 1)."""
    return out_side(out_side(image, 7, 2, 3), 3, 2, 1)


def resnet50_layers(image: int) -> list[Layer]:
    net = _Dedup("resnet50")
    net.add("r50.stem", 3, 64, 7, 2, image)
    size, inplanes = _stage_input_size(image), 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            b0 = ".b0" if block == 0 else ""
            out = out_side(size, 3, stride, 1)
            net.add(f"r50.s{stage}.reduce{b0}", inplanes, planes, 1, 1, size)
            net.add(f"r50.s{stage}.3x3{'s2' if stride == 2 else ''}", planes, planes, 3, stride,
                    size, deferred=True)
            net.add(f"r50.s{stage}.expand", planes, planes * 4, 1, 1, out, residual=True,
                    deferred=True)
            if block == 0:
                net.add(f"r50.s{stage}.down", inplanes, planes * 4, 1, stride, size, relu=False)
            size, inplanes = out, planes * 4
    return list(net.layers.values())


def resnet18_3x3_layers(image: int) -> list[Layer]:
    net = _Dedup("resnet18")
    size, inplanes = _stage_input_size(image), 64
    for stage, planes in enumerate((64, 128, 256, 512), 1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            out = out_side(size, 3, stride, 1)
            net.add(f"r18.s{stage}.conv1{'s2' if stride == 2 else ''}", inplanes, planes, 3,
                    stride, size)
            net.add(f"r18.s{stage}.conv2", planes, planes, 3, 1, out, residual=True,
                    deferred=True)
            size, inplanes = out, planes
    return list(net.layers.values())


def all_layers(image: int) -> list[Layer]:
    return resnet50_layers(image) + resnet18_3x3_layers(image)


def select_layers(layers: list[Layer], patterns: Optional[str]) -> list[Layer]:
    """The layers whose name matches one of the comma-separated glob patterns or contains it."""
    if not patterns:
        return layers
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [lay for lay in layers if any(fnmatch.fnmatchcase(lay.name, p) or p in lay.name
                                         for p in pats)]


# ----------------------------------------------------------------------------------- inputs


class Tensors:
    """One layer's tensors in one memory format. Activations and the conv weight are in that
    format; the per-channel BatchNorm tensors are float32 (float64 for float64), as under
    autocast, and shared between the formats."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def to_format(self, fmt: torch.memory_format) -> "Tensors":
        def conv(t):
            if t is None or t.dim() != 4:
                return t
            return t.detach().contiguous(memory_format=fmt).requires_grad_(t.requires_grad)
        return Tensors(**{k: conv(v) for k, v in self.__dict__.items()})


def make_tensors(layer: Layer, batch: int, dtype, fmt, device, with_prev: bool) -> Tensors:
    torch.manual_seed(0)
    acc = acc_dtype_of(dtype)

    def act(shape, grad=True, scale=1.0, shift=0.0):
        t = torch.randn(shape, device=device, dtype=dtype) * scale + shift
        return t.contiguous(memory_format=fmt).requires_grad_(grad)

    def per_channel(c, kind):
        if kind == "w":
            return (torch.rand(c, device=device, dtype=acc) + 0.5).requires_grad_()
        if kind == "b":
            return (torch.randn(c, device=device, dtype=acc) * 0.1).requires_grad_()
        return (torch.zeros if kind == "rm" else torch.ones)(c, device=device, dtype=acc)

    fan_in = layer.cin * layer.kernel ** 2
    w = (torch.randn(layer.cout, layer.cin, layer.kernel, layer.kernel, device=device,
                     dtype=dtype) * math.sqrt(2.0 / fan_in))
    t = Tensors(
        x=act(layer.in_shape(batch), grad=layer.name != "r50.stem"),
        w=w.contiguous(memory_format=fmt).requires_grad_(),
        bw=per_channel(layer.cout, "w"), bb=per_channel(layer.cout, "b"),
        rm=per_channel(layer.cout, "rm"), rv=per_channel(layer.cout, "rv"),
        r=act(layer.out_shape(batch)) if layer.residual else None,
        g=act(layer.out_shape(batch), grad=False),
        raw_prev=None, pw=None, pb=None, prm=None, prv=None,
    )
    if with_prev:
        # The previous conv's output before its BatchNorm, and that BatchNorm.
        t.raw_prev = act(layer.in_shape(batch), scale=2.0, shift=0.5)
        t.pw, t.pb = per_channel(layer.cin, "w"), per_channel(layer.cin, "b")
        t.prm, t.prv = per_channel(layer.cin, "rm"), per_channel(layer.cin, "rv")
    return t


# ----------------------------------------------------------------------------------- providers


def is_eager(provider: str) -> bool:
    return provider == "eager" or provider.startswith("eager_")


def eager_function(layer: Layer, mode: str) -> Callable:
    """The eager layer (mode ``train_deferred``: preceded by the previous layer's BatchNorm +
    ReLU) as a function of its tensors, for eager and torch.compile alike."""
    training = mode != "eval"
    stride, padding, relu = layer.stride, layer.padding, layer.relu

    def eager(x, w, rm, rv, bw, bb, r, prev):
        if prev is not None:
            raw_prev, prm, prv, pw, pb = prev
            x = reference.batch_norm_relu(raw_prev, prm, prv, pw, pb, True, 0.1, EPS)
        return reference.conv_bn_relu(x, w, rm, rv, bw, bb, training, 0.1, EPS, residual=r,
                                      relu=relu, stride=stride, padding=padding,
                                      dilation=layer.dilation)

    return eager


def deferred_stats(t: Tensors, backend: str) -> Tensor:
    """The batch statistics (mean, invstd) of the previous layer's conv output, as the fused
    model computes them when that layer defers its BatchNorm: on ``cpu`` the same statistics
    kernel (running statistics updated too); on the GPU backends, whose previous conv computes
    them in its epilogue, a separate reduction, a pass their models do not make."""
    if backend == "cpu":
        stats, running = resnet_fast._C.bn_stats_cpu(t.raw_prev.detach(), t.prm, t.prv, 0.1,
                                                     EPS)
        t.prm.copy_(running[0])
        t.prv.copy_(running[1])
        return stats
    with torch.no_grad():
        var, mean = torch.var_mean(t.raw_prev.to(t.prm.dtype), dim=(0, 2, 3), correction=0)
        return torch.stack([mean, torch.rsqrt(var + EPS)])


def provider_call(provider: str, layer: Layer, mode: str,
                  t: Tensors) -> tuple[Callable, list, Optional[Callable]]:
    """(fn() -> output, the tensors whose gradients training computes, the
    :func:`resnet_fast.timing.compiled` callable of ``compile``, else None) for one
    provider."""
    deferred = mode == "train_deferred"
    prev = (t.raw_prev, t.prm, t.prv, t.pw, t.pb) if deferred else None
    if provider == "conv_only":
        def fn():
            return F.conv2d(t.x, t.w, None, layer.stride, layer.padding, layer.dilation)
        return fn, [p for p in (t.x, t.w) if p.requires_grad], None
    grads = [t.x] if not deferred and t.x.requires_grad else []
    if deferred:
        grads += [t.raw_prev, t.pw, t.pb]
    grads += [t.w, t.bw, t.bb] + ([t.r] if t.r is not None else [])
    if is_eager(provider) or provider == "compile":
        f = eager_function(layer, mode)
        if provider == "compile":
            f = compiled(f)
        return (lambda: f(t.x, t.w, t.rm, t.rv, t.bw, t.bb, t.r, prev)), grads, (
            f if provider == "compile" else None)
    training = mode != "eval"
    backend = None if provider == FUSED else provider
    stats_backend = backend or resnet_fast.backends.resolve_backend(None, t.x.device)

    def ours():
        x = t.x
        if deferred:
            x = functional.DeferredBatchNorm(t.raw_prev, deferred_stats(t, stats_backend), t.pw,
                                             t.pb, True, EPS, backend)
        return functional.conv_bn_relu(x, t.w, t.rm, t.rv, t.bw, t.bb, training, 0.1, EPS,
                                       stride=layer.stride, padding=layer.padding,
                                       dilation=layer.dilation, residual=t.r, relu=layer.relu,
                                       backend=backend)
    return ours, grads, None


def cuda_backend_skip(layer: Layer, dtype: torch.dtype) -> Optional[str]:
    """Why the ``cuda`` backend's CUTLASS kernels reject this layer, or None."""
    if dtype not in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        return f"dtype {name}: the CUTLASS kernels take float16 or bfloat16"
    if layer.cin % 8 or layer.cout % 8:
        return (f"{layer.cin}->{layer.cout} channels: the CUTLASS kernels need multiples of 8 "
                "in and out")
    return None


def prepare(provider: str, layer: Layer, mode: str, t: Tensors,
            device: torch.device) -> tuple[Callable, float, Tensor, Optional[Callable]]:
    """(the timed call, wall seconds of its first call (compilation for ``compile``), the
    first call's output, the compiled callable of ``compile``)."""
    fn, grads, compiled_fn = provider_call(provider, layer, mode, t)
    # The output's gradient: t.g's values with the output's strides, as autograd hands it
    # over from the next layer (set by the first call).
    grad_out = []
    if mode == "eval":
        def call():
            with torch.no_grad():
                return fn()
    else:
        def call():
            out = fn()
            if not grad_out:
                grad_out.append(torch.empty_like(out).copy_(t.g))
            torch.autograd.grad(out, grads, grad_out[0])
            return out
    t0 = time.perf_counter()
    out = call().detach()
    synchronize(device)
    return call, time.perf_counter() - t0, out, compiled_fn


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|."""
    ref = ref.double() if ref.dtype == torch.float64 else ref.float()
    return float((out.to(ref.dtype) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The largest relative_error against eager expected from rounding alone (the conv may
    accumulate in another order, tf32 on CUDA for float32, the BatchNorm folded into it)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 5e-2
    if dtype == torch.float32:
        return 2e-2 if device.type == "cuda" else 1e-3
    return 1e-9


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda presets bfloat16, channels_last, batch 256, 224x224")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "float64"],
                   help="default: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--layout", default="channels_last",
                   choices=["channels_last", "contiguous", "cl", "nchw"])
    p.add_argument("--batch", type=int, default=None, help="default: 16 on the CPU, 256 on CUDA")
    p.add_argument("--image", type=int, default=None,
                   help="input image size the layer sizes follow (default: 64 CPU, 224 CUDA)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated from {MODES}")
    p.add_argument("--layers", default=None,
                   help="comma-separated glob patterns or substrings of layer names, e.g. "
                        "'r50.s1.*,r18' or '3x3' (see --list-layers)")
    p.add_argument("--providers", default=None,
                   help="comma-separated from eager, eager_nchw, eager_cl, compile, conv_only, "
                        "the backends and fused (default: eager, the other eager layout on the "
                        "CPU, compile, conv_only on CUDA, every available backend, fused)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds, each measuring every provider once (default: 10 CPU, 20 CUDA; "
                        "3 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per provider after the first, before the rounds "
                        "(default: 2 CPU, 10 CUDA)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds each measurement runs at least (default: 0.02 CPU, 0.05 CUDA;"
                        " 0, one call, with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"layers {','.join(QUICK_LAYERS)}, 3 repeats, 1 warm-up: a smoke test")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None, help="file name suffix (default: device kind)")
    p.add_argument("--list-layers", action="store_true", help="print the layers and exit")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    layout = {"cl": "channels_last", "nchw": "contiguous"}.get(args.layout, args.layout)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    other_layout = "contiguous" if layout == "channels_last" else "channels_last"
    other_eager = "eager_nchw" if layout == "channels_last" else "eager_cl"
    same_eager = "eager_cl" if layout == "channels_last" else "eager_nchw"
    batch = args.batch or (256 if gpu else 16)
    image = args.image or (224 if gpu else 64)

    layers = select_layers(all_layers(image), ",".join(QUICK_LAYERS) if args.quick and not
                           args.layers else args.layers)
    if args.list_layers or not layers:
        for lay in layers or all_layers(image):
            shape = "x".join(map(str, lay.in_shape(batch)))
            print(f"{lay.name:18} x{lay.count:<2} {lay.conv:26} in {shape}"
                  f"{'  (deferred input in training)' if lay.deferred else ''}")
        if not layers:
            print(f"error: --layers {args.layers!r} matches none of the layers above",
                  file=sys.stderr)
            return 2
        return 0
    if gpu and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: unknown mode(s) {bad}; expected {MODES}", file=sys.stderr)
        return 2

    backends = [b for b in resnet_fast.available_backends(device) if b != "reference"]
    default = ["eager"] + ([] if gpu else [other_eager]) + ["compile"] + (
        ["conv_only"] if gpu else []) + backends + [FUSED]
    providers = []
    for name in (args.providers.split(",") if args.providers else default):
        name = "eager" if name == same_eager else name
        if name and name not in providers:
            providers.append(name)
    known = {"eager", other_eager, "compile", "conv_only", FUSED, *OURS}
    bad = [q for q in providers if q not in known]
    if bad:
        print(f"error: unknown provider(s) {bad}; expected from {sorted(known)}", file=sys.stderr)
        return 2
    for q in providers:
        if q in OURS:
            reason = resnet_fast.unavailable_reason(q, device)
            if reason:
                print(f"error: provider {q}: {reason}", file=sys.stderr)
                return 2
    # Every ratio is taken against eager, and every output checked against its: it runs first.
    providers = ["eager"] + [q for q in providers if q != "eager"]

    reps = args.repeat or (3 if args.quick else 20 if gpu else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10 if gpu else 2)
    min_run_time = args.min_run_time if args.min_run_time is not None else (
        0.0 if args.quick else 0.05 if gpu else 0.02)
    timing = dict(rounds=reps, device=device, warmup=warmup, min_run_time=min_run_time)
    if gpu:
        torch.backends.cudnn.benchmark = True
    prov = provenance(device, warmup, reps, min_run_time=min_run_time)
    dtype_name = str(dtype).replace("torch.", "")
    print(f"{prov['device']}: {dtype_name} {layout}, batch {batch}, image {image}, "
          f"{len(layers)} layers, modes {','.join(modes)}, providers {','.join(providers)}, "
          f"{reps} rounds of one measurement each (at least {min_run_time} s) after "
          f"{warmup + 1} untimed calls")

    rows, skipped, failed = [], [], []
    t_start = time.perf_counter()
    for layer in layers:
        layer_modes = [m for m in modes if m != "train_deferred" or layer.deferred]
        tensors = {layout: make_tensors(layer, batch, dtype, fmt, device,
                                        "train_deferred" in layer_modes)}
        if other_eager in providers:
            other_fmt = (torch.contiguous_format if other_layout == "contiguous"
                         else torch.channels_last)
            tensors[other_layout] = tensors[layout].to_format(other_fmt)
        for mode in layer_modes:
            calls, firsts, counters, errors = {}, {}, {}, {}
            for provider in providers:
                if provider == "conv_only" and mode == "train_deferred":
                    continue  # the conv alone: the same as in train
                if provider == "cuda":
                    reason = cuda_backend_skip(layer, dtype)
                    if reason:
                        skipped.append(dict(layer=layer.name, mode=mode, provider=provider,
                                            reason=reason))
                        print(f"  skip cuda {layer.name} {mode}: {reason}")
                        continue
                t = tensors[other_layout if provider == other_eager else layout]
                try:
                    calls[provider], firsts[provider], out, counters[provider] = prepare(
                        provider, layer, mode, t, device)
                except Exception as exc:  # noqa: BLE001 - recorded, reported, the run goes on
                    reason = error_text(exc)
                    entry = dict(layer=layer.name, mode=mode, provider=provider, reason=reason)
                    if provider == "cuda" and "conv2d_bn_act_cuda" in str(exc):
                        skipped.append(entry)  # an argument check of the CUTLASS path
                        print(f"  skip cuda {layer.name} {mode}: {reason}")
                    else:
                        failed.append(entry)
                        print(f"  FAILED {provider} {layer.name} {mode}: {reason}",
                              file=sys.stderr)
                    continue
                # Each provider's output against eager's, as a check of what is timed.
                if provider == "eager":
                    reference_out = out
                elif provider != "conv_only":
                    errors[provider] = relative_error(out, reference_out)
                    if errors[provider] > tolerance(dtype, device):
                        print(f"  warning: {layer.name} {mode} {provider}: output differs from "
                              f"eager's by {errors[provider]:.2e} of its largest value",
                              file=sys.stderr)
                del out
            reference_out = None
            timing_errors = {}
            times = interleave(calls, **timing, errors=timing_errors)
            for provider, reason in timing_errors.items():
                failed.append(dict(layer=layer.name, mode=mode, provider=provider,
                                   reason=reason))
                print(f"  FAILED {provider} {layer.name} {mode}: {reason}", file=sys.stderr)
            measured = {q: (ts, firsts[q], recompiles_of(counters[q])) for q, ts in times.items()}
            new = result_rows(layer, mode, measured, errors, batch, image, dtype_name, layout,
                              prov, other_layout)
            print_rows(new, header=not rows, conv_only="conv_only" in providers)
            rows.extend(new)
        del tensors
    elapsed = time.perf_counter() - t_start
    print(f"\n{len(rows)} rows in {elapsed:.0f} s")

    write_results(rows, skipped, failed, Path(args.out), run_name(args.tag, device), prov,
                  dict(device=args.device, dtype=dtype_name, layout=layout, batch=batch,
                       image=image, modes=modes, providers=providers, repeat=reps,
                       warmup=warmup, min_run_time=min_run_time, quick=args.quick,
                       layers=args.layers, cudnn_benchmark=gpu, elapsed_s=elapsed))
    return 1 if failed else 0


def result_rows(layer: Layer, mode: str, measured: dict, errors: dict, batch: int, image: int,
                dtype: str, layout: str, prov: dict, other_layout: str) -> list[dict]:
    """``measured``: per provider (seconds per measurement, first call's seconds, recompiles)."""
    med = {q: statistics.median(times) for q, (times, _, _) in measured.items()}
    eager = med.get("eager")
    eagers = {q: v for q, v in med.items() if is_eager(q)}
    best_eager_provider = min(eagers, key=eagers.get) if eagers else None
    best_eager = eagers.get(best_eager_provider)
    compiled, conv_only = med.get("compile"), med.get("conv_only")
    best_baseline = min(v for v in (best_eager, compiled) if v is not None) if (
        best_eager or compiled) else None

    def ratio(base, m):
        return base / m if base is not None else None

    base = dict(row_provenance(prov), dtype=dtype, layout=layout, network=layer.network,
                layer=layer.name, count=layer.count, conv=layer.conv, kernel=layer.kernel,
                stride=layer.stride, padding=layer.padding, cin=layer.cin, cout=layer.cout,
                relu=layer.relu, residual=layer.residual,
                in_shape="x".join(map(str, layer.in_shape(batch))),
                out_shape="x".join(map(str, layer.out_shape(batch))), batch=batch, image=image,
                mode=mode)
    rows = []
    for provider, (times, first, recompiles) in measured.items():
        m = med[provider]
        rows.append(dict(
            base, provider=provider,
            provider_layout=other_layout if provider.startswith("eager_") else layout,
            **time_stats(times), first_call_s=first, recompiles=recompiles,
            vs_eager=ratio(eager, m), vs_best_eager=ratio(best_eager, m),
            best_eager=best_eager_provider, vs_compile=ratio(compiled, m),
            vs_best_baseline=ratio(best_baseline, m), vs_conv_only=ratio(conv_only, m),
            max_rel_err=0.0 if provider == "eager" else errors.get(provider)))
    return rows


COLUMNS = (("layer", 16), ("count", 5), ("conv", 24), ("in_shape", 16), ("mode", 14),
           ("provider", 10), ("median_ms", 10), ("vs_eager", 8), ("vs_best_eager", 13),
           ("vs_compile", 10), ("vs_conv_only", 12), ("recompiles", 10))


def print_rows(rows, header=False, conv_only=False):
    cols = [c for c in COLUMNS if conv_only or c[0] != "vs_conv_only"]
    if header:
        print(" ".join(c.ljust(w) for c, w in cols))
    for row in rows:
        print(" ".join(fmt_cell(row[c]).ljust(w) for c, w in cols), flush=True)


# ----------------------------------------------------------------------------------- summary


def model_training_rows(rows) -> list[dict]:
    """Per (layer, provider): the train_deferred row where the layer has one, else train."""
    by_key = {(r["layer"], r["provider"], r["mode"]): r for r in rows}
    out = []
    for r in rows:
        if r["mode"] == "train":
            out.append(by_key.get((r["layer"], r["provider"], "train_deferred"), r))
    return out


RATIOS = ("vs_eager", "vs_best_eager", "vs_compile", "vs_best_baseline")


def summarize(rows) -> list[dict]:
    """Per (network, mode, provider), the weighted (by count) and unweighted geometric means over
    layers of each ratio, and the median over layers of vs_conv_only."""
    sets = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    sets["train (model)"] = model_training_rows(rows)
    out = []
    for mode, mode_rows in sets.items():
        networks = list(dict.fromkeys(r["network"] for r in rows))
        for network in networks + (["all"] if len(networks) > 1 else []):
            sel = [r for r in mode_rows if network == "all" or r["network"] == network]
            for provider in dict.fromkeys(r["provider"] for r in sel):
                rs = [r for r in sel if r["provider"] == provider]
                s = dict(network=network, mode=mode, provider=provider, layers=len(rs),
                         occurrences=sum(r["count"] for r in rs))
                for k in RATIOS:
                    vals = [r[k] for r in rs]
                    s[k] = geomean(vals, [r["count"] for r in rs])
                    s[k + "_unweighted"] = geomean(vals)
                s["worst_vs_eager"] = min((r["vs_eager"] for r in rs), default=None)
                conv = [r["vs_conv_only"] for r in rs if r["vs_conv_only"] is not None]
                s["vs_conv_only_median"] = statistics.median(conv) if conv else None
                out.append(s)
    return out


def targets(summary, device_type: str) -> list[dict]:
    """The performance targets, judged per resnet_fast backend on all measured layers weighted by
    count (the value None where what a target needs was not measured)."""
    get = {(s["network"], s["mode"], s["provider"]): s for s in summary}
    out = []

    def add(backend, what, mode, key, bound, needs):
        def find(provider):
            return get.get(("all", mode, provider)) or next(
                (v for k, v in get.items() if k[1:] == (mode, provider)), None)

        s = find(backend)
        missing = [q for q in needs if find(q) is None]
        value = s.get(key) if s and not missing else None
        out.append(dict(backend=backend, target=what, mode=mode, ratio=key, value=value,
                        unweighted=s.get(key + "_unweighted") if value is not None else None,
                        bound=bound, met=None if value is None else value >= bound,
                        missing=missing))

    eager_other = sorted({s["provider"] for s in summary if s["provider"].startswith("eager_")})
    eager_other = eager_other or ["eager_nchw or eager_cl"]
    if any(s["provider"] == FUSED for s in summary):
        for mode in ("eval", "train (model)", "train"):
            add(FUSED, "no layer below 0.97x eager", mode, "worst_vs_eager", 0.97, [])
    for backend in sorted({s["provider"] for s in summary if s["provider"] in OURS + (FUSED,)}):
        if device_type == "cpu":
            add(backend, "eval >= 1.15x the fastest of eager NCHW, eager channels_last, compile",
                "eval", "vs_best_baseline", 1.15, eager_other + ["compile"])
            add(backend, "training >= 1.2x the faster eager layout", "train (model)",
                "vs_best_eager", 1.2, eager_other)
            add(backend, "training >= 1.2x the faster eager layout", "train",
                "vs_best_eager", 1.2, eager_other)
        else:
            add(backend, "eval time <= conv alone (median over layers)", "eval",
                "vs_conv_only_median", 1.0, ["conv_only"])
            for mode in ("train (model)", "train"):
                add(backend, "training >= 1.25x eager", mode, "vs_eager", 1.25, [])
                add(backend, "training >= 1.05x compile", mode, "vs_compile", 1.05, ["compile"])
    return out


def print_summary(summary, target_rows, eager_other: bool) -> None:
    print("\nsummary: geometric mean over layers of the speed-up (weighted by occurrences; "
          "unweighted in brackets)")
    head = ["vs_eager"] + (["vs_best_eager"] if eager_other else []) + [
        "vs_compile", "vs_best_baseline"]

    def cell(s, k):
        if s[k] is None:
            return "-".ljust(16)
        return f"{s[k]:.2f}x [{s[k + '_unweighted']:.2f}x]".ljust(16)

    print(f"  {'mode':14} {'network':9} {'provider':10} {'layers':>6}  "
          + " ".join(h.ljust(16) for h in head) + " worst vs_eager  vs_conv_only (median)")
    for s in summary:
        if s["provider"] == "eager":
            continue
        conv = s["vs_conv_only_median"]
        print(f"  {s['mode']:14} {s['network']:9} {s['provider']:10} {s['layers']:>6}  "
              + " ".join(cell(s, h) for h in head) + f" {s['worst_vs_eager']:.2f}x".ljust(16)
              + (f" {conv:.2f}x" if conv else " -"))
    print("\ntargets (all measured layers, weighted by occurrences)")
    for t in target_rows:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        if t["missing"]:
            verdict += f" (needs {', '.join(t['missing'])})"
        val = "-" if t["value"] is None else f"{t['value']:.2f}x"
        unw = "" if t["unweighted"] is None else f" [unweighted {t['unweighted']:.2f}x]"
        print(f"  {t['backend']:7} {t['target']:70} {t['mode']:14} {t['ratio']:19} "
              f"{val}{unw}  {verdict}")


def write_results(rows, skipped, failed, out: Path, tag: str, prov: dict,
                  config: dict) -> None:
    if not rows:
        print("nothing measured")
        return
    stem = out / f"conv_bn_act_{tag}"
    summary = summarize(rows)
    target_rows = targets(summary, prov["device_kind"])
    paths = write_result_files(stem, rows, prov, {"config": config, "targets": target_rows,
                                                  "summary": summary, "skipped": skipped,
                                                  "failed": failed, "rows": rows}, plot)
    print_summary(summary, target_rows, any(r["provider"].startswith("eager_") for r in rows))
    if skipped:
        print(f"\nskipped {len(skipped)} (layer, mode, provider): "
              + "; ".join(sorted({f"{s['provider']}: {s['reason']}" for s in skipped})))
    if failed:
        print(f"\nFAILED {len(failed)} (layer, mode, provider), not in the rows or the summary:")
        for f in failed:
            print(f"  {f['provider']} {f['layer']} {f['mode']}: {f['reason']}")
    print(f"\nwrote {stem}.csv, .json" + (", .png" if "png" in paths else ""))


def plot(rows, path: Path, prov: dict) -> bool:
    """One panel per mode: per layer, a bar per provider of its speed-up vs eager; returns
    whether the PNG was written."""
    plt = pyplot()
    if plt is None:
        return False
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    providers = [q for q in dict.fromkeys(r["provider"] for r in rows) if q != "eager"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(10, 0.5 * len(layers) + 2),
                                                     3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[:, 0], modes):
        sel = {(r["layer"], r["provider"]): r for r in rows if r["mode"] == mode}
        names = [lay for lay in layers if any(k[0] == lay for k in sel)]
        for i, provider in enumerate(providers):
            ys = [sel[(lay, provider)]["vs_eager"] if (lay, provider) in sel else 0
                  for lay in names]
            ax.bar([j + (i - (len(providers) - 1) / 2) * width for j in range(len(names))], ys,
                   width, label=provider)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{n} x{sel[(n, 'eager')]['count']}" if (n, "eager") in sel else n
                            for n in names], rotation=40, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs eager")
        r0 = next(iter(sel.values()))
        ax.set_title(f"conv+BN(+add)+ReLU {mode}: {r0['dtype']} {r0['layout']} batch "
                     f"{r0['batch']} image {r0['image']} on {prov['device']}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(providers))
    save_figure(fig, path)
    return True


if __name__ == "__main__":
    sys.exit(main())
