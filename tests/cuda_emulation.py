"""Run the .cu kernels of csrc/ on the CPU: g++ against a small emulation of the CUDA runtime.

Without a GPU, nvcc only proves the kernels compile. The tests/ops/test_*_cuda_emulated.py files compile
the same .cu source with g++ against the headers below and call its host launch functions through
ctypes, so the real kernels run, thread by thread, on CPU tensors:

- every CUDA thread of a block is a std::thread (a pool per launch, reused block after block); blocks run
  one after another, last block first (a kernel that relies on block order fails);
- __syncthreads is a std::barrier; a thread that returns from the kernel leaves it, as on sm_70+;
- warp shuffles (__shfl_sync/_up/_down/_xor) go through a per-warp exchange buffer and barrier; they
  must be warp-wide: every live lane of the warp calls the same shuffles the same number of times
  (checked: uneven counts fail the launch; a mask that leaves out a live lane aborts the process, as
  would a launch deadlocked for 5 minutes, rather than hang);
- shared memory, both `extern __shared__` (dynamic, sized by the launch) and static `__shared__`
  arrays (one per declaration per block), starts filled with 0xFF bytes (NaN as fp32/fp64/fp16/bf16,
  -1 as an integer), so a read of something no thread wrote shows up in the result; every byte
  around the arrays (256 KiB each for static and dynamic) holds a guard value checked after each
  block, so a write out of an array's bounds fails the launch instead of corrupting the heap;
- a launch fails (cudaGetLastError, as on a GPU) on a bad configuration (> 1024 threads, grid
  limits), on dynamic shared memory above 48 KiB without cudaFuncSetAttribute raising the limit, and
  on static + dynamic shared memory above 163 KiB (sm_80's per-block maximum; sm_90 has 227 KiB);
- __half and __nv_bfloat16 are bit patterns with round-to-nearest-even conversions, so loads and
  stores round as on the GPU; arithmetic happens in the kernels' own precision (fp32, or fp64).

So it checks indexing, tiling, masks and padding, sync points (a missing __syncthreads usually shows as
NaN or wrong values under the OS scheduler, though not with certainty), shuffle patterns, shared-memory
sizing and launch configuration, and the arithmetic in the kernels' own precision. It cannot check
speed, occupancy or register pressure, warp scheduling and divergence timing, the memory model's
subtleties (no reordering beyond what the host CPU does; no races between blocks, which run in turn),
bank conflicts, out-of-bounds global accesses, or the GPU's fast math: __expf, __logf, exp2f, log2f are
glibc's (within an ulp) where the GPU's approximations err by a few ulp (__expf more for large
arguments), and g++ does not contract a * b + c into an FMA where nvcc does. Atomics, cooperative
groups and tensor-core instructions are not emulated (a kernel using them does not compile here).
The real thing runs in the gpu-marked tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"

CUDA_RUNTIME = r"""
#pragma once
#include <math.h>

#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct emu_stream* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr int warpSize = 32;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

constexpr size_t kEmuStaticLimit = 48 * 1024;   // static __shared__ per block
constexpr size_t kEmuDefaultDynamic = 48 * 1024;  // dynamic without cudaFuncSetAttribute
constexpr size_t kEmuBlockLimit = 163 * 1024;   // static + dynamic per block, sm_80
constexpr size_t kEmuArena = 256 * 1024;        // each of the static and the dynamic region
constexpr size_t kEmuGap = 32;                  // guard bytes between static arrays
constexpr int kEmuWatchdogSeconds = 300;     // a launch that deadlocked aborts the process
constexpr unsigned char kEmuFill = 0xFF, kEmuGuardByte = 0xA5;  // inside arrays, everywhere else

inline std::atomic<int> emu_last_error{cudaSuccess};
inline cudaError_t cudaGetLastError() { return cudaError_t(emu_last_error.exchange(cudaSuccess)); }
inline cudaError_t cudaPeekAtLastError() { return cudaError_t(emu_last_error.load()); }

