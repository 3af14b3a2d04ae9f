"""Which backend serves a call.

Each op registers its implementations here (``register``); the public function validates
its inputs and calls ``select``. ``backend=None``/``"auto"`` (or ``AGIFORMER_KERNELS_BACKEND``
unset) takes the first backend of ``auto_order(op, device)`` that can serve the call, warning once
for each one it skips; a backend named explicitly, by argument or environment variable, either
serves the call or raises ``BackendError`` saying why.

Two questions decide whether a backend serves a call:
- ``available(device_type)``: does it exist here at all (extension built, triton installed)?
  Answered once per (op, backend, device type) outside any ``torch.compile`` trace.
  ``auto`` also passes over a C++ CPU kernel built for an instruction set where the benchmarks
  show it slower than the reference (``CPU_SLOWER``); named, it still serves.
- ``check(*args, **kwargs)``: can it take these inputs (dtype, head dim, ...)? Pure Python on
  shapes and dtypes, so torch.compile traces it and guards on the answer.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "AGIFORMER_KERNELS_BACKEND"
# Triton on CPU tensors runs only through its interpreter: a test tool, never an auto choice. On CUDA
# tensors the order is per op, from the H100 timings in benchmarks/results/cuda-*.json: Triton runs the
# whole-sequence ops and the GRU decoder's training 1.1 to 16 times faster than the CUDA kernels; the
# CUDA kernels run the one-token decode steps 2.4 to 4 times faster (a Triton launch costs more host
# time). Sampling goes to CUDA first too: generation samples 1 to 16 patches a call, where host time
# decides as in the decode steps.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
CUDA_FIRST = ("cuda", "triton", "reference")
# The segment ops' Triton and CUDA kernels pass their tests through the Triton interpreter and the CUDA
# emulation (tests/cuda_emulation.py) but have not run on a GPU: auto keeps CUDA tensors on the reference until
# they have; named, they serve.
UNMEASURED_ON_GPU = ("reference", "triton", "cuda")
OP_AUTO_ORDER = {
    ("linear_attention_step", "cuda"): CUDA_FIRST,
    ("sliding_window_attention_step", "cuda"): CUDA_FIRST,
    ("gru_patch_sample", "cuda"): CUDA_FIRST,
    **{(op, "cuda"): UNMEASURED_ON_GPU
       for op in ("entropy_segments", "segment_pool", "vq_nearest", "vq_ema_update")},
}


# (op, the x86-64 level its C++ CPU kernels are built for) -> why auto takes the reference instead: the cases
# where benchmarks/results/cpu-<level>-ops.json has our kernel slower than the reference (whose matrix
# products run torch's own AVX2/AVX-512 code whatever our level). Pairs not listed were measured faster
# (every op at x86-64-v3, the GRU and the decode steps at v2) or are what the kernels were tuned on (v4).
CPU_SLOWER: dict[tuple[str, str], str] = {}
for _level in ("x86-64", "x86-64-v2"):  # SSE's 16-byte vectors (x86-64 compiles the same code as v2)
    CPU_SLOWER[("linear_attention", _level)] = "fwd+bwd 37.9 against 34.1 ms at B1-L2048-H8-D64"
    CPU_SLOWER[("sliding_window_attention", _level)] = "fwd+bwd 56.5 against 53.2 ms at B1-L2048-H8-D64-W128"
del _level


def without_autocast(fn: Callable) -> Callable:
    """fn, run with autocast off wherever it is on: every op computes in its inputs' dtypes. The ops are not
    autocast ops, but an autocast region stays on inside a custom op's implementation and a backward, where it
    would cast their own torch products: under bf16 autocast an fp32 call's byte table would come out of a bf16
    product, and the Triton sampler's h scratch would turn bf16, which its kernel does not compile for."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch._C._is_any_autocast_enabled():  # one call, ~0.15 µs: what a decode step pays
            return fn(*args, **kwargs)
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, enabled=False):
                    return run(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries for op on device_type, in order."""
    return OP_AUTO_ORDER.get((op, device_type)) or AUTO_ORDER.get(device_type, ("reference",))

Reason = Optional[str]  # why a backend cannot serve; None when it can


class BackendError(RuntimeError):
    """A backend asked for by name cannot serve the call."""


def always(*args: Any, **kwargs: Any) -> Reason:
    """A ``check`` or ``available`` that accepts every call."""
    return None


@dataclass(frozen=True)
class Backend:
    fn: Callable
    check: Callable[..., Reason]
    available: Callable[[str], Reason]


_registry: dict[str, dict[str, Backend]] = {}
_availability: dict[tuple[str, str, str], Reason] = {}
_warned: set[tuple[str, str, str]] = set()


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    check: Callable[..., Reason] = always,
    available: Callable[[str], Reason] = always,
) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op``; ``fn`` takes the public function's arguments."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = Backend(fn, check, available)


@torch.compiler.assume_constant_result
def _unavailable(op: str, backend: str, device_type: str) -> Reason:
    key = (op, backend, device_type)
    if key not in _availability:
        _availability[key] = _registry[op][backend].available(device_type)
    return _availability[key]


_auto_skips: dict[tuple[str, str, str], Reason] = {}


@torch.compiler.assume_constant_result
def _auto_skip(op: str, backend: str, device_type: str) -> Reason:
    """Why ``auto`` passes over an available backend (CPU_SLOWER), or None."""
    key = (op, backend, device_type)
    if key not in _auto_skips:
        _auto_skips[key] = None
        level = cpu_kernel_level(op) if backend == "cpu" and device_type == "cpu" else None
        if (op, level) in CPU_SLOWER:
            _auto_skips[key] = f"built for {level}, where it is slower than the reference ({CPU_SLOWER[op, level]})"
    return _auto_skips[key]


def cpu_kernel_level(op: str) -> str | None:
    """The level op's C++ CPU kernels are built for (its library's: csrc/<library>/, a prefix of op's name)."""
    from . import extension

    library = next((lib for lib in extension.ops_with_sources() if op.startswith(lib)), None)
    return extension.built_isa(library) if library else None


def _requested(backend: str | None) -> str:
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS + ("auto",):
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


def _warn_once(op: str, backend: str, reason: str, instead: str) -> None:
    if torch.compiler.is_compiling() or (op, backend, reason) in _warned:
        return
    _warned.add((op, backend, reason))
    warnings.warn(
        f"agiformer_kernels.{op}: backend {backend!r} cannot serve this call ({reason}); using {instead!r}",
        RuntimeWarning,
        stacklevel=4,
    )


def select(op: str, backend: str | None, device: torch.device, *args: Any, **kwargs: Any) -> Callable:
    """The implementation of ``op`` that serves this call; args/kwargs are what it will be called with.

    Decode loops call this once per token, so the path that finds a backend does no more than look
    it up and ask it; the error paths do the rest.
    """
    impls = _registry[op]
    name = backend or os.environ.get(ENV_VAR) or "auto"
    device_type = device.type
    if name != "auto":
        impl = impls.get(name)
        if impl is None:
            _requested(backend)  # an unknown name is a ValueError
            raise BackendError(f"{op} has no {name!r} backend (it has {sorted(impls)})")
        reason = _unavailable(op, name, device_type) or impl.check(*args, **kwargs)
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} cannot serve this call: {reason}")
        return impl.fn
    skipped = []
    for candidate in auto_order(op, device_type):
        impl = impls.get(candidate)
        if impl is None:
            continue
        reason = _unavailable(op, candidate, device_type) or _auto_skip(op, candidate, device_type) or impl.check(
            *args, **kwargs)
        if reason is None:
            for b, why in skipped:
                _warn_once(op, b, why, candidate)
            return impl.fn
        skipped.append((candidate, reason))
    raise BackendError(f"{op}: no backend can serve this call: {dict(skipped)}")


