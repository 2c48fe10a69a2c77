"""Benchmark of synchronised BatchNorm: a DDP training step of a CIFAR ResNet-18 on gloo.

Two processes on this machine (gloo, loopback, one intra-op thread each), each with its own
batch, run one DDP training step (forward, cross-entropy loss, backward, SGD step; the step of
``bench_model.py``) of ``resnet18(small_input=True)`` with three kinds of BatchNorm, all from
the same weights:

* ``fused_sync``: :class:`resnet_fast.SyncBatchNorm` in the fused model
  (``norm_layer=nn.SyncBatchNorm``): one all-gather per BatchNorm in forward, one all_reduce
  in backward, the BatchNorm (+ add) + ReLU in the fused kernels;
* ``reference_sync``: the eager model with each BatchNorm running
  :func:`resnet_fast.reference.sync_batch_norm` (plain ops and all_reduce), the ground truth;
* ``fused_local``: the fused model with unsynchronised BatchNorms (each process's statistics),
  the cost the synchronisation adds to.

Timing (:mod:`resnet_fast.timing`): after ``--warmup`` steps of each, ``--reps`` rounds each
time one step of every case in an order shuffled afresh each round (the same seed, so the same
order, in both processes), both processes starting each measurement together (a barrier; on
the CPU each timed step follows one untimed one, torch's Timer estimating its block size); the
minimum and the median over the rounds of rank 0's times are reported, with the ratios of the
minima. Targets: ``fused_sync`` at most
1.15x ``fused_local`` and at least 1.2x faster than ``reference_sync``.

    .venv/bin/python benchmarks/bench_sync_bn.py             # batch 64 per process, 32x32
    .venv/bin/python benchmarks/bench_sync_bn.py --reps 3 --batch 16

Results: a printed table and ``benchmarks/results/sync_bn_cpu.json`` (provenance: device,
versions, commit, command line; settings, rows).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import resnet_fast as rf
from resnet_fast import models, reference
from resnet_fast.cli.train_dist import free_port
from resnet_fast.model_bench import Settings, step_fn
from resnet_fast.timing import fmt_cell, interleave, provenance, write_json

from _common import RESULTS

WORLD = 2
CASES = ("fused_sync", "reference_sync", "fused_local")
TARGETS = {"fused_sync / fused_local": ("<=", 1.15), "reference_sync / fused_sync": (">=", 1.2)}


def _model(case: str, num_classes: int) -> nn.Module:
    kwargs = dict(small_input=True, num_classes=num_classes)
    if case == "fused_sync":
        return models.resnet18(norm_layer=nn.SyncBatchNorm, **kwargs)
    if case == "fused_local":
        return models.resnet18(**kwargs)
    model = rf.convert_sync_batchnorm(reference.resnet18(**kwargs))
    for m in model.modules():
        if isinstance(m, rf.SyncBatchNorm):
            m.set_backend("reference")
    return model


def _worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        torch.manual_seed(0)
        state = reference.resnet18(small_input=True, num_classes=10).state_dict()
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        steps = {}
        for case in CASES:
            model = _model(case, 10)
            model.load_state_dict(state)
            model = model.to(memory_format=fmt)
            ddp = nn.parallel.DistributedDataParallel(model)
            steps[case] = step_fn(ddp, model, "train", x, y, Settings())
        # min_run_time 0: one timed step per measurement in either process, whatever its speed
        times = interleave(steps, args.reps, device=torch.device("cpu"), warmup=args.warmup,
                           before=dist.barrier)
        if rank == 0:
            out.update(times)
    finally:
        dist.destroy_process_group()



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="images per process (default 64)")
    p.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    p.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "sync_bn_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as every process runs: the provenance records it
    prov = provenance(torch.device("cpu"), args.warmup, args.reps, processes=WORLD)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), args, out), nprocs=WORLD)
        times = dict(out)
    best = {case: min(t) for case, t in times.items()}
    rows = [{"case": case, "min_ms": 1e3 * best[case],
             "median_ms": 1e3 * statistics.median(times[case]),
             "vs_fused_local": best[case] / best["fused_local"],
             "vs_fused_sync": best[case] / best["fused_sync"]} for case in CASES]
    ratios = {"fused_sync / fused_local": best["fused_sync"] / best["fused_local"],
              "reference_sync / fused_sync": best["reference_sync"] / best["fused_sync"]}
    met = {name: (ratios[name] <= bound if op == "<=" else ratios[name] >= bound)
           for name, (op, bound) in TARGETS.items()}
    print(" | ".join(f"{k:>14}" for k in rows[0]))
    for row in rows:
        print(" | ".join(f"{fmt_cell(v):>14}" for v in row.values()))
    for name, (op, bound) in TARGETS.items():
        print(f"{name} = {ratios[name]:.3f} (target {op} {bound}): "
              f"{'met' if met[name] else 'NOT met'}")
    write_json(args.out, prov, {
        "benchmark": "DDP training step (fwd + bwd + SGD), resnet18(small_input=True), "
                     f"{WORLD} gloo processes",
        "settings": {"batch_per_process": args.batch, "size": args.size,
                     "layout": args.layout, "warmup": args.warmup, "reps": args.reps,
                     "threads_per_process": 1},
        "rows": rows, "ratios": ratios,
        "targets": {name: f"{op} {bound}" for name, (op, bound) in TARGETS.items()},
        "met": met, "times_s": times})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
