"""``python -m resnet_fast verify``: the fused ops, or a model's fused layers, against the
float64 reference under the tolerance policy (:mod:`resnet_fast.verify`).

Every registered fused op is checked with every backend available on the device, on random
shapes (odd ones included), in each dtype and layout, in training and eval; one row per case:
op, backend, dtype, layout, shape, mode, the largest error against float64 (the quantity nearest
its bound), eager's error on that quantity, and pass/fail. Exit status 1 on any failure, 2 on bad
usage. ``verify --model resnet50`` checks the shapes of that model's layers instead of random
ones: each conv + BatchNorm (+ residual) (+ ReLU) as ``conv_bn_relu`` with the layer's own conv,
and each BatchNorm (+ add) + ReLU as the matching BatchNorm op, at ``--batch`` and ``--size``.
``verify --model module:callable [--input 2x3x224x224]`` checks a whole model instead: it builds
``module.callable()``, converts a copy (:func:`resnet_fast.convert`), prints what convert
reports, the share of its BatchNorm layers that run inside fused ops (eval and training), and
one row per fused module (its output, eval and training) and per whole-model quantity (eval
logits; one training step's loss, every gradient, the running statistics), each compared with
the unconverted model under the same tolerance policy (float32 and contiguous by default).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import random
import sys
import warnings

import torch
from torch import nn

import resnet_fast
from resnet_fast.cli import MODELS, UsageError
from resnet_fast.convert import eager_batch_norms
from resnet_fast.graph_plan import FusedForward
from resnet_fast.nn import FusedModule
from resnet_fast.verify import LAYOUTS, OPS, Case, Conv, check_case, compare

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def random_shapes(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``count`` shapes: the odd corners first (1x1 spatial, C=3, a C past a power of two),
    then random ones."""
    rng = random.Random(seed)
    corners = [(2, 3, 1, 1), (3, 33, 5, 7), (2, 130, 3, 3)]
    shapes = corners[:count]
    while len(shapes) < count:
        shapes.append((rng.randint(2, 8), rng.randint(1, 96), rng.randint(1, 12),
                       rng.randint(1, 12)))
    return shapes


def model_layers(name: str, batch: int, size: int) -> list[tuple[str, str, tuple, object]]:
    """The distinct fused-op cases of model ``name`` at ``batch`` x 3 x ``size`` x ``size``:
    ``(layer name, op, input shape, Conv or None)``, in forward order.

    Every conv followed by a BatchNorm is a ``conv_bn_relu`` case with the layer's kernel,
    stride, padding, dilation and groups: with ReLU, or, at a block end, with the residual add
    and ReLU, or, in a downsampling shortcut, with neither. Every BatchNorm is also a case of the
    BatchNorm op that covers it: ``batch_norm_relu`` inside a block and in the stem,
    ``batch_norm_add_relu`` at a block end with an identity shortcut and
    ``dual_batch_norm_add_relu`` at one with a downsampling shortcut.
    """
    from resnet_fast import reference_models

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = getattr(reference_models, name)(small_input=size < 64)
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    blocks = {n: m for n, m in model.named_modules()
              if isinstance(m, (reference_models.BasicBlock, reference_models.Bottleneck))}
    cases, seen = [], set()

    def add(layer, op, shape, conv=None):
        key = (op, shape, conv)
        if key not in seen:
            seen.add(key)
            cases.append((layer, op, shape, conv))

    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Conv2d):
            continue
        parent, _, leaf = n.rpartition(".")
        block = blocks.get(parent)
        downsample = parent.endswith(".downsample")
        last = block is not None and leaf == (
            "conv3" if isinstance(block, reference_models.Bottleneck) else "conv2")
        conv = Conv(m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0],
                    m.groups, m.bias is not None, residual=last, relu=not downsample)
        add(n, "conv_bn_relu", shapes[n], conv)
        out = conv.output_shape(shapes[n])
        if downsample:
            continue
        if last:
            add(n, "dual_batch_norm_add_relu" if block.downsample is not None
                else "batch_norm_add_relu", out)
        else:
            add(n, "batch_norm_relu", out)
    return cases


