"""Command line: ``python -m resnet_fast verify``.

``verify`` checks every registered fused op with every backend available on the device against
the float64 reference, on random shapes (odd ones included), in each dtype and layout, in
training and eval, and prints one row per case: op, backend, dtype, layout, shape, mode, the
largest error against float64 (the quantity nearest its bound), eager's error on that quantity,
and pass/fail under the tolerance policy (README). Exit status 1 on any failure, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch

import resnet_fast
from resnet_fast.verify import LAYOUTS, OPS, Case, check_case

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


def _cases(args, backend):
    shapes = random_shapes(args.shapes, args.seed)
    if backend == "triton" and args.device == "cpu":
        # Triton's interpreter runs Python per program: small shapes only.
        shapes = [s for s in shapes if s[0] * s[1] * s[2] * s[3] <= 4096]
    for op in args.ops:
        for dtype in args.dtypes:
            for layout in args.layouts:
                for shape in shapes:
                    for training in (True, False):
                        yield Case(op, shape, DTYPES[dtype], layout, training)


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
        for case in _cases(args, backend):
            res = check_case(case, backend, device, seed=args.seed)
            q = res.worst
            ok = res.passed
            failed += not ok
            print(f"{case.op:25} {backend:8} {str(case.dtype)[6:]:9} {case.layout:13} "
                  f"{'x'.join(map(str, case.shape)):15} {'train' if case.training else 'eval':5} "
                  f"{q:22} {res.errors[q]:9.2e} {res.eager_errors[q]:9.2e} "
                  f"{'pass' if ok else 'FAIL':6}", flush=True)
            rows.append(dict(op=case.op, backend=backend, dtype=str(case.dtype)[6:],
                             layout=case.layout, shape=list(case.shape),
                             training=case.training, passed=ok, errors=res.errors,
                             eager_errors=res.eager_errors, bounds=res.bounds))
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_fast")
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
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    return verify(args)


if __name__ == "__main__":
    sys.exit(main())
