"""Build and load the C++/CUDA extension of one op.

Each op has its own shared library, built from ``csrc/<op>/``:

- ``<op>.cpp``: the schema (``TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m)``) and the CPU kernels;
- ``<op>_cuda.cpp`` + ``<op>.cu``: the CUDA kernels, compiled only where torch has CUDA.

The CPU kernels pick their tile shapes and vector widths at compile time from the compiler's
predefined macros (``__AVX512F__``, ``__AVX2__``, ``__ARM_NEON``), so one library runs one
instruction set, and code built for more than the CPU has dies with SIGILL. Hence:

- A JIT build (``torch.utils.cpp_extension.load``, ninja, cached under ``TORCH_EXTENSIONS_DIR``)
  compiles with ``-march=native``, or ``-march=$AGIFORMER_KERNELS_CPU_ARCH``; the arch is part of
  the build's name, so builds at different levels are cached side by side. An x86-64 level above
  what this CPU runs is refused (ValueError) rather than built.
- An install with ``AGIFORMER_KERNELS_BUILD_EXT=1`` prebuilds each op at x86-64-v2, -v3 and -v4
  (``_C_<op>_x86_64_v3*.so`` beside this file; CUDA kernels in each, as they register into the
  schema the CPU file defines), and one generic library elsewhere. Three x86 levels rather than
  one generic build: a wheel must run on any x86-64 CPU, yet AVX2 and AVX-512 kernels are what make
  the CPU backend fast. ``load`` takes the highest prebuilt level this CPU runs (the level named by
  ``AGIFORMER_KERNELS_CPU_ARCH`` when set, JIT-building it when not prebuilt), else JIT-builds.
- One library per op and process: the variants register the same schema. One library per op keeps
  a rebuild of one op from invalidating the others.

This module imports nothing from the package: ``setup.py`` loads it by path.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
import tempfile
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
# at::parallel_for's OpenMP body is inlined from the header: without -fopenmp it runs serially.
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


# ---------------------------------------------------------------- instruction sets

CPU_ARCH_VAR = "AGIFORMER_KERNELS_CPU_ARCH"
X86_LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")
# The CPU flags, as /proc/cpuinfo names them, that each level adds to the one below (the x86-64 psABI's
# list; "abm" is how Linux names LZCNT). The baseline's (SSE2, CMOV...) every x86-64 CPU has.
LEVEL_FLAGS = {
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
CPUINFO = Path("/proc/cpuinfo")


def is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def x86_level(flags) -> str:
    """The highest x86-64 level whose flags, and those of every level below it, are all in flags."""
    have, level = set(flags), X86_LEVELS[0]
    for candidate in X86_LEVELS[1:]:
        if not have.issuperset(LEVEL_FLAGS[candidate]):
            break
        level = candidate
    return level


def host_isa(cpuinfo: str | os.PathLike | None = None, machine: str | None = None) -> str:
    """The x86-64 level this CPU runs ("x86-64" ... "x86-64-v4"), or ``platform.machine()`` off x86-64.

    cpuinfo: the text of /proc/cpuinfo (a str) or a file holding it (a path); machine: in place of
    ``platform.machine()``. With neither, the answer is this machine's, read once.
    """
    if cpuinfo is None and machine is None:
        return _this_host_isa()
    machine = machine or platform.machine()
    if not is_x86_64(machine):
        return machine
    if cpuinfo is None:
        cpuinfo = CPUINFO
    if not isinstance(cpuinfo, str):
        path = Path(cpuinfo)
        # no /proc/cpuinfo (macOS, Windows): the baseline, which every x86-64 CPU runs
        cpuinfo = path.read_text() if path.is_file() else ""
    found = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    return x86_level(found.group(1).split() if found else ())


@functools.lru_cache(maxsize=None)
def _this_host_isa() -> str:
    return host_isa(CPUINFO, platform.machine())


def level_runs_on(level: str, host: str) -> bool:
    """Whether code built for level (an x86-64 level or a machine name) runs on a host at host_isa() host."""
    if level in X86_LEVELS and host in X86_LEVELS:
        return X86_LEVELS.index(level) <= X86_LEVELS.index(host)
    return level == host


def cpu_arch() -> str:
    """The -march of a JIT build of the CPU kernels: $AGIFORMER_KERNELS_CPU_ARCH, else "native".

    Raises ValueError for an x86-64 level this CPU cannot run: its code would die with SIGILL.
    Read on every call, so that setting the variable before an op's first use takes effect.
    """
    arch = os.environ.get(CPU_ARCH_VAR, "").strip() or "native"
    host = host_isa()
    if arch in X86_LEVELS and not level_runs_on(arch, host):
        runs = f"runs {host} at most" if host in X86_LEVELS else f"is {host}, not x86-64"
        raise ValueError(f"{CPU_ARCH_VAR}={arch}: this CPU {runs}, and code built for {arch} would stop with an "
                         f"illegal instruction; unset it (-march=native) or name a level this CPU runs")
    return arch


def identifier(text: str) -> str:
    """text with every character outside [A-Za-z0-9_] replaced by "_": "x86-64-v3" -> "x86_64_v3"."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def jit_name(op: str, with_cuda: bool, arch: str) -> str:
    """The name a JIT build of op for -march=arch is cached under.

    A -march=native build is named after this CPU's level too: torch's cache keys on the sources and
    flags, not on the CPU, so a cache shared by machines of two levels (a VM moved between hosts,
    a network home) would hand an AVX-512 build to an AVX2-only CPU.
    """
    target = f"native_{host_isa()}" if arch == "native" else arch
    return identifier(f"agiformer_kernels_{op}_{'cuda' if with_cuda else 'cpu'}_{target}")


