"""Command line: ``python -m resnet_fast {verify,info,bench,train}`` (also ``resnet-fast``).

Each command lives in :mod:`resnet_fast.cli`: ``verify`` checks the fused ops (or a model's
fused layers) against the float64 reference (:mod:`resnet_fast.cli.verify`), ``info`` prints
versions, devices, backends and the build of ``resnet_fast._C``, ``bench`` benchmarks whole
models (``--ops``: the per-op benchmarks), ``train`` trains a ResNet on the fused ops. Bad input
is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from resnet_fast.cli import OneLineParser, UsageError


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m resnet_fast" if name in ("", "__main__.py", "-c") else name


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from resnet_fast.cli import bench, info, train, verify

    parser = OneLineParser(prog=_prog(), description="resnet_fast: fused conv/BatchNorm/ReLU "
                           "kernels for ResNets. Bad input exits with status 2.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every fused op against the float64 reference")
    verify.add_arguments(v)
    i = sub.add_parser("info", help="versions, devices, backends and build flags")
    info.add_arguments(i)
    b = sub.add_parser("bench", help="images/s and memory of whole models: fused, eager, "
                       "torch.compile (--ops: the per-op benchmarks)")
    bench.add_arguments(b, bench.load_bench_model() if bench.wants_bench(argv) else None)
    t = sub.add_parser("train", help="train a ResNet on the fused ops (digits, fake, an image "
                       "folder or CIFAR; in one or several processes), optionally beside the "
                       "eager model")
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
        from resnet_fast.cli import bench, info, train, verify

        return {"verify": verify.run, "info": info.run, "bench": bench.run,
                "train": train.run}[args.command](args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
