"""Install agiformer-kernels.

A plain ``pip install .`` compiles nothing: the C++/CUDA extensions are built on first use
(agiformer_kernels/extension.py). ``AGIFORMER_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .``
builds them now instead, against the torch already installed (flash-attention style); lacking a CUDA
toolkit it warns and builds the CPU kernels only, so an install never fails for want of CUDA.
On x86-64 each op is built three times, for x86-64-v2, -v3 and -v4 (``_C_<op>_x86_64_v3``...; each with
the CUDA kernels too, when built), and the extension loads the highest level the CPU runs; elsewhere
once, for the compiler's default -march. A compiler too old to know the levels (GCC < 11) builds one
baseline x86-64 library instead.
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
    levels = ext.prebuilt_levels()
    if ext.is_x86_64() and not ext.compiler_accepts(ext.prebuilt_arch_flags(levels[-1])):
        warnings.warn(f"the C++ compiler does not know -march={levels[-1]}: building for the x86-64 baseline only")
        levels = ext.X86_LEVELS[:1]
    modules = []
    for op in ext.ops_with_sources():
        sources = [os.path.relpath(s, ROOT) for s in ext.sources(op, with_cuda)]
        kind = CUDAExtension if with_cuda else CppExtension
        for level in levels:
            modules.append(
                kind(
                    name=f"agiformer_kernels.{ext.prebuilt_name(op, level)}",
                    sources=sources,
                    include_dirs=[str(ext.csrc_dir() / "common")],
                    extra_compile_args={
                        "cxx": ext.CXX_FLAGS + ext.prebuilt_arch_flags(level) + (["-DWITH_CUDA"] if with_cuda else []),
                        "nvcc": ext.NVCC_FLAGS,
                    },
                    extra_link_args=ext.LD_FLAGS,
                )
            )

    class BuildEachInItsOwnFolder(BuildExtension):
        """Compiles each library's objects into a folder of its own: an op's variants share their sources, and
        object files are named after their sources, so in one folder one variant's would replace another's."""

        def build_extension(self, extension):
            shared = self.build_temp
            self.build_temp = os.path.join(shared, extension.name)
            try:
                super().build_extension(extension)
            finally:
                self.build_temp = shared

    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildEachInItsOwnFolder}}


setup(
    # csrc/ ships inside the package so that a non-editable install can still JIT-build.
    packages=find_packages(include=["agiformer_kernels*", "agiformer*"]) + ["agiformer_kernels.csrc"],
    package_dir={"agiformer_kernels.csrc": "csrc"},
    package_data={"agiformer_kernels.csrc": ["*/*.cpp", "*/*.cu", "*/*.h", "*/*.cuh"],
                  "agiformer.components.flavors": ["*.json"],  # the named model configs
                  "agiformer.hierarchical.configs": ["*.json"]},
    **prebuilt_extensions(),
)