def _cases(args, backend):
    if args.model:
        layers = [(op, shape, conv, layer)
                  for layer, op, shape, conv in model_layers(args.model, args.batch, args.size)
                  if op in args.ops]
    else:
        layers = [(op, shape, None, None) for op in args.ops
                  for shape in random_shapes(args.shapes, args.seed)]
    if backend == "triton" and args.device == "cpu":
        # Triton's interpreter runs Python per program: small shapes only.
        layers = [c for c in layers if c[1][0] * c[1][1] * c[1][2] * c[1][3] <= 4096]
    if args.model:  # forward order, every dtype and layout of a layer together
        for op, shape, conv, layer in layers:
            for dtype in args.dtypes:
                for layout in args.layouts:
                    for training in (True, False):
                        yield Case(op, shape, DTYPES[dtype], layout, training,
                                   conv=conv), layer
        return
    for op in args.ops:
        for dtype in args.dtypes:
            for layout in args.layouts:
                for o, shape, _, _ in layers:
                    if o != op:
                        continue
                    for training in (True, False):
                        yield Case(op, shape, DTYPES[dtype], layout, training), None


def _backends(args) -> list[str]:
    device = torch.device(args.device)
    backends = args.backend or [b for b in resnet_fast.available_backends(device)
                                if b != "reference"]
    for b in backends:
        reason = resnet_fast.unavailable_reason(b, device)
        if reason is not None:
            raise UsageError(f"backend {b!r} is not available on {device}: {reason}")
    return backends


def verify_ops(args) -> int:
    device = torch.device(args.device)
    backends = _backends(args)
    header = (f"{'op':25} {'backend':8} {'dtype':9} {'layout':13} {'shape':15} {'mode':5} "
              f"{'quantity':22} {'max err':>9} {'eager err':>9} {'result':6}")
    print(header)
    print("-" * len(header))
    rows, failed = [], 0
    for backend in backends:
        for case, layer in _cases(args, backend):
            res = check_case(case, backend, device, seed=args.seed)
            q = res.worst
            ok = res.passed
            failed += not ok
            where = "" if layer is None else (
                f" {layer}" + (f" {case.conv.describe()}" if case.op == "conv_bn_relu" else ""))
            print(f"{case.op:25} {backend:8} {str(case.dtype)[6:]:9} {case.layout:13} "
                  f"{'x'.join(map(str, case.shape)):15} {'train' if case.training else 'eval':5} "
                  f"{q:22} {res.errors[q]:9.2e} {res.eager_errors[q]:9.2e} "
                  f"{'pass' if ok else 'FAIL':6}{where}"
                  + (f" (mean of {res.draws} draws)" if res.draws > 1 else ""), flush=True)
            rows.append(dict(op=case.op, backend=backend, dtype=str(case.dtype)[6:],
                             layout=case.layout, shape=list(case.shape),
                             training=case.training, passed=ok, errors=res.errors,
                             eager_errors=res.eager_errors, bounds=res.bounds,
                             draws=res.draws))
            if layer is not None:
                rows[-1]["layer"] = layer
                if case.conv is not None and case.op == "conv_bn_relu":
                    rows[-1]["conv"] = case.conv.describe()
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


