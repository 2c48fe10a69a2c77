"""Per-kernel bandwidth of the GPU BatchNorm (+ add) + ReLU kernels against a device copy.

For each GPU backend (triton, cuda), residual mode and ResNet-50 BN shape (batch 256, bf16,
channels_last), runs the training forward, the eval forward and the backward under
torch.profiler and prints every kernel's device time and the fraction of the copy bandwidth
(bytes read + written by a large device-to-device copy, measured in the same run) at which it
moves the bytes its role must move:

    statistics (training forward)  reads x (and r when the residual is BatchNorm'ed)
    apply (forward, train or eval) reads x (and r), writes y
    backward sums                  reads dy, x (and r)
    backward apply                 reads dy, x (and r), writes dx (and dr)

The kernel times come from the profiler (the only way to split an op into its kernels); the
copy bandwidth is timed by :mod:`resnet_fast.timing` (``triton.testing.do_bench``).

    python benchmarks/kernel_bandwidth.py [--out DIR]

Writes ``kernel_bandwidth_<device>.csv`` under benchmarks/results/ (or --out), each row naming
the device, torch version and commit, and its JSON twin ``kernel_bandwidth_<device>.json``
(``provenance``: device, versions, commit, command line; the same rows).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from resnet_fast import ops
from resnet_fast.timing import alone, provenance, row_provenance, write_csv, write_json

SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7)]
MODES = {"none": (False, False), "add": (True, False), "bn": (True, True)}
ITERS = 10

# Kernel name patterns of each role, for both backends' naming.
ROLES = [
    ("backward sums", re.compile(r"(bwd|backward).*(sum|reduce)", re.I)),
    ("backward apply", re.compile(r"(bwd|backward).*apply", re.I)),
    ("statistics", re.compile(r"stat", re.I)),
    ("apply", re.compile(r"apply|eval", re.I)),
]


def role_of(name: str) -> str | None:
    for role, pattern in ROLES:
        if pattern.search(name):
            return role
    return None


def kernel_times(fn) -> dict[str, float]:
    """Mean device time (us) per launch of every kernel ``fn`` launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / e.count for e in prof.key_averages()
            if e.device_time_total > 0 and e.count > 0}


def copy_bandwidth() -> float:
    """GB/s (read + write) of a 1 GiB device-to-device copy, the median of 5 measurements."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = statistics.median(alone(lambda: dst.copy_(src), torch.device("cuda"), warmup=3,
                                      reps=5, min_run_time=0.1))
    return 2 * src.numel() / seconds / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="triton,cuda")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    prov = provenance(torch.device("cuda"), 3, ITERS)
    copy_gbps = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: device copy {copy_gbps:.0f} GB/s (read + write)")
    print(f"{'backend':7} {'shape':18} {'mode':5} {'pass':6} {'kernel role':15} {'us':>8} "
          f"{'GB/s':>6} {'%copy':>6}")
    rows = []
    for backend in args.backends.split(","):
        for shape in SHAPES:
            for mode, (has_res, res_bn) in MODES.items():
                C = shape[1]
                x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(
                    memory_format=torch.channels_last)
                r = torch.randn_like(x) if has_res else None
                w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
                rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
                rbn = dict(residual_weight=w.clone(), residual_bias=b.clone(),
                           residual_running_mean=rm.clone(), residual_running_var=rv.clone())
                if not res_bn:
                    rbn = dict.fromkeys(rbn)
                g = torch.randn_like(x)

                def forward(batch_stats):
                    return ops.bn_act(
                        input=x, weight=w, bias=b, running_mean=rm, running_var=rv,
                        num_batches_tracked=None, residual=r, **rbn,
                        residual_num_batches_tracked=None, residual_bn=res_bn,
                        batch_stats=batch_stats, momentum=0.1, eps=1e-5, relu=True,
                        backend=backend)

                stats = forward(True)[1]
                passes = {
                    "train": lambda: forward(True),
                    "eval": lambda: forward(False),
                    "bwd": lambda: ops.bn_act_backward(
                        grad_out=g, input=x, weight=w, bias=b, residual=r,
                        residual_weight=rbn["residual_weight"],
                        residual_bias=rbn["residual_bias"], save_stats=stats,
                        residual_bn=res_bn, batch_stats=True, relu=True, backend=backend),
                }
                E = x.numel() * x.element_size()
                n_in = 2 if has_res else 1
                bytes_of = {"statistics": E * (2 if res_bn else 1), "apply": E * (n_in + 1),
                            "backward sums": E * (1 + n_in),
                            "backward apply": E * (1 + n_in + n_in)}
                for label, fn in passes.items():
                    for name, us in kernel_times(fn).items():
                        role = role_of(name)
                        if role is None:
                            continue
                        gbps = bytes_of[role] / (us * 1e-6) / 1e9
                        row = dict(row_provenance(prov), backend=backend,
                                   shape="x".join(map(str, shape)),
                                   mode=mode, pass_=label, role=role, kernel=name[:80],
                                   us=round(us, 1), gbps=round(gbps), pct_copy=round(
                                       100 * gbps / copy_gbps, 1), copy_gbps=round(copy_gbps))
                        rows.append(row)
                        print(f"{backend:7} {row['shape']:18} {mode:5} {label:6} {role:15} "
                              f"{us:8.1f} {gbps:6.0f} {row['pct_copy']:6.1f}", flush=True)
                del x, r, g
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernel_bandwidth_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}"
    write_csv(stem.with_suffix(".csv"), rows)
    write_json(stem.with_suffix(".json"), prov, {"copy_gbps": copy_gbps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