def prebuilt_levels(machine: str | None = None) -> tuple[str, ...]:
    """The levels ``setup.py`` builds each op's library at: x86-64-v2/v3/v4 on x86-64 (below v2 a CPU
    JIT-builds), else one library for this machine with the compiler's default -march."""
    return X86_LEVELS[1:] if is_x86_64(machine) else ((machine or platform.machine()),)


def prebuilt_name(op: str, level: str) -> str:
    """The module name (within the package) of op's library prebuilt for level."""
    return f"_C_{op}_{identifier(level)}"


def prebuilt_arch_flags(level: str) -> list[str]:
    """The compiler flags of op's library prebuilt for level: -march=level, none for a machine's generic one."""
    return [f"-march={level}"] if level in X86_LEVELS else []


def compiler_accepts(flags: list[str], compiler: str | None = None) -> bool:
    """Whether the C++ compiler (CXX, else c++) compiles an empty file with flags (-march=x86-64-v2 needs
    GCC 11 or Clang 12)."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("c++") or "g++"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "empty.cpp"
        source.write_text("int main() { return 0; }\n")
        try:
            done = subprocess.run([compiler, *flags, "-c", str(source), "-o", str(Path(tmp) / "empty.o")],
                                  capture_output=True)
        except OSError:
            return False
    return done.returncode == 0


def prebuilt_libraries(op: str) -> dict[str, Path]:
    """op's prebuilt libraries beside this file, by the level each was built for, lowest first."""
    # the baseline too: setup.py builds it instead where the compiler does not know the levels
    levels = X86_LEVELS if is_x86_64() else prebuilt_levels()
    found = {}
    for level in levels:
        # "." after the name: no other op's library (one whose name extends op's) matches
        paths = sorted(PACKAGE_DIR.glob(f"{prebuilt_name(op, level)}.*so"))
        if paths:
            found[level] = paths[0]
    return found


def choose_library(op: str) -> tuple[str, Path | None]:
    """The level op's library is loaded at, and its prebuilt file (None: JIT-built at that level).

    AGIFORMER_KERNELS_CPU_ARCH set: that arch, prebuilt if it is. Else the highest prebuilt level this
    CPU runs, else a -march=native build, at this CPU's level.
    """
    arch, prebuilt = cpu_arch(), prebuilt_libraries(op)
    if arch != "native":
        return arch, prebuilt.get(arch)
    runnable = [level for level in prebuilt if level_runs_on(level, host_isa())]
    if runnable:
        return runnable[-1], prebuilt[runnable[-1]]
    return host_isa(), None