def available_backends(device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """For each op and backend: ``"available"`` or why not, for tensors on ``device``.

    ``device`` defaults to ``"cuda"`` when a GPU is present, else ``"cpu"``. Asking may build
    the C++ extensions (JIT, once). A backend can still decline a call it does not support
    (a dtype, a head dim); its error says so. One that ``auto`` passes over here (CPU_SLOWER)
    reads ``"available; auto skips it: <why>"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    report = {}
    for op in sorted(_registry):
        report[op] = {}
        for b in BACKENDS:
            if b not in _registry[op]:
                report[op][b] = "not implemented for this op"
            else:
                skip = None if _unavailable(op, b, device_type) else _auto_skip(op, b, device_type)
                report[op][b] = _unavailable(op, b, device_type) or (
                    f"available; auto skips it: {skip}" if skip else "available")
    return report


def triton_unavailable(device_type: str) -> Reason:
    """Why Triton kernels cannot run on tensors of this device type, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1 before importing triton)"
    return f"triton does not run {device_type} tensors"


_loaded: set[Callable[[], None]] = set()


def extension_available(
    library: str, kernel: str, device_type: str, on_load: Callable[[], None]
) -> Callable[[str], Reason]:
    """An ``available`` for a backend served by ``torch.ops.agiformer_kernels.<kernel>`` of ``csrc/<library>/`` on
    one device type. ``on_load`` (the op's fake kernels and autograd, which attach only to a loaded library) runs
    once, the first time the library is found."""

    def available(actual: str) -> Reason:
        if actual != device_type:
            return f"it runs only {device_type} tensors, these are on {actual}"
        from . import extension

        reason = extension.unavailable(library, kernel, torch.device(actual))
        if reason is None and on_load not in _loaded:
            on_load()
            _loaded.add(on_load)
        return reason

    return available


def register_extension(
    op: str,
    fn: Callable,
    *,
    library: str,
    kernel: str,
    on_load: Callable[[], None],
    checks: dict[str, Callable[..., Reason]],
) -> None:
    """Register ``fn`` as op's ``"cpu"`` and/or ``"cuda"`` backend (the keys of ``checks``, each with its check),
    served by the C++ extension's ``kernel`` (see ``extension_available``)."""
    for device_type, check in checks.items():
        register(op, device_type, fn, check=check, available=extension_available(library, kernel, device_type, on_load))
