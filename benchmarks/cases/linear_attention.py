"""Causal linear attention (docs/ops.md §1.1) and its decode step: our backends beside the strong pure-PyTorch
formulation (the reference backend: every chunk in single batched matmuls, an exclusive cumsum of chunk
states) and, on GPU, flash-linear-attention's chunk_linear_attn(normalize=True).

Roofline numbers count the chunked algorithm's useful forward FLOPs with C = 64, per token and head:
C·D (causal half of q̂k̂ᵀ) + C·Dv (causal half of A·v) + 2·D·Dv (q̂ᵀS) + 2·D·Dv (k̂ᵀv into S), and
the bytes of q, k, v read once and o written once.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from agiformer_kernels import linear_attention, linear_attention_step
from benchmarks.registry import backend_available, case, impl

OP = "linear_attention"
STEP_OP = "linear_attention_step"
CHUNK = 64
FEATURE_EPS = 1e-4


def forward_flops(B: int, L: int, H: int, D: int, Dv: int) -> float:
    return B * L * H * (CHUNK * D + CHUNK * Dv + 4 * D * Dv)


def attention_inputs(B: int, L: int, H: int, D: int):
    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        return {"q": q, "k": k, "v": v}

    return make


def attention_case(B, L, H, D, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    case(OP, f"B{B}-L{L}-H{H}-D{D}", device, dtype, attention_inputs(B, L, H, D),
         flops=forward_flops(B, L, H, D, D), bytes=4 * B * L * H * D * size, params=dict(B=B, L=L, H=H, D=D), **kw)


# ------------------------------------------------------------------ ours


def _ours(backend: str):
    def run(inputs):
        return linear_attention(inputs["q"], inputs["k"], inputs["v"], backend=backend)

    return run


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(OP, _name, _ours(_name), available=backend_available(_name, OP))


# ------------------------------------------------------------------ alternatives


def fla_chunk(inputs):
    """flash-linear-attention's chunked kernel with its own normalizer; φ applied outside it in PyTorch,
    as a user of fla writes this op (fla keeps the prefix sum in the input dtype and divides in PyTorch)."""
    import inspect

    from fla.ops.linear_attn import chunk_linear_attn

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    qh, kh = (F.elu(x) + (1.0 + FEATURE_EPS) for x in (q, k))
    # Older fla releases default to [B, H, T, D] (head_first=True); newer ones take only [B, T, H, D].
    layout = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}
    o = chunk_linear_attn(qh, kh, v, scale=q.shape[-1] ** -0.5, normalize=True, **layout)
    return o[0] if isinstance(o, tuple) else o


def _fla_available(c):
    if c.device != "cuda":
        return "GPU baseline (the issue compares it on CUDA only)"
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    return None


impl(OP, "fla-chunk", fla_chunk, available=_fla_available, alternative=True)


# ------------------------------------------------------------------ cases

# CPU (fp32): the target shape, a long one for peak memory, and the L sweep.
attention_case(1, 2048, 8, 64, "cpu", torch.float32, quick=True)
attention_case(1, 16384, 8, 64, "cpu", torch.float32)
for _L in (1024, 4096, 8192):
    attention_case(1, _L, 8, 64, "cpu", torch.float32, sweep=True)
# GPU (bf16), docs/ops.md §3.
for _B, _L, _H, _D in ((8, 4096, 8, 64), (1, 65536, 8, 64), (4, 4096, 16, 128)):
    attention_case(_B, _L, _H, _D, "cuda", torch.bfloat16)


# ------------------------------------------------------------------ decode step


def step_inputs(B: int, H: int, D: int):
    """One token per sequence after a prefix: a state with a realistic (large, positive) normalizer."""

    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        S = torch.randn(B, H, D, D, device=device, dtype=torch.float32, generator=g)
        z = torch.rand(B, H, D, device=device, dtype=torch.float32, generator=g) * 1000
        return {"q": q, "k": k, "v": v, "S": S, "z": z}

    return make


def _ours_step(backend: str):
    def run(inputs):
        return linear_attention_step(inputs["q"], inputs["k"], inputs["v"], (inputs["S"], inputs["z"]),
                                     backend=backend)

    return run


def torch_step(inputs):
    """The step as PyTorch ops, as a model would write it: φ, rank-1 state update in place, readout."""
    q, k, v, S, z = (inputs[n] for n in ("q", "k", "v", "S", "z"))
    qh = (F.elu(q.float()) + (1.0 + FEATURE_EPS)) * q.shape[-1] ** -0.5
    kh = F.elu(k.float()) + (1.0 + FEATURE_EPS)
    S.add_(kh.unsqueeze(-1) * v.float().unsqueeze(-2))
    z.add_(kh)
    num = torch.einsum("bhd,bhde->bhe", qh, S)
    den = (qh * z).sum(-1, keepdim=True) + 1e-4
    return (num / den).to(q.dtype)


def cpu_op_step(inputs):
    """The C++ step op itself: the cpu backend without the public function's Python input checks and
    backend selection (~7 µs of a B1 step)."""
    q, k, v, S, z = (inputs[n] for n in ("q", "k", "v", "S", "z"))
    return torch.ops.agiformer_kernels.linear_attention_step.default(
        q, k, v, S, z, "elu+1", FEATURE_EPS, q.shape[-1] ** -0.5, 1e-4, True
    )


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(STEP_OP, _name, _ours_step(_name), available=backend_available(_name, STEP_OP))
impl(STEP_OP, "cpu-op", cpu_op_step, available=backend_available("cpu", STEP_OP))
impl(STEP_OP, "torch-ops", torch_step, alternative=True)


def step_case(B, H, D, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    # S read and written (fp32) dominates; q, k, v, o are 4 vectors per head.
    case(STEP_OP, f"B{B}-H{H}-D{D}", device, dtype, step_inputs(B, H, D), backward=False,
         flops=4 * D * D * B * H, bytes=B * H * (2 * D * D * 4 + 4 * D * size), params=dict(B=B, H=H, D=D), **kw)


step_case(1, 8, 64, "cpu", torch.float32, quick=True)
step_case(16, 8, 64, "cpu", torch.float32)
for _B in (1, 16):
    step_case(_B, 8, 64, "cuda", torch.bfloat16)
