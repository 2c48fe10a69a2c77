"""The CUTLASS conv kernels (csrc/cuda/conv_bn_act_kernels.cu) compile with nvcc against the
nvidia-cutlass package's headers without a warning, a register spill, a stack frame or local
memory; they include no torch header; every conv kernel runs its MMAs on the tensor cores (HMMA
in the SASS). (tests/test_cuda_compile.py parses its torch binding.)

No GPU is needed. The file is compiled once per session (module-scoped fixture), for sm_80
only: it instantiates four CUTLASS kernels (float16/bfloat16, with and without the input
prologue), about 30 s and 600 MB per target on a 2-core machine, and the sm_90 build differs
only in ptxas's register allocation (setup.py builds both). Skipped without nvcc or without the
CUTLASS headers.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_cuda_compile import NVCC, TORCH_HEADER  # nvcc as found there; torch includes

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILE = CSRC / "cuda" / "conv_bn_act_kernels.cu"
HEADERS = [CSRC / "cuda" / "conv_bn_act_kernels.cuh"]
ARCH = 80
# The kernels of the file: conv_bn_act_kernel<ConvBnActKernel<element, prologue>> and the merge.
CONV_KERNELS = {
    ("half_t", False), ("half_t", True), ("bfloat16_t", False), ("bfloat16_t", True),
}


def _find_cutlass_include():
    """The nvidia-cutlass package's headers, found as setup.py finds them."""
    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        include = Path(location) / "source" / "include"
        if (include / "cutlass" / "cutlass.h").is_file():
            return str(include)
    return None


def _find_cuobjdump():
    """Triton's bundled cuobjdump, else the CUDA toolkit's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    if NVCC is not None:
        toolkit = Path(NVCC).parent / "cuobjdump"
        if toolkit.is_file():
            return str(toolkit)
    return shutil.which("cuobjdump")


CUTLASS_INCLUDE = _find_cutlass_include()
CUOBJDUMP = _find_cuobjdump()
needs_toolchain = pytest.mark.skipif(
    NVCC is None or CUTLASS_INCLUDE is None,
    reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH) or no CUTLASS headers "
           "(pip install nvidia-cutlass==4.2.0.0)")
needs_cuobjdump = pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (Triton's or CUDA's)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(returncode, nvcc + ptxas output, path of the object file) of one sm_80 compile."""
    out_dir = tmp_path_factory.mktemp("cutlass_sm80")
    obj = out_dir / "conv_bn_act_kernels.o"
    cmd = [
        NVCC, "-c", str(CU_FILE), "-o", str(obj),
        "-O3", "-std=c++17", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}",
        "-I", str(CSRC), "-isystem", CUTLASS_INCLUDE,
        "-Xptxas", "-v", "-Werror", "all-warnings",
        "-Xcompiler", "-Wall,-Wextra,-Werror",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir)
    return proc.returncode, proc.stdout + proc.stderr, obj


def _conv_kernel_key(mangled: str):
    """(element, prologue) of a conv kernel's mangled name, None for another function."""
    if "ConvBnActKernel" not in mangled:
        return None
    element = "bfloat16_t" if "bfloat16_t" in mangled else "half_t"
    m = re.search(r"_tELb([01])E", mangled)
    return element, m is not None and m.group(1) == "1"


def _objdump(compiled, *args):
    """cuobjdump's output for the object file of ``compiled``, whose compile must succeed."""
    returncode, output, obj = compiled
    assert returncode == 0, output[-4000:]
    proc = subprocess.run([CUOBJDUMP, *args, str(obj)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_kernels_include_no_torch_header():
    for path in [CU_FILE] + HEADERS:
        hits = TORCH_HEADER.findall(path.read_text())
        assert not hits, f"{path.name} includes torch headers ({hits}); kernels must be torch-free"


@needs_toolchain
def test_compiles_without_warnings(compiled):
    returncode, output, _ = compiled
    assert returncode == 0, f"nvcc failed for {CU_FILE.name} sm_{ARCH}:\n{output[-4000:]}"
    warnings = [line for line in output.splitlines() if re.search(r"\bwarning\b", line, re.I)]
    assert not warnings, "\n".join(warnings[:20])


@needs_toolchain
def test_no_spills_in_ptxas_report(compiled):
    returncode, output, _ = compiled
    assert returncode == 0, output[-4000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                        r"loads", output)
    assert len(frames) >= len(CONV_KERNELS) + 1, output[-2000:]
    assert all(f == ("0", "0", "0") for f in frames), output[-4000:]


@needs_toolchain
@needs_cuobjdump
def test_resource_usage_no_stack_no_local(compiled):
    report = _objdump(compiled, "--dump-resource-usage")
    functions = re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)",
                           report)
    conv = {_conv_kernel_key(name) for name, _ in functions} - {None}
    assert conv == CONV_KERNELS, f"expected the four conv kernels, got {conv}:\n{report}"
    assert any("merge_tile_statistics" in name for name, _ in functions), report
    for name, usage in functions:
        fields = dict(item.split(":") for item in usage.split())
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", f"{name}: {usage}"
        assert int(fields["REG"]) <= 255, f"{name}: {usage}"


@needs_toolchain
@needs_cuobjdump
def test_conv_kernels_use_tensor_cores(compiled):
    sass = _objdump(compiled, "-sass")
    # Split the listing into functions: "Function : <mangled name>" starts each.
    sections = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    found = {}
    for name, body in zip(sections[1::2], sections[2::2]):
        key = _conv_kernel_key(name)
        if key is not None:
            found[key] = body
    assert set(found) == CONV_KERNELS, sorted(found)
    for (element, prologue), body in found.items():
        expected = "HMMA.16816.F32.BF16" if element == "bfloat16_t" else "HMMA.16816.F32"
        assert expected in body, f"no {expected} in the {element} kernel (prologue={prologue})"
