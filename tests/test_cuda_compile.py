"""The CUDA kernels (csrc/cuda/*.cu) compile with nvcc alone, for sm_80 and sm_90, without a
warning, a register spill, a stack frame or local memory; they include no torch header; and the
torch binding at least parses against the installed torch's headers.

No GPU is needed: this is what can be checked of the CUDA backend on a CPU-only machine (its
math is checked through csrc/bn_act_math.h by the CPU kernels' tests). Skipped without nvcc.
"""

import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
# The CUTLASS conv kernels need CUTLASS's headers and take longer: tests/test_cutlass_compile.py.
CU_FILES = sorted(p for p in CUDA_DIR.glob("*.cu") if p.name != "conv_bn_act_kernels.cu")
ARCHS = (80, 90)
# The kernels' compile time dominates this module: one nvcc per (file, arch), two at a time.
COMPILE_WORKERS = 2
TORCH_HEADER = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.MULTILINE)


def _find_nvcc():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("nvcc")


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")


def _compile(cu_file, arch):
    """(returncode, nvcc + ptxas output) of compiling cu_file for sm_<arch> in a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            NVCC, "-c", str(cu_file), "-o", os.path.join(tmp, "kernels.o"),
            "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-I", str(CSRC), "-Xptxas", "-v", "-Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra,-Werror",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled():
    """{(file name, arch): (returncode, output)} for every .cu and arch, compiled in parallel."""
    jobs = [(cu, arch) for cu in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(COMPILE_WORKERS) as pool:
        results = list(pool.map(lambda job: _compile(*job), jobs))
    return {(cu.name, arch): result for (cu, arch), result in zip(jobs, results)}


def _ptxas_resources(output):
    """[(kernel, registers, stack bytes, spill store bytes, spill load bytes, lmem bytes)]."""
    kernels = []
    current = None
    for line in output.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = {"name": m.group(1)}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            lmem = re.search(r"(\d+) bytes lmem", line)
            current.update(registers=int(m.group(1)), lmem=int(lmem.group(1)) if lmem else 0)
            kernels.append(current)
            current = None
    return kernels


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("cu_file", [p.name for p in CU_FILES])
def test_kernels_include_no_torch_header(cu_file):
    sources = [CUDA_DIR / cu_file] + sorted(CUDA_DIR.glob("*.cuh"))
    for path in sources:
        hits = TORCH_HEADER.findall(path.read_text())
        assert not hits, f"{path.name} includes torch headers ({hits}); kernels must be torch-free"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu_file", [p.name for p in CU_FILES])
def test_kernels_compile_clean(compiled, cu_file, arch):
    returncode, output = compiled[(cu_file, arch)]
    assert returncode == 0, f"nvcc failed for {cu_file} sm_{arch}:\n{output[-4000:]}"
    warnings = [line for line in output.splitlines() if re.search(r"\bwarning\b", line, re.I)]
    assert not warnings, "\n".join(warnings[:20])
    kernels = _ptxas_resources(output)
    assert kernels, f"no ptxas resource report for {cu_file} sm_{arch}:\n{output[-2000:]}"
    bad = [k for k in kernels
           if k["stack"] or k["spill_stores"] or k["spill_loads"] or k["lmem"]]
    assert not bad, "kernels with stack frame / spills / local memory:\n" + "\n".join(
        f"{k['name']}: stack {k['stack']} B, spill stores {k['spill_stores']} B, "
        f"spill loads {k['spill_loads']} B, lmem {k['lmem']} B" for k in bad[:20])


def _torch_include_dirs():
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    return include_paths()


BINDING_SOURCES = ("cuda/bn_act_binding.cpp", "cuda/conv_bn_act_binding.cpp", "extension.cpp",
                   "op_kernels.cpp")


@pytest.fixture(scope="module")
def parsed_bindings():
    """``source -> (returncode, stderr)`` of parsing each binding against torch's headers, the
    compilers run side by side (each takes about 20 s)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    includes = _torch_include_dirs()
    cuda_include = Path(NVCC).parents[1] / "include" if NVCC else Path("/usr/local/cuda/include")
    if compiler is None or includes is None:
        pytest.skip("no C++ compiler or no torch")
    if not (Path(includes[0]) / "c10" / "cuda" / "CUDAGuard.h").is_file():
        pytest.skip("torch's headers have no c10/cuda")
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA runtime headers in {cuda_include}")
    cmd = [compiler, "-fsyntax-only", "-std=c++17", "-DRESNET_FAST_WITH_CUDA",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C",
           "-Wall", "-Wextra", "-Werror", "-I", str(CSRC)]
    for d in includes + [str(cuda_include), sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", d]
    procs = {source: subprocess.Popen(cmd + [str(CSRC / source)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
             for source in BINDING_SOURCES}
    results = {}
    for source, proc in procs.items():
        _, stderr = proc.communicate()
        results[source] = (proc.returncode, stderr)
    return results


@pytest.mark.parametrize("source", BINDING_SOURCES)
def test_binding_parses_with_torch_headers(parsed_bindings, source):
    """The binding (and the files that register and call it, with CUDA on) parse against torch's
    headers.

    A CPU wheel of torch lacks c10/cuda/impl/cuda_cmake_macros.h (it only defines the Windows
    export macro), so C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it; ATen/cuda/CUDAContext.h would
    need cuBLAS/cuSPARSE headers, which is why the binding uses the c10/cuda headers only.
    """
    returncode, stderr = parsed_bindings[source]
    assert returncode == 0, stderr[-4000:]
