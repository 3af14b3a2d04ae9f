"""The C++ CPU kernels at every instruction-set level: the host's level read from /proc/cpuinfo, the library
``extension.load`` picks for it, and every csrc/<op>/<op>.cpp compiled for x86-64-v2, -v3, -v4 (and, with a
cross compiler, for aarch64 NEON), since each level takes its own branch of the kernels' ``#if``s."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from agiformer_kernels import extension

ARCH = extension.CPU_ARCH_VAR

# ---------------------------------------------------------------- host_isa

BASELINE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
            "syscall nx lm")
V2 = BASELINE + " cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3"
V3 = V2 + " avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
V4 = V3 + " avx512f avx512bw avx512cd avx512dq avx512vl"
# an AMD EPYC VM's line, as /proc/cpuinfo prints it: AVX2 and no AVX-512
EPYC_AVX2 = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
    "mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave "
    "avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext "
    "cpuid_fault vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni "
    "xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr arat umip vaes vpclmulqdq rdpid fsrm"
)


def cpuinfo(flags: str, cpus: int = 2) -> str:
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC\nflags\t\t: {}\n\n"
    return "".join(block.format(i, flags) for i in range(cpus))


def without(flags: str, *names: str) -> str:
    return " ".join(f for f in flags.split() if f not in names)


@pytest.mark.parametrize("flags, level", [
    (BASELINE, "x86-64"),
    (V2, "x86-64-v2"),
    (V3, "x86-64-v3"),
    (V4, "x86-64-v4"),
    (EPYC_AVX2, "x86-64-v3"),
    (without(V3, "fma"), "x86-64-v2"),
    (without(V3, "abm"), "x86-64-v2"),  # LZCNT, which /proc/cpuinfo calls abm
    (without(V4, "avx512vl", "avx512bw", "avx512dq"), "x86-64-v3"),  # AVX-512F/CD only (Knights Landing)
    (without(V4, "avx2"), "x86-64-v2"),  # levels are cumulative: AVX-512 without AVX2 is not v4
    (without(V4, "popcnt"), "x86-64"),
], ids=["baseline", "v2", "v3", "v4", "epyc-avx2", "v3-no-fma", "v3-no-lzcnt", "avx512f-cd-only", "v4-no-avx2",
        "no-popcnt"])
def test_host_isa_from_cpuinfo(flags, level):
    assert extension.host_isa(cpuinfo(flags), machine="x86_64") == level


def test_host_isa_reads_a_cpuinfo_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo(V4))
    assert extension.host_isa(path, machine="x86_64") == "x86-64-v4"
    # no /proc/cpuinfo (macOS): the baseline, which every x86-64 CPU runs
    assert extension.host_isa(tmp_path / "absent", machine="x86_64") == "x86-64"
    assert extension.host_isa("processor\t: 0\n", machine="AMD64") == "x86-64"


def test_host_isa_off_x86_is_the_machine():
    assert extension.host_isa(cpuinfo("fp asimd evtstrm aes crc32"), machine="aarch64") == "aarch64"


def test_host_isa_of_this_machine():
    assert extension.host_isa() == extension.host_isa(extension.CPUINFO, machine=platform.machine())
    assert extension.host_isa() in extension.X86_LEVELS or not extension.is_x86_64()


# ---------------------------------------------------------------- which library load() takes


@pytest.fixture
def host_level(monkeypatch):
    """Sets the host's level (returns a setter); AGIFORMER_KERNELS_CPU_ARCH unset, and restored afterwards."""
    monkeypatch.delenv(ARCH, raising=False)
    monkeypatch.setattr(extension, "is_x86_64", lambda machine=None: True)

    def set_level(level: str) -> None:
        monkeypatch.setattr(extension, "host_isa", lambda *args, **kwargs: level)

    set_level("x86-64-v4")
    return set_level


def test_cpu_arch_defaults_to_native(host_level):
    assert extension.cpu_arch() == "native"


def test_cpu_arch_refuses_a_level_the_host_cannot_run(host_level, monkeypatch):
    host_level("x86-64-v3")
    monkeypatch.setenv(ARCH, "x86-64-v4")
    with pytest.raises(ValueError, match=f"{ARCH}=x86-64-v4: this CPU runs x86-64-v3 at most"):
        extension.cpu_arch()
    for arch in ("x86-64", "x86-64-v2", "x86-64-v3", "haswell"):  # other -march names are the compiler's to judge
        monkeypatch.setenv(ARCH, arch)
        assert extension.cpu_arch() == arch
    host_level("aarch64")
    monkeypatch.setenv(ARCH, "x86-64-v2")
    with pytest.raises(ValueError, match="this CPU is aarch64, not x86-64"):
        extension.cpu_arch()