inline std::mutex emu_attr_mutex;
inline std::map<const void*, size_t> emu_max_dynamic;  // per kernel, from cudaFuncSetAttribute
template <class K> cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > kEmuBlockLimit)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(emu_attr_mutex);
  emu_max_dynamic[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}

[[noreturn]] inline void emu_fatal(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct alignas(64) emu_line { unsigned char b[64]; };

struct emu_warp {
  std::barrier<> sync;
  unsigned live;                   // lanes that exist in this warp
  std::atomic<unsigned> exited{0};  // lanes that returned from the kernel
  unsigned shuffles[32] = {};
  alignas(16) unsigned char slot[2][32][16];
  explicit emu_warp(unsigned lanes) : sync(lanes), live(lanes == 32 ? ~0u : (1u << lanes) - 1u) {}
};

struct emu_site { int id; const char* name; size_t offset, bytes; };

// One block's barrier, warps and static shared arrays; rebuilt for every block of a launch.
struct emu_block {
  std::barrier<> sync;
  std::vector<std::unique_ptr<emu_warp>> warps;
  std::mutex sites_mutex;
  std::vector<emu_site> sites;
  size_t static_end = 0, static_bytes = 0;
  std::atomic<bool> stale_shuffle{false};  // a shuffle named a lane that had returned
  emu_block(unsigned threads) : sync(threads) {
    for (unsigned first = 0; first < threads; first += 32)
      warps.push_back(std::make_unique<emu_warp>(threads - first < 32 ? threads - first : 32));
  }
};

struct emu_launch_state {
  dim3 grid, block;
  unsigned threads;
  size_t dynamic_bytes;
  std::vector<emu_line> dynamic, statics;
  std::unique_ptr<emu_block> current;
  long long next = 0;  // blocks left to start
  int error = cudaSuccess;
  uint3 block_idx;
  std::mutex done_mutex;
  std::condition_variable all_done;
  unsigned done = 0;  // threads that left the launch
  unsigned char* dynamic_ptr() { return dynamic.front().b; }
  unsigned char* static_ptr() { return statics.front().b; }
};

struct emu_thread { emu_launch_state* launch; emu_block* block; unsigned tid, lane, warp, parity; };
inline thread_local emu_thread emu_self;

inline void __syncthreads() { emu_self.block->sync.arrive_and_wait(); }

template <class T> T* emu_dynamic_shared() { return reinterpret_cast<T*>(emu_self.launch->dynamic_ptr()); }

// The block's array for one static __shared__ declaration: the first thread to reach it carves it out.
template <class Arr> Arr& emu_static_shared(int id, const char* name) {
  emu_block& b = *emu_self.block;
  emu_launch_state& l = *emu_self.launch;
  std::lock_guard<std::mutex> lock(b.sites_mutex);
  for (const emu_site& s : b.sites)
    if (s.id == id) return *reinterpret_cast<Arr*>(l.static_ptr() + s.offset);
  const size_t align = alignof(Arr) > 16 ? alignof(Arr) : 16;
  const size_t offset = (b.static_end + align - 1) / align * align;
  if (offset + sizeof(Arr) > kEmuArena) emu_fatal("static shared memory beyond any GPU's (256 KiB here)");
  std::memset(l.static_ptr() + offset, kEmuFill, sizeof(Arr));
  b.sites.push_back({id, name, offset, sizeof(Arr)});
  b.static_end = offset + sizeof(Arr) + kEmuGap;
  b.static_bytes += sizeof(Arr);
  return *reinterpret_cast<Arr*>(l.static_ptr() + offset);
}

// A shuffle: each lane posts its value, waits for the warp, reads its source lane's (its own when the
// source is outside its `width` segment). Two slots alternate so one barrier per shuffle suffices.
template <class V> V emu_shuffle(unsigned mask, V v, int src) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= 16, "shuffle of an unsupported type");
  emu_thread& me = emu_self;
  emu_warp& w = *me.block->warps[me.warp];
  const unsigned required = w.live & ~w.exited.load();
  if ((mask & required) != required)
    emu_fatal("a shuffle whose mask leaves out live lanes of the warp (only warp-wide shuffles are emulated)");
  if (mask & w.exited.load()) me.block->stale_shuffle = true;
  std::memcpy(w.slot[me.parity][me.lane], &v, sizeof(V));
  w.sync.arrive_and_wait();
  V out;
  std::memcpy(&out, w.slot[me.parity][(w.live >> src) & 1u ? src : me.lane], sizeof(V));
  me.parity ^= 1u;
  ++w.shuffles[me.lane];
  return out;
}
template <class V> V __shfl_sync(unsigned mask, V v, int src, int width = warpSize) {
  const int lane = int(emu_self.lane);
  return emu_shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class V> V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = warpSize) {
  const int lane = int(emu_self.lane), src = lane - int(delta);
  return emu_shuffle(mask, v, src < (lane & ~(width - 1)) ? lane : src);
}
template <class V> V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = warpSize) {
  const int lane = int(emu_self.lane), src = lane + int(delta);
  return emu_shuffle(mask, v, src > (lane | (width - 1)) ? lane : src);
}
template <class V> V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = warpSize) {
  const int lane = int(emu_self.lane), src = lane ^ lane_mask;
  return emu_shuffle(mask, v, src > (lane | (width - 1)) ? lane : src);
}

