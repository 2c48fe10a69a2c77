"""``python -m resnet_fast info``: versions, devices, backends and how resnet_fast._C was built.

Prints one ``key: value`` line per item: the versions of Python, torch, Triton and resnet_fast;
the CPU and every visible GPU; per device, each backend as available (the default marked) or
unavailable with the reason (:func:`resnet_fast.unavailable_reason`); the compiled extension's
path, build flags (its non-callable attributes, e.g. ``with_cuda``) and kernels; and the
environment variables that change the choice of backend. ``--json`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from resnet_fast.timing import cpu_name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the information to this file ('-' for stdout only)")


def collect() -> dict:
    import torch

    import resnet_fast
    from resnet_fast import backends
    from resnet_fast._extension import load_extension

    info: dict = {}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": str(torch.version.cuda) if torch.version.cuda else "none (CPU-only build)",
        "triton": triton_version,
        "resnet_fast": resnet_fast.__version__,
    }
    info["cpu"] = {"name": cpu_name(), "cores": os.cpu_count(),
                   "torch threads": torch.get_num_threads()}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": prop.name,
                         "capability": f"{prop.major}.{prop.minor}",
                         "memory GiB": round(prop.total_memory / 2**30, 1)})
    info["gpus"] = gpus

    devices = {}
    for device in ("cpu", "cuda"):
        no_device = None
        if device == "cuda" and not torch.cuda.is_available():
            no_device = ("torch sees no CUDA device" + (" (CPU-only torch build)"
                                                        if torch.version.cuda is None else ""))
        rows = {}
        for name in backends.BACKENDS:
            reason = backends.unavailable_reason(name, device)
            if reason is None:
                reason = no_device
            rows[name] = "available" if reason is None else f"unavailable: {reason}"
        # The default of backend=None ($RESNET_FAST_BACKEND aside): the first available one.
        default = None if no_device else backends.available_backends(device)[0]
        devices[device] = {"default": default, "backends": rows}
    info["backends"] = devices

    ext: dict = {}
    try:
        C = load_extension()
    except ImportError as exc:
        ext["error"] = f"cannot import resnet_fast._C: {exc}"
    else:
        ext["path"] = getattr(C, "__file__", None)
        flags, kernels = {}, []
        for name in sorted(dir(C)):
            if name.startswith("__"):
                continue
            value = getattr(C, name)
            if callable(value):
                kernels.append(name)
            elif isinstance(value, (bool, int, float, str)):
                flags[name] = value
        ext["flags"] = flags
        ext["kernels"] = kernels
    info["extension"] = ext
    info["environment"] = {k: os.environ.get(k) for k in (backends.ENV_VAR, "TRITON_INTERPRET",
                                                          "CUDA_VISIBLE_DEVICES")}
    return info


def _print(info: dict) -> None:
    def line(key, value, indent=0):
        print(f"{' ' * indent}{key + ':':<{24 - indent}} {value}")

    print("versions")
    for k, v in info["versions"].items():
        line(k, v, 2)
    print("devices")
    cpu = info["cpu"]
    line("cpu", f"{cpu['name']} ({cpu['cores']} cores, torch uses {cpu['torch threads']} "
         "threads)", 2)
    if not info["gpus"]:
        line("gpu", "none visible to torch", 2)
    for g in info["gpus"]:
        line(f"gpu {g['index']}", f"{g['name']} (compute capability {g['capability']}, "
             f"{g['memory GiB']} GiB)", 2)
    print("backends (per device; the default marked *)")
    for device, d in info["backends"].items():
        print(f"  {device}")
        for name, status in d["backends"].items():
            mark = "*" if name == d["default"] else " "
            line(f"{mark} {name}", status, 4)
    print("extension resnet_fast._C")
    ext = info["extension"]
    if "error" in ext:
        line("error", ext["error"], 2)
    else:
        line("path", ext["path"], 2)
        for k, v in ext["flags"].items():
            line(k, v, 2)
        line("kernels", ", ".join(ext["kernels"]) or "none", 2)
    print("environment")
    for k, v in info["environment"].items():
        line(k, "(unset)" if v is None else v, 2)


def run(args) -> int:
    info = collect()
    if args.json == "-":
        json.dump(info, sys.stdout, indent=1)
        print()
        return 0
    _print(info)
    if args.json:
        from resnet_fast.cli import UsageError

        try:
            with open(args.json, "w") as f:
                json.dump(info, f, indent=1)
        except OSError as exc:
            raise UsageError(f"cannot write {args.json!r}: {exc.strerror or exc}") from None
    return 0