def test_jit_builds_of_each_arch_have_names_of_their_own(host_level):
    host_level("x86-64-v3")
    names = {arch: extension.jit_name("gru_patch", False, arch) for arch in ("native", "x86-64-v2", "x86-64-v3")}
    assert names == {"native": "agiformer_kernels_gru_patch_cpu_native_x86_64_v3",
                     "x86-64-v2": "agiformer_kernels_gru_patch_cpu_x86_64_v2",
                     "x86-64-v3": "agiformer_kernels_gru_patch_cpu_x86_64_v3"}
    assert extension.jit_name("gru_patch", True, "armv8.2-a+sve") == "agiformer_kernels_gru_patch_cuda_armv8_2_a_sve"
    assert all(name.isidentifier() for name in names.values())


def test_prebuilt_variants_by_machine():
    assert extension.prebuilt_levels("x86_64") == ("x86-64-v2", "x86-64-v3", "x86-64-v4")
    assert extension.prebuilt_levels("aarch64") == ("aarch64",)
    assert extension.prebuilt_name("gru_patch", "x86-64-v3") == "_C_gru_patch_x86_64_v3"
    assert extension.prebuilt_arch_flags("x86-64-v4") == ["-march=x86-64-v4"]
    assert extension.prebuilt_arch_flags("aarch64") == []  # the compiler's default -march


@pytest.fixture
def prebuilt(tmp_path, monkeypatch):
    """A package folder holding toy's libraries prebuilt at x86-64-v2, -v3 and -v4 (empty files), and one of
    toy_step's, whose name begins with toy's."""
    suffix = ".cpython-311-x86_64-linux-gnu.so"
    for level in ("x86-64-v2", "x86-64-v3", "x86-64-v4"):
        (tmp_path / (extension.prebuilt_name("toy", level) + suffix)).touch()
    (tmp_path / (extension.prebuilt_name("toy_step", "x86-64") + suffix)).touch()
    monkeypatch.setattr(extension, "PACKAGE_DIR", tmp_path)
    return {level: tmp_path / (extension.prebuilt_name("toy", level) + suffix)
            for level in ("x86-64-v2", "x86-64-v3", "x86-64-v4")}


@pytest.mark.parametrize("level, arch, expected", [
    ("x86-64-v4", None, "x86-64-v4"),
    ("x86-64-v3", None, "x86-64-v3"),
    ("x86-64-v2", None, "x86-64-v2"),
    ("x86-64-v4", "x86-64-v3", "x86-64-v3"),  # a level asked for: that one, though a higher one is prebuilt
    ("x86-64-v4", "native", "x86-64-v4"),
])
def test_load_takes_the_highest_prebuilt_level_the_host_runs(host_level, prebuilt, monkeypatch, level, arch, expected):
    host_level(level)
    if arch:
        monkeypatch.setenv(ARCH, arch)
    assert extension.prebuilt_libraries("toy") == prebuilt
    assert extension.choose_library("toy") == (expected, prebuilt[expected])


@pytest.mark.parametrize("level, arch, expected", [
    ("x86-64", None, "x86-64"),  # below every prebuilt level: -march=native, at the host's level
    ("x86-64-v4", "x86-64", "x86-64"),  # a level that is not prebuilt
    ("x86-64-v4", "znver4", "znver4"),
])
def test_load_builds_what_is_not_prebuilt(host_level, prebuilt, monkeypatch, level, arch, expected):
    host_level(level)
    if arch:
        monkeypatch.setenv(ARCH, arch)
    assert extension.choose_library("toy") == (expected, None)


@pytest.fixture
def fresh_loads(monkeypatch):
    """load() as in a new process: nothing loaded, nothing failed; load_library and the JIT build recorded."""
    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.setattr(extension, "_failures", {})
    calls = []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls.append(("prebuilt", path)))
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(("jit", kwargs)))
    return calls


def test_load_takes_one_variant_per_process(host_level, prebuilt, fresh_loads, monkeypatch):
    """Two variants of an op register the same schema: once one is loaded, it stays the op's library."""
    host_level("x86-64-v3")
    extension.load("toy")
    monkeypatch.setenv(ARCH, "x86-64-v2")
    extension.load("toy")
    assert fresh_loads == [("prebuilt", str(prebuilt["x86-64-v3"]))]
    assert extension.built_isa("toy") == "x86-64-v3"


def test_jit_build_takes_the_arch_asked_for(host_level, fresh_loads, monkeypatch):
    monkeypatch.setattr(extension, "prebuilt_libraries", lambda op: {})
    monkeypatch.setenv(ARCH, "x86-64-v2")
    assert extension.built_isa("gru_patch") == "x86-64-v2"
    extension.load("gru_patch")
    [(kind, kwargs)] = fresh_loads
    assert kind == "jit" and kwargs["name"].endswith("_x86_64_v2")
    assert "-march=x86-64-v2" in kwargs["extra_cflags"] and "-march=native" not in kwargs["extra_cflags"]
    assert extension.built_isa("gru_patch") == "x86-64-v2"


