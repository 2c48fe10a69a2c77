"""Host cost of resnet_fast's fused calls: layers so small that the kernels take microseconds,
so what is measured is the per-call cost of the Python entry points, the op dispatch, the
autograd functions and (``fused``) the measured-dispatch lookup.

Cases, each a training forward + backward (every gradient), on one thread:

``conv_bn_relu``      2x8x4x4 input, 3x3 conv 8->8 (padding 1) + BatchNorm + ReLU;
``batch_norm_relu``   32x512x2x2, the smallest BatchNorm shape of ``bench_bn_act.py``;
``batch_norm_add_relu`` the same shape with the residual add.

Providers: ``eager`` (``resnet_fast.reference``: ATen's ops, as eager PyTorch runs the
modules), ``cpu`` (the fused op with ``backend="cpu"``) and ``fused`` (the default backend:
measured dispatch, tuned in the untimed warm-up). Timing: :func:`resnet_fast.timing.interleave`
(``torch.utils.benchmark.Timer.blocked_autorange``, providers interleaved in a shuffled order);
the ratios are taken on the minima, the host cost's floor on a shared machine.

    python benchmarks/bench_host_cost.py          # writes benchmarks/results/host_cost_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from resnet_fast import functional, reference
from resnet_fast.timing import interleave, provenance, time_stats, write_json

from _common import RESULTS

PROVIDERS = ("eager", "cpu", "fused")


def case_call(case: str, provider: str):
    """fn() -> output of one provider for one case, and the tensors its backward gives
    gradients of."""
    g = torch.Generator().manual_seed(0)
    if case == "conv_bn_relu":
        x = torch.randn(2, 8, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(8, 8, 3, 3, generator=g) / 8).contiguous(
            memory_format=torch.channels_last)
    else:
        x = torch.randn(32, 512, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)
        w = None
    C = x.shape[1]
    r = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last) \
        if case == "batch_norm_add_relu" else None
    bw, bb = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    rm, rv = torch.zeros(C), torch.ones(C)
    leaves = [t.requires_grad_() for t in (x, w, bw, bb, r) if t is not None]
    kwargs = {} if provider == "eager" else {"backend": None if provider == "fused" else provider}
    module = reference if provider == "eager" else functional
    if case == "conv_bn_relu":
        def fn():
            return module.conv_bn_relu(x, w, rm, rv, bw, bb, True, padding=1, **kwargs)
    else:
        args = (x, r) if r is not None else (x,)

        def fn():
            return getattr(module, case)(*args, rm, rv, bw, bb, True, **kwargs)
    grad = torch.randn(fn().shape, generator=g).contiguous(memory_format=torch.channels_last)
    return lambda: torch.autograd.grad(fn(), leaves, grad)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-run-time", type=float, default=0.05)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.environ.setdefault("RESNET_FAST_CACHE_DIR", tempfile.mkdtemp())  # a cold, private cache
    torch.set_num_threads(1)
    device = torch.device("cpu")
    prov = provenance(device, args.warmup, args.rounds, min_run_time=args.min_run_time)
    rows = []
    for case in ("conv_bn_relu", "batch_norm_relu", "batch_norm_add_relu"):
        calls = {q: case_call(case, q) for q in PROVIDERS}
        times = interleave(calls, args.rounds, device=device, warmup=args.warmup,
                           min_run_time=args.min_run_time)
        eager_min = min(times["eager"])
        for q in PROVIDERS:
            stats = time_stats(times[q])
            rows.append(dict(case=case, provider=q, min_us=stats["min_ms"] * 1e3,
                             median_us=stats["median_ms"] * 1e3,
                             vs_eager=min(times[q]) / eager_min))
            print(f"{case:20} {q:6} min {rows[-1]['min_us']:7.1f} us  median "
                  f"{rows[-1]['median_us']:7.1f} us  {rows[-1]['vs_eager']:.2f}x eager's time",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "host_cost_cpu.json", prov, {"rows": rows})
    print(f"wrote {out / 'host_cost_cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
