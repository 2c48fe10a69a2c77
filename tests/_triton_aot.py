"""Ahead-of-time compilation helpers shared by the Triton kernel tests (no GPU needed).

A kernel launch is recorded as (kernel, arguments, constexprs); ``_compile_spec`` turns it into
the signature Triton's launcher would specialise, the test compiles it with ``triton.compile``
for an sm_80 or sm_90 target, and ``_resource_usage`` reads the cubin's registers, stack, shared
memory and local (spill) memory with the ``cuobjdump`` that Triton bundles.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
              torch.float64: "fp64"}


def _compile_spec(kernel, args, constexprs):
    """(signature, constexprs, attrs) as Triton's launcher specialises them: integers equal to
    1 become constants, pointers and integers divisible by 16 carry tt.divisibility."""
    signature, consts, attrs = {}, {}, {}
    values = list(args) + [constexprs[n] for n in kernel.arg_names[len(args):]]
    for i, (name, value) in enumerate(zip(kernel.arg_names, values)):
        if name in constexprs or (type(value) is int and value == 1):
            signature[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp64"  # annotated tl.float64 in the kernels
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _cuobjdump():
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else shutil.which("cuobjdump")


def _resource_usage(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert usage, text
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, usage.groups())))


def aot_reports_of(script: str, archs) -> dict:
    """{arch: report}: ``python script ARCH`` run once per arch, all at once, without
    TRITON_INTERPRET (so Triton compiles instead of interpreting); each run prints its report
    as one JSON line last."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    procs = {arch: subprocess.Popen([sys.executable, script, str(arch)], cwd=root, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in archs}
    reports = {}
    for arch, proc in procs.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, f"sm_{arch} compile process failed:\n{err[-4000:]}"
        reports[arch] = json.loads(out.strip().splitlines()[-1])
    return reports