def test_no_jit_without_the_level_prebuilt(host_level, prebuilt, fresh_loads, monkeypatch):
    monkeypatch.setenv("AGIFORMER_KERNELS_NO_JIT", "1")
    monkeypatch.setenv(ARCH, "x86-64")
    with pytest.raises(extension.ExtensionError, match="no prebuilt library for 'toy' at x86-64"):
        extension.load("toy")
    assert fresh_loads == []


# ---------------------------------------------------------------- the sources compile at every level


class Target(NamedTuple):
    compiler: str  # "host" (c++) or "aarch64" (the cross compiler)
    op: str
    march: str


OPS = extension.ops_with_sources()
X86_TARGETS = [Target("host", op, level) for op in OPS for level in extension.prebuilt_levels("x86_64")]
AARCH64_TARGETS = [Target("aarch64", op, "armv8-a") for op in OPS]
CROSS_CXX = "aarch64-linux-gnu-g++"


def compiler_path(target: Target) -> str | None:
    if target.compiler == "aarch64":
        return shutil.which(CROSS_CXX)
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@lru_cache(maxsize=None)
def accepts(compiler: str, march: str) -> bool:
    return extension.compiler_accepts([f"-march={march}"], compiler)


def skip_reason(target: Target) -> str | None:
    compiler = compiler_path(target)
    if target.compiler == "aarch64":
        if compiler is None:
            return f"{CROSS_CXX} not on PATH (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
    elif compiler is None:
        return "no C++ compiler (c++, g++ or $CXX) found"
    elif not extension.is_x86_64():
        return f"the host is {platform.machine()}, not x86-64: its c++ does not target x86-64 levels"
    if not accepts(compiler, target.march):
        return f"{compiler} does not know -march={target.march} (x86-64-v2..v4 need GCC 11 or Clang 12)"
    return None


def compile_command(target: Target, obj: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    source = extension.csrc_dir() / target.op / f"{target.op}.cpp"
    # The build's own flags, -O3 included: an intrinsic under the wrong macro fails only where it is inlined,
    # and an immediate operand taken from a loop index (_mm512_extractf32x4_ps(v, i)) compiles only once the
    # loop is unrolled, which -O1 and -O2 do not do, so a lower level reports errors the build never has.
    return [compiler_path(target), *extension.CXX_FLAGS, f"-march={target.march}", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_EXTENSION_NAME=x",
            "-I", str(extension.csrc_dir() / "common"), *[arg for p in include_paths() for arg in ("-isystem", p)],
            "-c", str(source), "-o", str(obj)]


def expected_seconds(target: Target) -> int:
    """The rough order of compile times on one core: the cross compiler slowest, then the higher levels."""
    return 30 if target.compiler == "aarch64" else 15 + 2 * extension.X86_LEVELS.index(target.march)


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """target -> the future of its compile. Every selected target of this module starts at the first request, on
    as many threads as cores: a compile takes 15-30 s on one core and about 1 GB. Under pytest-xdist each worker
    compiles only the targets it is asked for, since every worker sees every selected test."""
    folder = tmp_path_factory.mktemp("objects")
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    futures: dict[Target, Future] = {}

    def start(target: Target) -> Future:
        if target not in futures:
            obj = folder / f"{target.op}-{target.compiler}-{target.march}.o"
            futures[target] = pool.submit(subprocess.run, compile_command(target, obj), capture_output=True, text=True)
        return futures[target]

    def get(target: Target) -> subprocess.CompletedProcess:
        if not futures and "PYTEST_XDIST_WORKER" not in os.environ:
            selected = [getattr(getattr(item, "callspec", None), "params", {}).get("target")
                        for item in request.session.items if item.module is request.module]
            selected = [t for t in selected if isinstance(t, Target) and skip_reason(t) is None]
            for other in sorted(selected, key=expected_seconds, reverse=True):  # the last to finish is a short one
                start(other)
        return start(target).result()

    yield get
    pool.shutdown(cancel_futures=True)


def check_compiled(target: Target, compiled) -> None:
    reason = skip_reason(target)
    if reason:
        pytest.skip(reason)
    done = compiled(target)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 0, (
        f"{target.op}.cpp does not compile for -march={target.march}:\n" + "\n".join(errors[:20])
        + "\n---- end of the compiler's output:\n" + done.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("target", X86_TARGETS, ids=[f"{t.op}-{t.march}" for t in X86_TARGETS])
def test_cpu_kernels_compile_for_x86_64_level(target, compiled):
    check_compiled(target, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("target", AARCH64_TARGETS, ids=[f"{t.op}-aarch64-{t.march}" for t in AARCH64_TARGETS])
def test_cpu_kernels_cross_compile_for_aarch64_neon(target, compiled):
    """The NEON branches, by a cross compiler against this (x86-64) torch's headers, which hold no
    x86-only code outside #ifs."""
    check_compiled(target, compiled)
