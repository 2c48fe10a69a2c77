"""Host cost of resnet_fast's fused calls: layers so small that the kernels take microseconds,
so what is measured is the per-call cost of the Python entry points, the op dispatch, the
autograd functions and (``fused``) the measured-dispatch lookup.

Cases, each a training forward + backward (every gradient), on one thread:

``conv_bn_relu``      2x8x4x4 input, 3x3 conv 8->8 (padding 1) + BatchNorm + ReLU;
``batch_norm_relu``   32x512x2x2, the smallest BatchNorm shape of ``bench_bn_act.py``;
``batch_norm_add_relu`` the same shape with the residual add.

Providers, as ``bench_conv_bn_act.py`` and ``bench_bn_act.py`` define them (their tensors and
calls are used here): ``eager`` (``resnet_fast.reference``: ATen's ops, as eager PyTorch runs
the modules), ``cpu`` (the fused op with ``backend="cpu"``) and ``fused`` (the default backend:
measured dispatch, tuned in the untimed first call). Timing:
:func:`resnet_fast.timing.interleave` (``torch.utils.benchmark.Timer.blocked_autorange``,
providers interleaved in a shuffled order); the ratios are taken on the minima, the host cost's
floor on a shared machine.

    python benchmarks/bench_host_cost.py          # writes benchmarks/results/host_cost_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from resnet_fast.timing import interleave, provenance, time_stats, write_json

import bench_bn_act
import bench_conv_bn_act
from _common import RESULTS

PROVIDERS = ("eager", "cpu", "fused")
# The conv case as a bench_conv_bn_act layer: 8 -> 8 channels, 3x3, stride 1, 4x4 input.
TINY_CONV = bench_conv_bn_act.Layer(name="tiny", network="host", cin=8, cout=8, kernel=3,
                                    stride=1, size=4)
BN_SHAPE = (32, 512, 2, 2)


def case_call(case: str, provider: str, device: torch.device):
    """The timed training forward + backward of one provider for one case, built by the
    benchmark of its op (its tensors, its provider call)."""
    if case == "conv_bn_relu":
        t = bench_conv_bn_act.make_tensors(TINY_CONV, 2, torch.float32, torch.channels_last,
                                           device, with_prev=False)
        call, _, _, _ = bench_conv_bn_act.prepare(provider, TINY_CONV, "train", t, device)
        return call
    t = bench_bn_act.make_inputs(BN_SHAPE, torch.float32, torch.channels_last, device, case)
    return bench_bn_act.work(bench_bn_act.provider_fn(provider, case), t, "train")


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
        calls = {q: case_call(case, q, device) for q in PROVIDERS}
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