def built_isa(op: str) -> str:
    """The level (or -march) op's CPU kernels are built for: its loaded library's, else the one ``load``
    would take now."""
    return _loaded.get(op) or choose_library(op)[0]


class ExtensionError(RuntimeError):
    """The extension of an op could neither be found prebuilt nor built here."""


_failures: dict[str, str] = {}


def load(op: str) -> None:
    """Load op's library into ``torch.ops.agiformer_kernels`` (once); raise ExtensionError if impossible.

    A failure is remembered, so a missing compiler costs one attempt per process, not one per call.
    """
    if op in _loaded:  # never a second variant: it would register op's schema again
        return
    if op in _failures:
        raise ExtensionError(_failures[op])
    try:
        _loaded[op] = _load(op)
    except ExtensionError as e:
        _failures[op] = str(e)
        raise


_loaded: dict[str, str] = {}  # op -> the level its loaded library was built for


def _share_cxx_runtime() -> None:
    """Put the C++ runtime torch runs with (libstdc++, already loaded) in the global symbol scope, so our
    libraries bind to its definitions rather than to copies of their own.

    A compiler that links libstdc++ statically leaves such copies in our library (some GCC builds export
    std::logic_error and the ostream inserters from it). Torch loads libstdc++ with local scope, so our library
    would find its own copies first: two C++ runtimes in one process, where formatting a number in an error
    message segfaults (a null locale facet)."""
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except (OSError, AttributeError):  # another C++ runtime or platform: nothing to share
        pass


def _load(op: str) -> str:
    """Load op's library (see ``choose_library``); the level it was built for."""
    level, prebuilt = choose_library(op)
    _share_cxx_runtime()
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        return level
    if os.environ.get("AGIFORMER_KERNELS_NO_JIT") == "1":
        raise ExtensionError(f"no prebuilt library for {op!r} at {level} and AGIFORMER_KERNELS_NO_JIT=1")
    from torch.utils import cpp_extension

    with_cuda = cuda_buildable() and torch.cuda.is_available()
    arch = cpu_arch()
    announce_jit_build(op, jit_name(op, with_cuda, arch))
    try:
        cpp_extension.load(
            name=jit_name(op, with_cuda, arch),
            sources=sources(op, with_cuda),
            extra_include_paths=[str(csrc_dir() / "common")],
            extra_cflags=CXX_FLAGS + [f"-march={arch}"] + (["-DWITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=LD_FLAGS,
            is_python_module=False,
            verbose=os.environ.get("AGIFORMER_KERNELS_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # compiler missing, compile error, ninja missing: all mean "no extension"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExtensionError(
            f"building the {op!r} extension for -march={arch} failed ({first}); "
            "set AGIFORMER_KERNELS_VERBOSE_BUILD=1 to see the compiler output"
        ) from e
    return level


# ---------------------------------------------------------------- first-use message

def jit_build_pending(op: str, name: str) -> bool:
    """Whether loading op's JIT library ``name`` compiles it: torch's cache holds no library of that name, or
    one older than a file of csrc/<op>/ or csrc/common/ (ninja would rebuild it), as opposed to loading it."""
    from torch.utils import cpp_extension

    try:
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = [p.stat().st_mtime for p in (folder / f"{name}.so", folder / f"{name}.pyd") if p.is_file()]
        if not built:
            return True
        inputs = [p for d in (csrc_dir() / op, csrc_dir() / "common") for p in d.iterdir() if p.is_file()]
        return any(p.stat().st_mtime > max(built) for p in inputs)
    except Exception:  # a private torch helper moved, csrc/ missing: say nothing, the build reports what fails
        return False


def announce_jit_build(op: str, name: str) -> None:
    """One line on stderr before a JIT build compiles, so a first use does not look hung."""
    if jit_build_pending(op, name):
        import sys

        print(f"building the C++ kernels (first use, about a minute)… {op}", file=sys.stderr, flush=True)


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
