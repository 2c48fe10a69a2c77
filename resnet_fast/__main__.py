"""Command line: ``python -m resnet_fast {verify,info,bench,train}`` (also ``resnet-fast``).

``verify`` checks every registered fused op with every backend available on the device against
the float64 reference, on random shapes (odd ones included), in each dtype and layout, in
training and eval, and prints one row per case: op, backend, dtype, layout, shape, mode, the
largest error against float64 (the quantity nearest its bound), eager's error on that quantity,
and pass/fail under the tolerance policy (README). Exit status 1 on any failure, 2 on bad usage.
``verify --model resnet50`` checks the shapes of that model's layers instead of random ones:
each conv + BatchNorm (+ residual) (+ ReLU) as ``conv_bn_relu`` with the layer's own conv, and
each BatchNorm (+ add) + ReLU as the matching BatchNorm op, at ``--batch`` and ``--size``.

``info`` prints versions, devices, backends and the build of ``resnet_fast._C``; ``bench``
benchmarks whole models (``--ops``: the per-op benchmarks); ``train`` trains a ResNet on the
fused ops (see :mod:`resnet_fast.cli`). Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

import resnet_fast
from resnet_fast.cli import MODELS, OneLineParser, UsageError
from resnet_fast.verify import LAYOUTS, OPS, Case, Conv, check_case

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
    from resnet_fast import reference

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = getattr(reference, name)(small_input=size < 64)
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
              if isinstance(m, (reference.BasicBlock, reference.Bottleneck))}
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
        last = block is not None and leaf == ("conv3" if isinstance(block, reference.Bottleneck)
                                              else "conv2")
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


def verify(args) -> int:
    device = torch.device(args.device)
    backends = args.backend or [b for b in resnet_fast.available_backends(device)
                                if b != "reference"]
    for b in backends:
        reason = resnet_fast.unavailable_reason(b, device)
        if reason is not None:
            print(f"error: backend {b!r} is not available on {device}: {reason}",
                  file=sys.stderr)
            return 2
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
                  f"{'pass' if ok else 'FAIL':6}{where}", flush=True)
            rows.append(dict(op=case.op, backend=backend, dtype=str(case.dtype)[6:],
                             layout=case.layout, shape=list(case.shape),
                             training=case.training, passed=ok, errors=res.errors,
                             eager_errors=res.eager_errors, bounds=res.bounds))
            if layer is not None:
                rows[-1]["layer"] = layer
                if case.conv is not None and case.op == "conv_bn_relu":
                    rows[-1]["conv"] = case.conv.describe()
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m resnet_fast" if name in ("", "__main__.py", "-c") else name


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from resnet_fast.cli import bench, info, train

    parser = OneLineParser(prog=_prog(), description="resnet_fast: fused conv/BatchNorm/ReLU "
                           "kernels for ResNets. Bad input exits with status 2.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every fused op against the float64 reference")
    v.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    v.add_argument("--backend", nargs="+", default=None, choices=list(resnet_fast.BACKENDS))
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    v.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=list(DTYPES))
    v.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                   choices=list(LAYOUTS))
    v.add_argument("--shapes", type=int, default=4, help="number of random shapes")
    v.add_argument("--model", default=None, choices=MODELS,
                   help="check the shapes of this model's layers instead of random ones")
    v.add_argument("--batch", type=int, default=2, help="batch of --model's input (default 2)")
    v.add_argument("--size", type=int, default=64,
                   help="side of --model's input (default 64; under 64: the small-input stem)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", default=None, help="also write the rows to this file")

    i = sub.add_parser("info", help="versions, devices, backends and build flags")
    info.add_arguments(i)
    b = sub.add_parser("bench", help="images/s and memory of whole models: fused, eager, "
                       "torch.compile (--ops: the per-op benchmarks)")
    bench.add_arguments(b, bench.load_bench_model() if bench.wants_bench(argv) else None)
    t = sub.add_parser("train", help="train a ResNet on the fused ops (digits, fake, or an "
                       "image folder), optionally beside the eager model")
    train.add_arguments(t)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except UsageError as exc:  # bench without the repository's benchmarks/
        print(f"{_prog()}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            if args.device == "cuda" and not torch.cuda.is_available():
                print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
                return 2
            if args.model and (args.batch < 2 or args.size < 8):
                raise UsageError(f"verify --model needs --batch >= 2 (BatchNorm trains on the "
                                 f"batch) and --size >= 8; got --batch {args.batch} --size "
                                 f"{args.size}")
            return verify(args)
        from resnet_fast.cli import bench, info, train

        return {"info": info.run, "bench": bench.run, "train": train.run}[args.command](args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