template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a > b ? a : b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }

// The block (its static arrays' guards, its warps' shuffle counts) after all its threads returned.
inline void emu_finish_block(emu_launch_state& l) {
  emu_block& b = *l.current;
  std::string what;
  auto fail = [&](const std::string& problem) { what += (what.empty() ? "" : "; ") + problem; };
  size_t from = 0;  // every byte outside the arrays must still be a guard byte
  for (size_t k = 0; k <= b.sites.size(); ++k) {
    const size_t to = k < b.sites.size() ? b.sites[k].offset : kEmuArena;
    for (size_t i = from; i < to; ++i)
      if (l.static_ptr()[i] != kEmuGuardByte) {
        fail(k ? std::string("a write past the end of __shared__ ") + b.sites[k - 1].name
               : std::string("a write before the first __shared__ array"));
        break;
      }
    if (k < b.sites.size()) from = b.sites[k].offset + b.sites[k].bytes;
  }
  for (size_t i = l.dynamic_bytes; i < kEmuArena; ++i)
    if (l.dynamic_ptr()[i] != kEmuGuardByte) {
      fail("a write past the end of dynamic shared memory (" + std::to_string(l.dynamic_bytes) + " B)");
      break;
    }
  if (b.static_bytes > kEmuStaticLimit)
    fail(std::to_string(b.static_bytes) + " B of static shared memory (at most 48 KiB)");
  if (b.static_bytes + l.dynamic_bytes > kEmuBlockLimit)
    fail(std::to_string(b.static_bytes) + " B static + " + std::to_string(l.dynamic_bytes) +
         " B dynamic shared memory (at most 163 KiB)");
  for (const auto& w : b.warps)
    for (unsigned lane = 1; lane < 32 && (w->live >> lane) & 1u; ++lane)
      if (w->shuffles[lane] != w->shuffles[0]) {
        fail("lanes of a warp shuffled unevenly");
        break;
      }
  if (b.stale_shuffle) fail("a shuffle named a lane that had returned");
  if (!what.empty()) {
    std::fprintf(stderr, "cuda emulation: block (%u, %u, %u): %s\n", l.block_idx.x, l.block_idx.y, l.block_idx.z,
                 what.c_str());
    l.error = cudaErrorInvalidValue;
  }
}

