"""The outputs of ``python -m resnet_fast train`` in ``--out``: ``history.csv`` (one row per
step and model), ``summary.json`` (settings, final test accuracy and images/s of each model,
fused/eager ratios) and ``loss_curve.png`` (with matplotlib), and the summary it prints.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from resnet_fast.timing import pyplot, save_figure

if TYPE_CHECKING:
    from resnet_fast.cli.train_config import Config


def write_outputs(runs: list, out: Path, cfg: Config, device: str, backend: str,
                  world: int) -> None:
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "epoch", "loss", "accuracy", "lr", "images_per_s"])
        for r in runs:
            for h in r.history:
                w.writerow([r.name, h["step"], h["epoch"], h["loss"], h["accuracy"], h["lr"],
                            h["images_per_s"]])
    summary = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in dataclasses.asdict(cfg).items()},
               "device": device, "processes": world, "global_batch": cfg.batch * world,
               "fused_backend": backend, "steps": len(runs[0].history),
               "runs": {}}
    for r in runs:
        last = r.tests[-1] if r.tests else None
        summary["runs"][r.name] = {
            "model": "resnet_fast.models" if r.name == "fused" else "resnet_fast.reference",
            "final_test_accuracy": last["accuracy"] if last else None,
            "final_test_loss": last["loss"] if last else None,
            "final_train_loss": r.history[-1]["loss"] if r.history else None,
            "images_per_s": r.images_per_s(), "tests": r.tests}
    lines = []
    for r in runs:
        s = summary["runs"][r.name]
        acc = (f"final test accuracy {s['final_test_accuracy']:.1%} (loss "
               f"{s['final_test_loss']:.4f})" if s["final_test_accuracy"] is not None
               else "not evaluated")
        ips = f"{s['images_per_s']:.1f} images/s" if s["images_per_s"] else "images/s n/a"
        what = f"{s['model']}, backend {backend}" if r.name == "fused" else s["model"]
        lines.append(f"  {r.name:5} ({what}): {acc}, {ips}")
    if len(runs) > 1:
        f_ips, e_ips = runs[0].images_per_s(), runs[1].images_per_s()
        ratio = f_ips / e_ips if f_ips and e_ips else None
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(runs[0].history, runs[1].history)]
        summary["images_per_s_ratio_fused_vs_eager"] = ratio
        summary["max_train_loss_difference"] = max(diffs) if diffs else None
        summary["first_step_loss_difference"] = diffs[0] if diffs else None
        lines.append("  fused / eager images/s: " + (f"{ratio:.2f}x" if ratio else "n/a"))
        if diffs:
            lines.append(f"  training loss, |fused - eager|: first step {diffs[0]:.2e}, "
                         f"largest {max(diffs):.2e}")
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    written = ["history.csv", "summary.json"]
    if plot(runs, out / "loss_curve.png", cfg, world):
        written.append("loss_curve.png")
    print("summary\n" + "\n".join(lines))
    print(f"wrote {', '.join(str(out / w) for w in written)}")


def plot(runs: list, path: Path, cfg: Config, world: int) -> bool:
    plt = pyplot()
    if plt is None or not runs[0].history:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps = [h["step"] for h in r.history]
        losses = [h["loss"] for h in r.history]
        ax.plot(steps, losses, label=f"{r.name} (train loss)", linewidth=1,
                linestyle="-" if r.name == "fused" else "--")
        if r.tests:
            ax.plot([t["step"] for t in r.tests], [t["loss"] for t in r.tests], marker="o",
                    linestyle="none", label=f"{r.name} (test loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    batch = f"{cfg.batch}" if world == 1 else f"{cfg.batch} x {world} processes"
    ax.set_title(f"{cfg.model} on {cfg.data}, batch {batch}, lr {cfg.lr} ({cfg.schedule})",
                 fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True

