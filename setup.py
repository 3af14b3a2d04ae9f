"""Install agiformer-kernels.

A plain ``pip install .`` compiles nothing: the C++/CUDA extensions are built on first use
(agiformer_kernels/extension.py). ``AGIFORMER_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .``
builds them now instead, against the torch already installed (flash-attention style); lacking a CUDA
toolkit it warns and builds the CPU kernels only, so an install never fails for want of CUDA.
"""

import importlib.util
import os
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def extension_module():
    """agiformer_kernels/extension.py, loaded by path: importing the package would need its dependencies."""
    spec = importlib.util.spec_from_file_location("_agf_extension", ROOT / "agiformer_kernels" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prebuilt_extensions():
    if os.environ.get("AGIFORMER_KERNELS_BUILD_EXT") != "1":
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("AGIFORMER_KERNELS_BUILD_EXT=1 needs torch installed first (and --no-build-isolation)")
        return {}
    ext = extension_module()
    with_cuda = ext.cuda_buildable()
    if not with_cuda:
        warnings.warn("no CUDA toolkit (or AGIFORMER_KERNELS_SKIP_CUDA_BUILD=1): building the CPU kernels only")
    modules = []
    for op in ext.ops_with_sources():
        sources = [os.path.relpath(s, ROOT) for s in ext.sources(op, with_cuda)]
        kind = CUDAExtension if with_cuda else CppExtension
        modules.append(
            kind(
                name=f"agiformer_kernels._C_{op}",
                sources=sources,
                include_dirs=[str(ext.csrc_dir() / "common")],
                extra_compile_args={
                    "cxx": ext.CXX_FLAGS + (["-DWITH_CUDA"] if with_cuda else []),
                    "nvcc": ext.NVCC_FLAGS,
                },
                extra_link_args=ext.LD_FLAGS,
            )
        )
    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildExtension}}


setup(
    # csrc/ ships inside the package so that a non-editable install can still JIT-build.
    packages=find_packages(include=["agiformer_kernels*", "agiformer*"]) + ["agiformer_kernels.csrc"],
    package_dir={"agiformer_kernels.csrc": "csrc"},
    package_data={"agiformer_kernels.csrc": ["*/*.cpp", "*/*.cu", "*/*.h", "*/*.cuh"]},
    **prebuilt_extensions(),
)