// Sets up the next block (last first), or clears `current` when none is left or the launch failed.
inline void emu_start_block(emu_launch_state& l) {
  if (l.current) emu_finish_block(l);
  l.current.reset();
  if (l.next == 0 || l.error != cudaSuccess) return;
  const long long b = --l.next;
  l.block_idx.x = unsigned(b % l.grid.x);
  l.block_idx.y = unsigned(b / l.grid.x % l.grid.y);
  l.block_idx.z = unsigned(b / l.grid.x / l.grid.y);
  std::memset(l.dynamic_ptr(), kEmuFill, l.dynamic_bytes);
  std::memset(l.dynamic_ptr() + l.dynamic_bytes, kEmuGuardByte, kEmuArena - l.dynamic_bytes);
  std::memset(l.static_ptr(), kEmuGuardByte, kEmuArena);
  l.current = std::make_unique<emu_block>(l.threads);
}

struct emu_config {
  dim3 grid, block;
  size_t smem;
  emu_config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

// kernel<<<grid, block, smem, stream>>>(args...), rewritten by tests/cuda_emulation.py.
template <class... P, class... Args> void emu_launch(void (*kernel)(P...), emu_config c, Args... args) {
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.y > 65535 || c.grid.z > 65535 || c.grid.x > 2147483647u) {
    emu_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  size_t allowed = kEmuDefaultDynamic;
  {
    std::lock_guard<std::mutex> lock(emu_attr_mutex);
    auto it = emu_max_dynamic.find(reinterpret_cast<const void*>(kernel));
    if (it != emu_max_dynamic.end() && it->second > allowed) allowed = it->second;
  }
  if (c.smem > allowed) {
    std::fprintf(stderr, "cuda emulation: %zu B of dynamic shared memory, the kernel allows %zu B\n", c.smem, allowed);
    emu_last_error = cudaErrorInvalidValue;
    return;
  }
  emu_launch_state l;
  l.grid = c.grid;
  l.block = c.block;
  l.threads = threads;
  l.dynamic_bytes = c.smem;
  l.dynamic.resize(kEmuArena / 64);  // more than any GPU allows, so a write past the end stays inside
  l.statics.resize(kEmuArena / 64);
  l.next = (long long)c.grid.x * c.grid.y * c.grid.z;
  emu_start_block(l);
  auto next_block = [&l]() noexcept { emu_start_block(l); };
  std::barrier<decltype(next_block)> between_blocks(threads, next_block);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = t % c.block.x;
      threadIdx.y = t / c.block.x % c.block.y;
      threadIdx.z = t / c.block.x / c.block.y;
      blockDim = c.block;
      gridDim = c.grid;
      while (emu_block* b = l.current.get()) {
        emu_self = {&l, b, t, t % 32, t / 32, 0};
        blockIdx = l.block_idx;
        kernel(args...);
        b->warps[t / 32]->exited.fetch_or(1u << (t % 32));
        b->warps[t / 32]->sync.arrive_and_drop();
        b->sync.arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
      std::lock_guard<std::mutex> lock(l.done_mutex);
      if (++l.done == threads) l.all_done.notify_one();
    });
  {
    std::unique_lock<std::mutex> lock(l.done_mutex);
    if (!l.all_done.wait_for(lock, std::chrono::seconds(kEmuWatchdogSeconds), [&] { return l.done == threads; }))
      emu_fatal("a launch still runs after 5 minutes: some threads wait at a __syncthreads or shuffle that others "
                "never reach");
  }
  for (auto& th : pool) th.join();
  if (l.error != cudaSuccess) emu_last_error = l.error;
}
"""

CUDA_FP16 = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __half { uint16_t bits; };
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1Fu, mant = h.bits & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) u = sign | 0x7F800000u | (mant << 13);
  else if (exp != 0) u = sign | ((exp + 112) << 23) | (mant << 13);
  else {
    const float f = float(mant) * 5.9604644775390625e-8f;  // mant · 2^-24, exact
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return {uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu))};  // NaN stays NaN
  if (a >= 0x477FF000u) return {uint16_t(sign | 0x7C00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {  // normal: round the 13 dropped bits to even, rebias the exponent
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u;
    return {uint16_t(sign | (r >> 13))};
  }
  const uint32_t e = a >> 23;  // subnormal half: round (1.m · 2^(e-127)) / 2^-24 to an integer
  if (e < 102) return {sign};
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
  uint32_t r = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (r & 1u))) ++r;
  return {uint16_t(sign | r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
"""

