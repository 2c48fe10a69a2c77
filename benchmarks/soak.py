"""Soak: memory of a long run of fused training steps and eval calls with changing shapes.

A small ResNet (one BasicBlock per stage, CIFAR stem, channels_last) runs ``--steps`` training
steps (forward, backward, SGD) and ``--steps`` eval calls, the batch size and the input size
changing every call (batch 2-8, input 8x8 to 24x24), so every shape-keyed cache sees many keys.
After ``--warmup`` calls of each the resident set size (VmRSS) is taken as the baseline; the
report gives its growth to the end, its peak, and the size of every cache the package keeps
(``resnet_fast.backends.cache_sizes``), written to ``benchmarks/results/soak_<device>.json``.
``--eager`` runs the same loop on the eager reference model instead (``soak_<device>_eager``),
for what PyTorch's own caches (oneDNN's primitive cache, the allocator) take on their own.

    .venv/bin/python benchmarks/soak.py           # 3000 + 3000 calls, several minutes
    .venv/bin/python benchmarks/soak.py --eager
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import RESULTS, run_name
from resnet_fast import backends, models, reference
from resnet_fast.timing import provenance, write_json


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eager", action="store_true", help="the eager reference model")
    p.add_argument("--tag", default=None)
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prov = provenance(torch.device("cpu"), args.warmup, args.steps)
    torch.manual_seed(0)
    family = reference if args.eager else models
    model = family.ResNet(family.BasicBlock, [1, 1, 1, 1], num_classes=10,
                          small_input=True).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    samples, baseline = [], None
    for i in range(args.steps):
        batch = 2 + i % 7  # batch 1 cannot train a BatchNorm at the 1x1 last stage
        size = 8 + (i * 7) % 17
        x = torch.randn(batch, 3, size, size, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (batch,), generator=gen)
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            model(x)
        if i + 1 == args.warmup:
            baseline = rss_mb()
        if (i + 1) % 100 == 0:
            samples.append({"calls": i + 1, "rss_mb": round(rss_mb(), 1)})
    end = rss_mb()
    peak = max(s["rss_mb"] for s in samples)
    result = {
        "benchmark": "soak", "model": "eager reference" if args.eager else "resnet_fast",
        "training_steps": args.steps, "eval_calls": args.steps, "warmup": args.warmup,
        "rss_after_warmup_mb": round(baseline, 1), "rss_end_mb": round(end, 1),
        "rss_growth_mb": round(end - baseline, 1), "rss_peak_mb": round(peak, 1),
        "cache_sizes": backends.cache_sizes(), "rss_samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = run_name(args.tag, torch.device("cpu")) + ("_eager" if args.eager else "")
    path = args.out / f"soak_{name}.json"
    write_json(path, prov, result)
    print(f"{args.steps} training steps + {args.steps} eval calls: RSS {baseline:.1f} MB after "
          f"{args.warmup} warm-up calls, {end:.1f} MB at the end (growth "
          f"{end - baseline:+.1f} MB, peak {peak:.1f} MB); caches {result['cache_sizes']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
