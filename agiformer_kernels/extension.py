"""Build and load the C++/CUDA extension of one op.

Each op has its own shared library, built from ``csrc/<op>/``:

- ``<op>.cpp``: the schema (``TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m)``) and the CPU kernels;
- ``<op>_cuda.cpp`` + ``<op>.cu``: the CUDA kernels, compiled only where torch has CUDA.

A library prebuilt at install time (``AGIFORMER_KERNELS_BUILD_EXT=1 pip install
--no-build-isolation .``) sits beside this file as ``_C_<op>*.so`` and is used first.
Otherwise the sources are compiled on first use with ``torch.utils.cpp_extension.load``
(ninja; cached under ``TORCH_EXTENSIONS_DIR``). One library per op keeps a rebuild of
one op from invalidating the others.

This module imports nothing from the package: ``setup.py`` loads it by path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def csrc_dir() -> Path:
    """The C++ sources: copied into the package by a wheel build, else the source tree's."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "common").is_dir():
            return candidate
    raise FileNotFoundError(f"csrc/ not found beside {PACKAGE_DIR}: the C++ sources are not installed")


def ops_with_sources() -> list[str]:
    root = csrc_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.cpp").is_file())


def sources(op: str, with_cuda: bool) -> list[str]:
    """The source files of op's library, CPU binding first."""
    folder = csrc_dir() / op
    cpu = [folder / f"{op}.cpp"]
    cuda = [folder / f"{op}_cuda.cpp", folder / f"{op}.cu"]
    files = cpu + (cuda if with_cuda else [])
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing sources for op {op!r}: {missing}")
    return [str(f) for f in files]


def cuda_buildable() -> bool:
    """True when this torch has CUDA and a CUDA toolkit to compile against."""
    if torch.version.cuda is None or os.environ.get("AGIFORMER_KERNELS_SKIP_CUDA_BUILD") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
# A JIT build runs where it was compiled, so it may use every instruction this CPU has;
# AGIFORMER_KERNELS_CPU_ARCH overrides (an -march value), and prebuilt wheels stay generic.
JIT_ARCH_FLAGS = [f"-march={os.environ.get('AGIFORMER_KERNELS_CPU_ARCH', 'native')}"]
# at::parallel_for's OpenMP body is inlined from the header: without -fopenmp it runs serially.
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


class ExtensionError(RuntimeError):
    """The extension of an op could neither be found prebuilt nor built here."""


_failures: dict[str, str] = {}


def load(op: str) -> None:
    """Load op's library into ``torch.ops.agiformer_kernels`` (once); raise ExtensionError if impossible.

    A failure is remembered, so a missing compiler costs one attempt per process, not one per call.
    """
    if op in _loaded:
        return
    if op in _failures:
        raise ExtensionError(_failures[op])
    try:
        _load(op)
    except ExtensionError as e:
        _failures[op] = str(e)
        raise
    _loaded.add(op)


_loaded: set[str] = set()


def _share_cxx_runtime() -> None:
    """Put the C++ runtime torch runs with (libstdc++, already loaded) in the global symbol scope, so our
    libraries bind to its definitions rather than to copies of their own.

    A compiler that links libstdc++ statically leaves such copies in our library (the lent H100 machine's
    /opt/gcc/bin/g++, GCC 13.3, does: its builds export std::logic_error and the ostream inserters). Torch
    loads libstdc++ with local scope, so our library found its own copies first: two C++ runtimes in one
    process, and formatting a number in an error message segfaulted (a null locale facet)."""
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except (OSError, AttributeError):  # another C++ runtime or platform: nothing to share
        pass


def _load(op: str) -> None:
    _share_cxx_runtime()
    prebuilt = sorted(PACKAGE_DIR.glob(f"_C_{op}.*so"))
    if prebuilt:
        torch.ops.load_library(str(prebuilt[0]))
        return
    if os.environ.get("AGIFORMER_KERNELS_NO_JIT") == "1":
        raise ExtensionError(f"no prebuilt library for {op!r} and AGIFORMER_KERNELS_NO_JIT=1")
    from torch.utils import cpp_extension

    with_cuda = cuda_buildable() and torch.cuda.is_available()
    try:
        cpp_extension.load(
            name=f"agiformer_kernels_{op}_{'cuda' if with_cuda else 'cpu'}",
            sources=sources(op, with_cuda),
            extra_include_paths=[str(csrc_dir() / "common")],
            extra_cflags=CXX_FLAGS + JIT_ARCH_FLAGS + (["-DWITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=LD_FLAGS,
            is_python_module=False,
            verbose=os.environ.get("AGIFORMER_KERNELS_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # compiler missing, compile error, ninja missing: all mean "no extension"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExtensionError(
            f"building the {op!r} extension failed ({first}); "
            "set AGIFORMER_KERNELS_VERBOSE_BUILD=1 to see the compiler output"
        ) from e


def unavailable(op: str, kernel: str, device: torch.device) -> str | None:
    """Why ``torch.ops.agiformer_kernels.<kernel>`` (from op's library) cannot run on device, or None."""
    try:
        load(op)
    except (ExtensionError, FileNotFoundError) as e:
        return str(e)
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"agiformer_kernels::{kernel}", key):
        return f"the {op!r} extension has no {key} kernel for {kernel!r} (built without {key}?)"
    return None