def load_model(spec: str) -> nn.Module:
    """The module ``module.callable()`` of ``spec`` = ``'module:callable'`` builds; bad input is
    a UsageError."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any import error is bad input
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        build = module
        for part in name.split("."):
            build = getattr(build, part)
    except AttributeError:
        raise UsageError(f"--model {spec!r}: module {module_name!r} has no {name!r}") from None
    if not callable(build):
        raise UsageError(f"--model {spec!r}: {name!r} is not callable")
    try:
        model = build()
    except Exception as exc:
        raise UsageError(f"--model {spec!r}: calling {name}() failed "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r}: {name}() returned a {type(model).__name__}, not a "
                         f"torch.nn.Module")
    return model


def parse_input(text: str) -> tuple[int, int, int, int]:
    """``'2x3x224x224'`` -> (2, 3, 224, 224): an ``N x C x H x W`` batch, N >= 2."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input {text!r} is not a shape; expected NxCxHxW, e.g. "
                         f"2x3x224x224") from None
    if len(shape) != 4:
        raise UsageError(f"--input {text!r} has rank {len(shape)}; expected 4 (NxCxHxW, e.g. "
                         f"2x3x224x224)")
    if shape[0] < 2 or min(shape) < 1:
        raise UsageError(f"--input {text!r}: every size must be positive and N >= 2 "
                         f"(BatchNorm trains on the batch)")
    return shape


def _fused_modules(model: nn.Module) -> list[str]:
    """The names of the modules of ``model`` that run fused: class-swapped blocks and stems and
    modules with a dataflow plan, the outermost ones only for nested ones."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, FusedModule) or isinstance(vars(m).get("forward"), FusedForward)]
    return [n for n in names if n and not any(n.startswith(o + ".") for o in names if o)]


def _step(model: nn.Module, x: torch.Tensor, layers: list[str], train: bool,
          grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` and the quantities of one step of ``model`` on ``x``: eval
    logits, or the training loss, gradients and buffers."""
    found, modules = {}, dict(model.named_modules())

    def record(name):
        def hook(module, args, output):  # returns None: the output is kept as it is
            if isinstance(output, torch.Tensor):
                found.setdefault(name, output.detach().clone())
        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in layers]
    model.train(train)
    model.zero_grad(set_to_none=True)
    try:
        with torch.set_grad_enabled(train):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"the model returned a {type(out).__name__}; verify needs a tensor")
    mode = "train" if train else "eval"
    result = {f"{n} ({mode})": v for n, v in found.items()}
    if not train:
        result["logits (eval)"] = out.detach()
        return result
    loss = (out.double() * grad_out.to(out.device)).sum()
    loss.backward()
    result["loss (train)"] = loss.detach()
    result.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    result.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return result


def _compare(fused: dict, eager: dict, ref: dict, dtype: torch.dtype) -> dict[str, tuple]:
    """quantity -> (error, eager error, bound, passed) under the tolerance policy
    (:func:`resnet_fast.verify.compare`)."""
    errors, eager_errors, bounds = compare(ref, eager, fused, dtype)
    return {name: (errors[name], eager_errors[name], bounds[name], errors[name] <= bounds[name])
            for name in ref}


def _summarise(rows: dict[str, tuple], prefix: str, label: str) -> dict[str, tuple]:
    """``rows`` with every quantity starting with ``prefix`` replaced by the worst of them."""
    group = {k: v for k, v in rows.items() if k.startswith(prefix)}
    if not group:
        return rows
    worst = max(group, key=lambda k: (not group[k][3], group[k][0] / max(group[k][2], 1e-300)))
    out = {k: v for k, v in rows.items() if k not in group}
    out[f"{label} ({len(group)}, worst: {worst[len(prefix):]})"] = group[worst][:3] + (
        all(v[3] for v in group.values()),)
    return out


