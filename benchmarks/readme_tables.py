"""The result tables of README.md, generated from the committed files in benchmarks/results/.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results -->`` in README.md and
ends with the files it was made from and their provenance: the commit, torch version, load
average and command line that file records, or "not recorded" for a file written before the
benchmarks recorded it. A GPU result measured at a commit after which ``csrc/cuda`` or
``resnet_fast/triton`` changed (``git log COMMIT..HEAD -- csrc/cuda resnet_fast/triton``) says
so. Nothing is measured here.

    python benchmarks/readme_tables.py           # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check   # exit 1 if README.md differs from the files
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

from resnet_fast.timing import git

from _common import RESULTS, bn_shape_sets, geomean

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)
GPU_CODE = ("csrc/cuda", "resnet_fast/triton")
# The first words of the sentence a GPU result gets when the GPU code changed after it ran.
GPU_CHANGED = "Measured at commit"


def load(results: Path, name: str) -> dict:
    """A result file: JSON as written; a CSV as ``{"rows": [...]}`` with the provenance of its
    JSON twin when it has one."""
    path = results / name
    if path.suffix != ".csv":
        return json.loads(path.read_text())
    with open(path, newline="") as f:
        data = {"rows": list(csv.DictReader(f))}
    twin = path.with_suffix(".json")
    if twin.is_file():
        data["provenance"] = json.loads(twin.read_text()).get("provenance")
    return data


def gpu_code_changed_since(commit: str) -> Optional[bool]:
    """Whether ``git log commit..HEAD`` touches the GPU code; None where git cannot tell (no
    git, not a checkout, or the commit is not in this clone's history, as in a shallow one)."""
    if git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    log = git("log", "--oneline", f"{commit}..HEAD", "--", *GPU_CODE)
    return None if log is None else bool(log)


def provenance_line(name: str, data: dict) -> str:
    """Where one file's numbers come from, as recorded in it."""
    prov = data.get("provenance")
    if prov is None:
        return (f"`benchmarks/results/{name}`: provenance not recorded (written before the "
                "benchmarks recorded commit, command line and load).")
    commit = (prov["commit"] or "not recorded")[:12]
    dirty = " with uncommitted changes" if prov.get("dirty") else ""
    load_avg = prov.get("loadavg_at_start")
    text = (f"`benchmarks/results/{name}`: commit {commit}{dirty}, torch {prov['torch']}, "
            f"{prov['device']}, {prov['warmup']} warm-up calls and {prov['reps']} rounds per "
            "provider, load average "
            + (f"{load_avg[0]:.2f}" if load_avg else "not recorded")
            + f" at the start; `{' '.join(prov['command'])}`.")
    if prov.get("device_kind") == "cuda" and prov["commit"]:
        if gpu_code_changed_since(prov["commit"]):
            text += (f" {GPU_CHANGED} {commit}; the GPU code has changed since "
                     f"(`git log {commit}..HEAD -- {' '.join(GPU_CODE)}`).")
    return text


def table(head: list[str], rows: list[list[str]], grouped: int) -> str:
    """A Markdown table; in the first ``grouped`` columns a cell that repeats the one above
    (with everything left of it) is left blank."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    above: list[str] = []
    for r in rows:
        shown = ["" if r[:j + 1] == above[:j + 1] and j < grouped else c
                 for j, c in enumerate(r)]
        lines.append("| " + " | ".join(shown) + " |")
        above = r
    return "\n".join(lines)


def x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _shape_set(row: dict, rows: list[dict]) -> str:
    """The row's shape set; for a file written before rows named it, recomputed from the batch
    and the input size (ResNet-50's largest 64-channel BatchNorm is at half the input size)."""
    if "shape_set" in row:
        return row["shape_set"]
    shapes = [tuple(int(v) for v in r["shape"].split("x")) for r in rows]
    batch = shapes[0][0]
    image = 2 * max(s[2] for s in shapes if s[1] == 64)
    sets = bn_shape_sets(batch, image)
    shape = tuple(int(v) for v in row["shape"].split("x"))
    return next((name for name, members in sets.items() if shape in members), "custom")


def bn_act_table(results: Path) -> tuple[str, list[str]]:
    """Training-step speed-up over eager per (device, layout, op, backend): the geometric mean
    over ResNet-50's BatchNorm shapes, the worst of them, torch.compile's geometric mean, and
    the extra shape apart."""
    files = [f for f in ("bn_act_cuda.json", "bn_act_cpu.json") if (results / f).is_file()]
    out = []
    for name in files:
        data = load(results, name)
        rows = [r for r in data["rows"] if r["mode"] == "train"]
        first = rows[0]
        label = f"{first['device']}, {first['dtype']}, batch {first['shape'].split('x')[0]}"
        for layout in dict.fromkeys(r["layout"] for r in rows):
            for op in dict.fromkeys(r["op"] for r in rows):
                sel = [r for r in rows if r["layout"] == layout and r["op"] == op]
                by = {}
                for r in sel:
                    by.setdefault((r["provider"], _shape_set(r, data["rows"])), []).append(r)
                compile_geo = geomean([r["vs_eager"] for r in by.get(("compile", "resnet50"),
                                                                     [])])
                backends = [q for q in dict.fromkeys(r["provider"] for r in sel)
                            if q not in ("eager", "compile", "roofline", "roofline_fresh",
                                         "copy")]
                for backend in backends:
                    ratios = [r["vs_eager"] for r in by[(backend, "resnet50")]]
                    extra = by.get((backend, "extra"), [])
                    out.append([f"{label}, {layout}", OP_NAMES.get(op, op), f"`{backend}`",
                                x(geomean(ratios)), x(min(ratios)), x(compile_geo),
                                ", ".join(f"{x(r['vs_eager'])} at {r['shape']}" for r in extra)
                                or "-"])
    head = ["device, dtype, batch, layout", "op", "resnet_fast", "geomean", "worst",
            "`torch.compile` geomean", "extra shape (not in the geomean)"]
    return table(head, out, grouped=2), files


OP_NAMES = {"batch_norm_relu": "BN + ReLU", "batch_norm_add_relu": "BN + add + ReLU"}


def conv_table(results: Path) -> tuple[str, list[str]]:
    """Per mode and resnet_fast provider (the ``cpu`` backend; ``fused``, measured dispatch),
    the geometric mean speed-up over every conv layer measured (weighted by how often each
    occurs) against each baseline, and the worst layer's against eager."""
    name = "conv_bn_act_cpu.json"
    data = load(results, name)
    config = data["config"]
    what = {"eval": "eval (BatchNorm folded into oneDNN's conv)",
            "train": "training forward + backward",
            "train_deferred": "training, input deferred from the previous layer",
            "train (model)": "training as the model runs each layer"}
    out = []
    for mode in what:
        for s in data["summary"]:
            if (s["network"], s["mode"]) == ("all", mode) and s["provider"] in ("cpu", "fused"):
                out.append([what[mode], f"`{s['provider']}`", x(s["vs_eager"]),
                            x(s["vs_best_eager"]), x(s["vs_compile"]),
                            x(s["vs_best_baseline"]), x(s.get("worst_vs_eager"))])
    first = data["rows"][0]
    head = [f"{first['device']}, {config['dtype']}, {config['layout']}, batch "
            f"{config['batch']} at {config['image']}x{config['image']}: mode", "resnet_fast",
            "vs eager", "vs faster eager layout", "vs `torch.compile`", "vs fastest of the three",
            "worst layer vs eager"]
    return table(head, out, grouped=1), [name]


def model_table(results: Path, name: str) -> tuple[str, list[str]]:
    """Images/s of a whole model (the result file ``name``) per (mode, layout) and provider,
    the fused speed-up over eager in that layout and over the fastest other provider of the
    mode (eager in either layout, ``torch.compile``), and the activation bytes saved for
    backward."""
    data = load(results, name)
    rows = data["rows"]
    out = []
    fastest = {}  # mode -> the least median time of a provider other than resnet_fast's
    for r in rows:
        if r["provider"] in ("eager", "compile") and r["median_ms"] is not None:
            fastest[r["mode"]] = min(fastest.get(r["mode"], r["median_ms"]), r["median_ms"])
    for mode, layout in dict.fromkeys((r["mode"], r["layout"]) for r in rows):
        sel = {r["provider"]: r for r in rows if (r["mode"], r["layout"]) == (mode, layout)}

        def ips(q):
            r = sel.get(q)
            return "-" if r is None or r["images_per_s"] is None else (
                f"{r['images_per_s']:.1f} ({r['spread_pct']:.0f}%)")

        fused, eager = sel.get("fused"), sel.get("eager")
        saved = ""
        if mode == "train" and fused and eager and fused["saved_activation_mb"]:
            saved = (f"{fused['saved_activation_mb']:.1f} MiB vs eager's "
                     f"{eager['saved_activation_mb']:.1f} MiB")
        best = fastest.get(mode)
        vs_best = (best / fused["median_ms"] if fused and fused["median_ms"] and best
                   else None)
        out.append([{"train": "training step", "eval": "eval"}[mode],
                    layout.replace("contiguous", "NCHW"), ips("eager"), ips("compile"),
                    ips("fused"), x(fused and fused["vs_eager"]), x(vs_best), saved])
    r0 = rows[0]
    head = [f"{r0['model']}, {r0['device']}, {r0['dtype']}, batch {r0['batch']} at "
            f"{r0['size']}, median of {r0['reps']}: mode", "layout", "eager img/s (spread)",
            "`torch.compile`", "resnet_fast", "vs eager", "vs the fastest other",
            "saved for backward (activations)"]
    return table(head, out, grouped=1), [name]


def kernel_bandwidth_table(results: Path) -> tuple[str, list[str]]:
    """Per GPU and backend: the median and the lowest fraction of the device copy bandwidth at
    which its BatchNorm kernels move their bytes."""
    files = sorted(p.name for p in results.glob("kernel_bandwidth_*.csv"))
    out = []
    for name in files:
        rows = load(results, name)["rows"]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pct = [float(r["pct_copy"]) for r in rows if r["backend"] == backend]
            shapes = len({r["shape"] for r in rows if r["backend"] == backend})
            out.append([rows[0]["device"], f"{float(rows[0]['copy_gbps']) / 1e3:.1f} TB/s",
                        f"`{backend}`", f"{len(pct)} kernels, {shapes} shapes",
                        f"{statistics.median(pct):.0f}%", f"{min(pct):.0f}%"])
    head = ["device", "device copy (read + write)", "backend", "measured", "median of copy",
            "lowest"]
    return table(head, out, grouped=2), files


TABLES: dict[str, Callable[[Path], tuple[str, list[str]]]] = {
    "bn_act": bn_act_table,
    "conv_bn_act_cpu": conv_table,
    "model_cpu": functools.partial(model_table, name="model_cpu_resnet50.json"),
    "model_cpu_cifar_resnet18": functools.partial(model_table,
                                                  name="model_cpu_cifar_resnet18.json"),
    "model_cpu_cifar_resnet18_bf16": functools.partial(
        model_table, name="model_cpu_cifar_resnet18_bf16.json"),
    "model_cpu_resnet50_224": functools.partial(model_table, name="model_cpu_resnet50_224.json"),
    "kernel_bandwidth": kernel_bandwidth_table,
}


def render(name: str, results: Path = RESULTS) -> str:
    """The text between the markers of table ``name``: the table, then each source file's
    provenance."""
    body, files = TABLES[name](results)
    sources = "\n".join(f"Source: {provenance_line(f, load(results, f))}" for f in files)
    return f"{body}\n\n{sources}\n"


def regenerate(readme: str, results: Path = RESULTS) -> str:
    """``readme`` with every marked table made again from ``results``."""
    def block(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"README.md: unknown results table {m.group(2)!r}; known: "
                             f"{', '.join(TABLES)}")
        return m.group(1) + render(m.group(2), results) + m.group(4)
    return BLOCK.sub(block, readme)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when README.md differs from the result files")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = regenerate(text, args.results)
    if args.check:
        if new != text:
            print(f"{args.readme}: result tables differ from {args.results}; run "
                  "python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"rewrote the result tables of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
