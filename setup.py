"""Build and install neox_rt.

The CUDA extension ``neox_rt._C`` (sources in csrc/) is built when torch has CUDA and nvcc is found.
Environment:
  NEOX_RT_SKIP_CUDA=1          never build the extension (pure Python + Triton install)
  TORCH_CUDA_ARCH_LIST         architectures, default "7.5;8.0;8.6;8.9;9.0+PTX" (T4 through H100)
  MAX_JOBS                     parallel compile jobs (honoured by torch's ninja builder)
On a machine without CUDA the install succeeds with a one-line notice.
"""
import glob
import os
import sys

from setuptools import setup

DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def cuda_extension():
    if os.environ.get("NEOX_RT_SKIP_CUDA", "0") == "1":
        print("neox_rt: NEOX_RT_SKIP_CUDA=1, building without the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    # csrc/standalone/ holds the framework-free compile check and the CMake test program (it has a main()).
    sources = [s for s in sources if not s.replace(os.sep, "/").startswith("csrc/standalone/")]
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("neox_rt: torch not importable at build time, building without the CUDA extension", file=sys.stderr)
        return [], {}
    if not sources or torch.version.cuda is None or CUDA_HOME is None:
        why = "no csrc sources" if not sources else ("torch has no CUDA" if torch.version.cuda is None
                                                      else "nvcc not found (CUDA_HOME unset)")
        print(f"neox_rt: {why}, building without the CUDA extension (Triton/PyTorch kernels only)", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    ext = CUDAExtension(
        name="neox_rt._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"],  # the C++ standard comes from torch
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        # The module only registers torch ops (csrc/bindings.cpp): CPython's stable ABI, so one build serves every
        # Python >= 3.10 with the same torch (scripts/prebuild_extension.sh builds the device's on a CPU machine).
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
