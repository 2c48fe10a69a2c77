"""Benchmark of the fused BatchNorm + ReLU and BatchNorm + add + ReLU ops.

Providers, all measured in the same run on the same inputs: ``eager`` (F.batch_norm, add, relu
as separate ops), ``compile`` (torch.compile of that eager code, default mode, compiled afresh
after ``torch._dynamo.reset()`` for every shape, op and mode; ``recompiles`` counts its
compilations after the first call), every resnet_fast kernel backend available on the
device (``cpu``; ``triton``, ``cuda``) and ``fused``, resnet_fast's default backend as a user
calls it: with measured dispatch (:mod:`resnet_fast.dispatch`) the fastest of the backends and
ATen's sequence, timed in the first untimed call (``RESNET_FAST_AUTOTUNE=0``: the static
table).

Shape sets: ``resnet50``, the BatchNorm layers of ResNet-50 (batch 32 at 64x64 input on the
CPU, batch 256 at 224x224 on a GPU), over which the summary takes its geometric means, and
``extra``, one large shape ResNet-50 does not have (256 channels at half the input size),
summarised apart; ``--shapes`` gives a ``custom`` set instead. Modes: ``train`` (forward + backward, the default),
``fwd`` (training forward), ``bwd`` (backward only), ``eval`` (forward with running statistics).

Timing (:mod:`resnet_fast.timing`): per (layout, shape, op, mode) the providers get
``--warmup`` untimed calls, then ``--reps`` rounds each measuring every provider once (at least
``--min-run-time`` seconds of calls) in a freshly shuffled order. Each row gives the median
time over the rounds, GB/s computed from the bytes the fused algorithm must move
(``bytes_moved``), and the ratio to eager. A ``roofline`` row per shape gives the time those
bytes take in plain streaming passes measured in the same run: a reduction read
(``torch.sum``) and an elementwise read + write (``torch.mul(out=)``) of the same tensor, and
on CUDA also a device-to-device copy, the bandwidth ceiling. A ``roofline_fresh`` row gives the
same bound with every write going to a newly allocated tensor (``torch.mul`` without ``out=``),
as any op that returns its outputs must: on the CPU a fresh allocation of more than a few MB is
fresh pages, which the OS zeroes on first touch.

    python benchmarks/bench_bn_act.py                 # CPU, float32, both layouts
    python benchmarks/bench_bn_act.py --device cuda   # bf16, channels_last, batch 256
    python benchmarks/bench_bn_act.py --quick --out /tmp/bn   # 3 small shapes: a smoke test

Results: a printed table, and CSV + JSON (+ a PNG plot when matplotlib is installed) under
``benchmarks/results/`` (``--out``), named ``bn_act_<device>`` (``--tag``); the JSON's
``provenance`` records the device, versions, commit, command line and timing settings, and every
row names the device, torch version, commit, dtype, layout, shape set and shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import resnet_fast
from resnet_fast import functional, reference
from resnet_fast.timing import (compiled, fmt_cell, interleave, provenance, pyplot,
                                recompiles_of, row_provenance, save_figure, time_stats,
                                write_result_files)

from _common import RESULTS, bn_shape_sets, geomean, run_name

OPS = ("batch_norm_relu", "batch_norm_add_relu")
MODES = ("train", "fwd", "bwd", "eval")


# Passes over activation-sized tensors the fused algorithm makes, per op and mode:
# (tensors read by reductions, tensors read by elementwise passes, tensors written).
def passes(op: str, mode: str) -> tuple[int, int, int]:
    res = 1 if op == "batch_norm_add_relu" else 0
    fwd_train = (1, 1 + res, 1)
    fwd_eval = (0, 1 + res, 1)
    bwd = (2 + res, 2 + res, 1 + res)  # reads dy, x (and r for the mask); writes dx (and dr)
    if mode == "fwd":
        return fwd_train
    if mode == "eval":
        return fwd_eval
    if mode == "bwd":
        return bwd
    return tuple(a + b for a, b in zip(fwd_train, bwd))


def make_inputs(shape, dtype, memory_format, device, op):
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    t = {
        "x": x.requires_grad_(),
        "r": (torch.randn(shape, device=device, dtype=dtype)
              .contiguous(memory_format=memory_format).requires_grad_()
              if op == "batch_norm_add_relu" else None),
        "w": (torch.rand(C, device=device) + 0.5).requires_grad_(),
        "b": torch.randn(C, device=device).requires_grad_(),
        "rm": torch.zeros(C, device=device),
        "rv": torch.ones(C, device=device),
    }
    t["g"] = torch.randn_like(x)
    return t


def provider_fn(provider: str, op: str):
    """fn(t, training) -> output, for one provider (``compile``: a fresh
    :func:`resnet_fast.timing.compiled`, which counts its recompiles)."""
    if provider in ("eager", "compile"):
        ref = getattr(reference, op)

        def eager(t, training):
            args = (t["x"], t["r"]) if t["r"] is not None else (t["x"],)
            return ref(*args, t["rm"], t["rv"], t["w"], t["b"], training)

        return compiled(eager) if provider == "compile" else eager
    fused = getattr(functional, op)
    backend = None if provider == "fused" else provider

    def run(t, training):
        args = (t["x"], t["r"]) if t["r"] is not None else (t["x"],)
        return fused(*args, t["rm"], t["rv"], t["w"], t["b"], training, backend=backend)

    return run


def work(fn, t, mode):
    """The timed call of one provider in one mode."""
    params = [p for p in (t["x"], t["r"], t["w"], t["b"]) if p is not None]
    if mode in ("eval", "fwd"):
        def forward():
            with torch.no_grad():
                return fn(t, mode == "fwd")
        return forward
    if mode == "bwd":
        # The graph is built once and replayed; its running statistics are its own, since the
        # other providers' forwards update the shared ones in place (a saved one would then be
        # stale when this graph runs backward).
        y = fn({**t, "rm": t["rm"].clone(), "rv": t["rv"].clone()}, True)
        return lambda: torch.autograd.grad(y, params, t["g"], retain_graph=True)
    return lambda: torch.autograd.grad(fn(t, True), params, t["g"])


def streaming_times(x: torch.Tensor, timing: dict) -> dict[str, float]:
    """Medians of a reduction read and an elementwise read + write of ``x``, into a preallocated
    and into a fresh output (and a copy on CUDA), interleaved."""
    out = torch.empty_like(x)
    passes = {"read": lambda: torch.sum(x),
              "read_write": lambda: torch.mul(x, 2.0, out=out),
              "read_write_fresh": lambda: torch.mul(x, 2.0)}
    if x.device.type == "cuda":
        passes["copy"] = lambda: out.copy_(x)
    return {k: statistics.median(v) for k, v in interleave(passes, **timing).items()}


QUICK = dict(shapes="8x64x16x16;8x256x8x8;8x512x4x4", layouts="channels_last", reps=3,
             min_run_time=0.01)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layouts", default=None,
                   help="comma-separated: channels_last,contiguous (default: both on CPU, "
                        "channels_last on CUDA)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--modes", default="train", help=f"comma-separated from {','.join(MODES)}")
    p.add_argument("--providers", default=None,
                   help="comma-separated (default: eager, compile, every available backend and "
                        "fused)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image", type=int, default=None, help="input image size the shapes follow")
    p.add_argument("--shapes", default=None, help="e.g. 32x256x32x32;8x64x16x16 (overrides)")
    p.add_argument("--reps", type=int, default=None,
                   help="rounds, each measuring every provider once (default: 7 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per provider first (default: 3 CPU, 10 CUDA)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds each measurement runs at least (default: 0.05 CPU, 0.1 CUDA)")
    p.add_argument("--quick", action="store_true",
                   help=f"shapes {QUICK['shapes']}, channels_last, {QUICK['reps']} rounds, no "
                        "torch.compile: a smoke test")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None, help="file name suffix (default: device kind)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    quick = QUICK if args.quick else {}
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    layouts = (args.layouts or quick.get("layouts")
               or ("channels_last" if gpu else "channels_last,contiguous")).split(",")
    batch = args.batch or (256 if gpu else 32)
    image = args.image or (224 if gpu else 64)
    spec = args.shapes or quick.get("shapes")
    sets = ({"custom": [tuple(int(v) for v in s.split("x")) for s in spec.split(";")]} if spec
            else bn_shape_sets(batch, image))
    backends = [b for b in resnet_fast.available_backends(device) if b != "reference"]
    if args.quick:  # neither torch.compile (its compilations take minutes) nor Triton's interpreter
        backends = [b for b in backends if gpu or b != "triton"]
    default = ["eager", *backends, "fused"] if args.quick else [
        "eager", "compile", *backends, "fused"]
    providers = args.providers.split(",") if args.providers else default
    reps = args.reps or quick.get("reps") or (20 if gpu else 7)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    min_run_time = args.min_run_time if args.min_run_time is not None else (
        quick.get("min_run_time") or (0.1 if gpu else 0.05))
    timing = dict(rounds=reps, device=device, warmup=warmup, min_run_time=min_run_time)
    prov = provenance(device, warmup, reps, min_run_time=min_run_time)
    elem = torch.empty((), dtype=dtype).element_size()

    rows = []
    for layout in layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for shape_set, shapes in sets.items():
            for shape in shapes:
                numel = shape[0] * shape[1] * shape[2] * shape[3]
                stream = streaming_times(
                    torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt),
                    timing)
                for op in args.ops.split(","):
                    t = make_inputs(shape, dtype, fmt, device, op)
                    for mode in args.modes.split(","):
                        new = measure_case(t, op, mode, providers, stream, numel * elem, timing,
                                           dict(row_provenance(prov),
                                                dtype=str(dtype).replace("torch.", ""),
                                                layout=layout, shape_set=shape_set,
                                                shape="x".join(map(str, shape)), op=op,
                                                mode=mode))
                        print_rows(new, header=not rows)
                        rows += new

    write_results(rows, Path(args.out), run_name(args.tag, device), prov)
    return 0


def measure_case(t, op, mode, providers, stream, tensor_bytes, timing, base) -> list[dict]:
    """The rows of one (layout, shape, op, mode): every provider, interleaved, and the rooflines
    (and on CUDA the copy bandwidth) of the bytes the fused algorithm must move."""
    n_red, n_read, n_write = passes(op, mode)
    moved = (n_red + n_read + n_write) * tensor_bytes
    bound, bound_fresh = (n_red * stream["read"] + n_write * stream[rw]
                          + (n_read - n_write) * stream["read"]
                          for rw in ("read_write", "read_write_fresh"))
    fns = {provider: provider_fn(provider, op) for provider in providers}
    measured = interleave({q: work(fn, t, mode) for q, fn in fns.items()}, **timing)
    eager = statistics.median(measured["eager"]) if "eager" in measured else None
    base = dict(base, bytes_moved=moved)
    rows = []
    for provider, times in measured.items():
        stats = time_stats(times)
        med = stats["median_ms"] / 1e3
        rows.append(dict(base, provider=provider, **stats, gbps=moved / med / 1e9,
                         vs_eager=(eager / med) if eager else None,
                         vs_roofline=med / bound, vs_roofline_fresh=med / bound_fresh,
                         recompiles=recompiles_of(fns[provider])))
    for name, t_bound in (("roofline", bound), ("roofline_fresh", bound_fresh)):
        rows.append(dict(base, provider=name, median_ms=t_bound * 1e3, min_ms=None, max_ms=None,
                         reps=None, gbps=moved / t_bound / 1e9,
                         vs_eager=(eager / t_bound) if eager else None,
                         vs_roofline=t_bound / bound, vs_roofline_fresh=t_bound / bound_fresh,
                         recompiles=None))
    if "copy" in stream:
        copy_gbps = 2 * tensor_bytes / stream["copy"] / 1e9
        rows.append(dict(base, provider="copy", median_ms=moved / copy_gbps / 1e6, min_ms=None,
                         max_ms=None, reps=None, gbps=copy_gbps, vs_eager=None,
                         vs_roofline=None, vs_roofline_fresh=None, recompiles=None))
    return rows


COLUMNS = ("layout", "shape", "op", "mode", "provider", "median_ms", "gbps", "vs_eager",
           "vs_roofline", "vs_roofline_fresh", "recompiles")


def print_rows(rows, header=False):
    widths = (13, 16, 19, 5, 14, 10, 8, 8, 11, 17, 10)
    if header:
        print(" ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for row in rows:
        print(" ".join(fmt_cell(row[c]).ljust(w) for c, w in zip(COLUMNS, widths)), flush=True)


def summarize(rows) -> list[dict]:
    """Per (shape set, layout, op, mode, provider): geometric mean of vs_eager over the set's
    shapes, the worst shape's vs_eager, the worst ratios to the two rooflines and the most
    recompiles (``torch.compile``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["provider"] in ("roofline", "roofline_fresh", "copy", "eager"):
            continue
        key = (r["shape_set"], r["layout"], r["op"], r["mode"], r["provider"])
        groups.setdefault(key, []).append(r)
    out = []
    for (shape_set, layout, op, mode, provider), rs in groups.items():
        ratios = [r["vs_eager"] for r in rs]
        recompiles = [r["recompiles"] for r in rs if r["recompiles"] is not None]
        out.append(dict(shape_set=shape_set, shapes=len(rs), layout=layout, op=op, mode=mode,
                        provider=provider, geomean_vs_eager=geomean(ratios),
                        min_vs_eager=min(ratios),
                        max_vs_roofline=max(r["vs_roofline"] for r in rs),
                        max_vs_roofline_fresh=max(r["vs_roofline_fresh"] for r in rs),
                        max_recompiles=max(recompiles) if recompiles else None))
    return out


def write_results(rows, out: Path, tag: str, prov: dict) -> None:
    stem = out / f"bn_act_{tag}"
    summary = summarize(rows)
    paths = write_result_files(stem, rows, prov, {"summary": summary, "rows": rows}, plot)
    print("\nsummary per shape set (geometric mean over its shapes of the speed-up vs eager; "
          "worst shape; worst time / roofline, and / roofline with fresh outputs)")
    for s in summary:
        print(f"  {s['shape_set']:8} {s['layout']:13} {s['op']:19} {s['mode']:5} "
              f"{s['provider']:8} geomean {s['geomean_vs_eager']:.2f}x  "
              f"min {s['min_vs_eager']:.2f}x  roofline {s['max_vs_roofline']:.2f}x  "
              f"fresh {s['max_vs_roofline_fresh']:.2f}x")
    print(f"\nwrote {stem}.csv, .json" + (", .png" if "png" in paths else ""))


def plot(rows, path: Path, prov: dict) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    panels = sorted({(r["layout"], r["op"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (layout, op, mode) in zip(axes[:, 0], panels):
        sel = [r for r in rows if (r["layout"], r["op"], r["mode"]) == (layout, op, mode)]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        for provider in dict.fromkeys(r["provider"] for r in sel):
            if provider in ("eager", "copy"):
                continue
            ys = [next((r["vs_eager"] for r in sel
                        if r["shape"] == s and r["provider"] == provider), None) for s in shapes]
            ax.plot(range(len(shapes)), ys, marker="o",
                    linestyle="--" if provider.startswith("roofline") else "-", label=provider)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs eager")
        ax.set_title(f"{op} {mode} {layout} {sel[0]['dtype']} on {prov['device']}",
                     fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


if __name__ == "__main__":
    sys.exit(main())
