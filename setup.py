"""Builds resnet_fast and its one compiled extension, resnet_fast._C.

The C++ CPU kernels (csrc/cpu/) are always built. The CUDA kernels (csrc/cuda/) are added, as a
CUDAExtension, only when the installed torch has CUDA and nvcc is found; otherwise the package
builds CPU-only and the `cuda` backend reports why it is unavailable.

Build in place with `pip install -e . --no-build-isolation` (isolation would fetch another torch).
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_vector_flags():
    """AVX2 + FMA for at::vec when the building machine has them (the extension is built where
    it runs); otherwise at::vec's portable default."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if " avx2" in flags and " fma" in flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _cutlass_include_dir():
    """CUTLASS's headers, from the installed nvidia-cutlass package (located without importing
    it: its __init__ loads CUTLASS's Python generator). The CUDA build needs them
    (csrc/cuda/conv_bn_act_kernels.cu); a clear error, not a silent CPU-only build, without."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        include = os.path.join(location, "source", "include")
        if os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
            return include
    raise RuntimeError(
        "resnet_fast's CUDA kernels need CUTLASS's headers, which come with the nvidia-cutlass "
        "package: `pip install nvidia-cutlass==4.2.0.0` (or build CPU-only with "
        "RESNET_FAST_NO_CUDA=1). No cutlass_library/source/include/cutlass/cutlass.h found"
        + (f" under {locations}" if locations else " (cutlass_library is not installed)"))


def _extensions():
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is OpenMP in PyTorch's CPU builds: without -fopenmp its loops run on one
    # thread. The libgomp.so.1 linked here resolves to the one torch has already loaded.
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + _cpu_vector_flags()
    kwargs = {"include_dirs": [os.path.join(ROOT, "csrc")], "extra_link_args": ["-fopenmp"]}
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("RESNET_FAST_NO_CUDA", "0") != "1"
    )
    if not with_cuda:
        return [cpp_extension.CppExtension("resnet_fast._C", sources,
                                           extra_compile_args={"cxx": cxx}, **kwargs)]
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*binding*.cpp"))
    kwargs["include_dirs"].append(_cutlass_include_dir())
    archs = os.environ.get("RESNET_FAST_CUDA_ARCHS", "80;90").split(";")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DRESNET_FAST_WITH_CUDA"]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [cpp_extension.CUDAExtension(
        "resnet_fast._C", sources,
        extra_compile_args={"cxx": cxx + ["-DRESNET_FAST_WITH_CUDA"], "nvcc": nvcc}, **kwargs)]


def _build_ext():
    from torch.utils import cpp_extension

    return cpp_extension.BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