def verify_model(args) -> int:
    """``verify --model module:callable``: the whole model, converted, against itself."""
    device = torch.device(args.device)
    backends = _backends(args)
    shape = parse_input(args.input or "2x3x224x224")
    for layout in args.layouts:
        if layout not in ("contiguous", "channels_last"):
            raise UsageError(f"--layouts {layout} is for the op checks; --model "
                             f"module:callable takes contiguous, channels_last")
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    master = torch.randn(shape, generator=generator, dtype=torch.float64)
    table, failed = [], 0
    print(f"{'backend':8} {'dtype':9} {'layout':13} {'quantity':60} {'max err':>9} "
          f"{'eager err':>9} {'bound':>9} {'result':6}")
    for backend in backends:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for layout in args.layouts:
                eager = copy.deepcopy(model).to(device=device, dtype=dtype)
                ref = copy.deepcopy(eager).double()
                fused = copy.deepcopy(eager)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    resnet_fast.convert(fused, backend=backend)
                if layout == "channels_last":
                    eager, fused = (m.to(memory_format=torch.channels_last) for m in (eager,
                                                                                      fused))
                x = master.to(device=device, dtype=dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                layers = _fused_modules(fused)
                out_shape = eager.eval()(x).shape
                grad_out = torch.randn(out_shape, generator=generator, dtype=torch.float64)
                results = {}
                total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                            for m in fused.modules())
                shares = []
                for train in (False, True):
                    r = _step(ref, x.double(), layers, train, grad_out)
                    e = _step(eager, x, layers, train, grad_out)
                    with eager_batch_norms(fused) as unfused:
                        f = _step(fused, x, layers, train, grad_out)
                    shares.append(f"{total - len(unfused)}/{total} in "
                                  f"{'training' if train else 'eval'}")
                    results.update(_compare(f, e, r, dtype))
                results = _summarise(results, "grad ", "gradients")
                results = _summarise(results, "buffer ", "running statistics")
                for w in caught:
                    print(f"convert: {w.message}")
                print(f"{args.model}: {', '.join(layers) or 'no module'} fused; BatchNorm "
                      f"layers inside fused ops: {', '.join(shares)}")
                for name, (err, eager_err, bound, ok) in results.items():
                    failed += not ok
                    print(f"{backend:8} {dtype_name:9} {layout:13} {name:60} {err:9.2e} "
                          f"{eager_err:9.2e} {bound:9.2e} {'pass' if ok else 'FAIL':6}",
                          flush=True)
                    table.append(dict(model=args.model, backend=backend, dtype=dtype_name,
                                      layout=layout, quantity=name, error=err,
                                      eager_error=eager_err, bound=bound, passed=ok))
    print(f"\n{len(table) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 1 if failed else 0


def _model_argument(value: str) -> str:
    if ":" in value or value in MODELS:
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                     f"{', '.join(MODELS)}, or module:callable)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--backend", nargs="+", default=None, choices=list(resnet_fast.BACKENDS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="default: float32 bfloat16; float32 with --model module:callable")
    p.add_argument("--layouts", nargs="+", default=None, choices=list(LAYOUTS),
                   help="default: contiguous channels_last; contiguous with --model "
                   "module:callable")
    p.add_argument("--shapes", type=int, default=4, help="number of random shapes")
    p.add_argument("--model", default=None, type=_model_argument,
                   help=f"check the shapes of this model's layers ({', '.join(MODELS)}) "
                   "instead of random ones, or, as module:callable, the whole model that "
                   "callable builds, converted")
    p.add_argument("--input", default=None,
                   help="NxCxHxW input of --model module:callable (default 2x3x224x224)")
    p.add_argument("--batch", type=int, default=2, help="batch of --model's input (default 2)")
    p.add_argument("--size", type=int, default=64,
                   help="side of --model's input (default 64; under 64: the small-input stem)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.model and ":" in args.model:
        args.dtypes = args.dtypes or ["float32"]
        args.layouts = args.layouts or ["contiguous"]
        return verify_model(args)
    if args.input is not None:
        raise UsageError("--input is for --model module:callable; a builtin model "
                         "takes --batch and --size")
    args.dtypes = args.dtypes or ["float32", "bfloat16"]
    args.layouts = args.layouts or ["contiguous", "channels_last"]
    if args.model and (args.batch < 2 or args.size < 8):
        raise UsageError(f"verify --model needs --batch >= 2 (BatchNorm trains on the "
                         f"batch) and --size >= 8; got --batch {args.batch} --size "
                         f"{args.size}")
    return verify_ops(args)