CUDA_BF16 = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {uint16_t((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
"""

HEADERS = {"cuda_runtime.h": CUDA_RUNTIME, "cuda_fp16.h": CUDA_FP16, "cuda_bf16.h": CUDA_BF16}

CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas"]

_LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(?P<config>.*?)>>>\s*\((?P<args>[^;]*)\)\s*;", re.S
)
_TYPE = r"(?P<type>[A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*)"
_ALIGN = r"(?:__align__\(\s*\d+\s*\)\s+)?"
_DYNAMIC = re.compile(r"extern\s+__shared__\s+" + _ALIGN + _TYPE + r"\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"__shared__\s+" + _ALIGN + _TYPE + r"\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\])+)\s*;")


def for_gcc(source: str) -> str:
    """The .cu source with launches and shared memory spelled for the emulated runtime:
    `k<T><<<g, b, s, st>>>(a)` -> `emu_launch(k<T>, emu_config(g, b, s, st), a)`; `extern __shared__ T x[];` ->
    the launch's dynamic buffer; `__shared__ T x[N]...;` -> the block's array for that declaration."""
    source = _LAUNCH.sub(lambda m: f"emu_launch({m['kernel']}, emu_config({m['config']}), {m['args']});", source)
    source = _DYNAMIC.sub(lambda m: f"{m['type']}* const {m['name']} = emu_dynamic_shared<{m['type']}>();", source)
    sites = iter(range(1_000_000))
    source = _STATIC.sub(
        lambda m: f'auto& {m["name"]} = emu_static_shared<{m["type"]}{m["dims"]}>({next(sites)}, "{m["name"]}");',
        source,
    )
    code = re.sub(r"//[^\n]*", "", source)
    assert "<<<" not in code and "__shared__" not in code, "a launch or shared array the emulation misses"
    return source


_BUILT: dict[str, ctypes.CDLL] = {}


def load(tmp_path_factory, source: Path | str, entry_points: str, include_dirs=()) -> ctypes.CDLL:
    """The emulated kernels as a ctypes library, built once per test session.

    `source` is a .cu file (its folder is on the include path) or CUDA source text; `entry_points` is C++
    that `#include "kernels.cu"` (the rewritten source) and exports extern "C" functions calling its host
    launchers. csrc/common is on the include path. Skips the test when g++ is missing or too old."""
    text = source.read_text() if isinstance(source, Path) else source
    includes = [CSRC / "common", *include_dirs] + ([source.parent] if isinstance(source, Path) else [])
    key = hashlib.sha256("\0".join([text, entry_points, *map(str, includes)]).encode()).hexdigest()
    if key in _BUILT:
        return _BUILT[key]
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not installed: the CUDA emulation needs it")
    folder = tmp_path_factory.mktemp("cuda_emulation")
    (folder / "include").mkdir()
    for name, header in HEADERS.items():
        (folder / "include" / name).write_text(header)
    (folder / "kernels.cu").write_text(for_gcc(text))
    (folder / "entry.cpp").write_text(entry_points)
    cmd = [cxx, *CXX_FLAGS, "-I", str(folder / "include"), *(f"-I{d}" for d in includes),
           str(folder / "entry.cpp"), "-o", str(folder / "kernels.so")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and re.search(r"<barrier>|std::barrier|std::bit_cast|c\+\+20", done.stderr):
        pytest.skip(f"this g++ lacks C++20 (<barrier>, std::bit_cast): {done.stderr[-300:]}")
    assert done.returncode == 0, f"g++ failed on the emulated CUDA source:\n{done.stderr[-4000:]}"
    _BUILT[key] = ctypes.CDLL(str(folder / "kernels.so"))
    return _BUILT[key]


def ptr(t):
    """A tensor's data pointer for a ctypes call (None for None)."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())
