"""Sliding-window attention (docs/ops.md §1.2) and its decode step: our backends beside the strongest
PyTorch formulations and, on GPU, FlexAttention with a sliding-window BlockMask and SDPA with a
dense boolean mask.

Roofline numbers count only the visible (query, key) pairs: sum_i min(i + 1, window) per head,
4·D FLOPs each in the forward (q·k and p·v), and the bytes of q, k, v read once and o written once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from agiformer_kernels import sliding_window_attention, sliding_window_attention_step
from benchmarks.registry import backend_available, case, impl

OP = "sliding_window_attention"
STEP_OP = "sliding_window_attention_step"
BLOCK = 64  # the blocked PyTorch baseline's query block


def visible_pairs(L: int, window: int) -> int:
    W = min(window, L)
    return W * L - W * (W - 1) // 2


def attention_inputs(B: int, L: int, H: int, D: int, window: int):
    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        return {"q": q, "k": k, "v": v, "window": window}

    return make


def attention_case(B, L, H, D, window, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    case(OP, f"B{B}-L{L}-H{H}-D{D}-W{window}", device, dtype, attention_inputs(B, L, H, D, window),
         flops=4 * D * B * H * visible_pairs(L, window), bytes=4 * B * L * H * D * size,
         params=dict(B=B, L=L, H=H, D=D, window=window), **kw)


# ------------------------------------------------------------------ ours


def _ours(backend: str):
    def run(inputs):
        return sliding_window_attention(inputs["q"], inputs["k"], inputs["v"], inputs["window"], backend=backend)

    return run


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(OP, _name, _ours(_name), available=backend_available(_name, OP))


# ------------------------------------------------------------------ alternatives


def torch_blocked(inputs):
    """The strong pure-PyTorch form: blocks of 64 queries against an unfolded key span of 64 + window - 1,
    all blocks in one batched matmul, computed in the input dtype."""
    q, k, v, window = inputs["q"], inputs["k"], inputs["v"], inputs["window"]
    B, L, H, D = q.shape
    W, C = min(window, L), min(BLOCK, L)
    n = -(-L // C)
    S = C + W - 1
    qb = F.pad((q * D**-0.5).transpose(1, 2), (0, 0, 0, n * C - L)).reshape(B, H, n, C, D)
    ks = F.pad(k.transpose(1, 2), (0, 0, W - 1, n * C - L)).unfold(2, S, C)  # [B, H, n, D, S]
    vs = F.pad(v.transpose(1, 2), (0, 0, W - 1, n * C - L)).unfold(2, S, C)
    row = torch.arange(C, device=q.device).view(1, C, 1)
    col = torch.arange(S, device=q.device).view(1, 1, S)
    key_pos = torch.arange(n, device=q.device).view(n, 1, 1) * C - (W - 1) + col
    visible = (col >= row) & (col <= row + W - 1) & (key_pos >= 0)
    p = (qb @ ks).masked_fill(~visible, float("-inf")).softmax(-1)
    return (p @ vs.transpose(-1, -2)).reshape(B, H, n * C, D)[:, :, :L].transpose(1, 2)


@functools.lru_cache(maxsize=8)
def _dense_mask(L: int, window: int, device: str) -> torch.Tensor:
    i = torch.arange(L, device=device).view(L, 1)
    j = torch.arange(L, device=device).view(1, L)
    return (j <= i) & (j > i - window)


def sdpa_dense(inputs):
    """SDPA with a dense L x L boolean mask: what most models do (O(L^2) work and memory)."""
    q, k, v, window = inputs["q"], inputs["k"], inputs["v"], inputs["window"]
    mask = _dense_mask(q.shape[1], window, q.device.type)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=8)
def _block_mask(L: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    with torch.inference_mode(False):  # cached: a mask made in a forward-only timing must serve backward too
        return create_block_mask(sliding_window, B=None, H=None, Q_LEN=L, KV_LEN=L, device=device)


def flex(inputs):
    """FlexAttention (compiled) with a sliding-window BlockMask: skips blocks outside the window."""
    q, k, v, window = inputs["q"], inputs["k"], inputs["v"], inputs["window"]
    block_mask = _block_mask(q.shape[1], window, q.device.type)
    o = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return o.transpose(1, 2)


def _cuda_only(c):
    return None if c.device == "cuda" else "GPU baseline (the issue compares it on CUDA only)"


def _flex_available(c):
    if c.device != "cuda":
        return _cuda_only(c)
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:
        return f"FlexAttention unavailable: {e}"
    return None


def _dense_fits(c):
    """Dense-mask SDPA materializes [B, H, L, L] scores: skip shapes where that alone passes 4 GiB."""
    p = c.params
    need = p["B"] * p["H"] * p["L"] ** 2 * torch.finfo(c.dtype).bits // 8
    return None if need <= 4 * 2**30 else f"dense [B, H, L, L] scores need {need / 2**30:.0f} GiB"


impl(OP, "torch-blocked", torch_blocked, alternative=True)
impl(OP, "sdpa-dense-mask", sdpa_dense, available=_dense_fits, alternative=True)
impl(OP, "flex-attention", flex, available=_flex_available, alternative=True)


# ------------------------------------------------------------------ cases

# CPU (fp32): the target shape, and L = 16384 for peak memory growing linearly in L.
attention_case(1, 2048, 8, 64, 128, "cpu", torch.float32, quick=True)
attention_case(1, 16384, 8, 64, 128, "cpu", torch.float32)
for _L in (1024, 4096, 8192):
    attention_case(1, _L, 8, 64, 128, "cpu", torch.float32, sweep=True)
# GPU (bf16), docs/ops.md §3.
for _B, _L, _H, _D, _W in ((8, 4096, 8, 64, 128), (1, 65536, 8, 64, 128), (4, 4096, 16, 128, 128),
                           (4, 4096, 16, 128, 512)):
    attention_case(_B, _L, _H, _D, _W, "cuda", torch.bfloat16)


# ------------------------------------------------------------------ decode step


def step_inputs(B: int, H: int, D: int, window: int):
    """A ring already full (position past the window), one new token per sequence."""

    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        caches = [torch.randn(B, window, H, D, device=device, dtype=dtype, generator=g) for _ in range(2)]
        return {"q": q, "k": k, "v": v, "k_cache": caches[0], "v_cache": caches[1], "pos": window + 5}

    return make


def _ours_step(backend: str):
    def run(inputs):
        return sliding_window_attention_step(inputs["q"], inputs["k"], inputs["v"], inputs["k_cache"],
                                             inputs["v_cache"], inputs["pos"], backend=backend)

    return run


def torch_step(inputs):
    """PyTorch ops as a model would write the step: write the ring slot, then SDPA over all W slots."""
    q, k, v, kc, vc, pos = (inputs[n] for n in ("q", "k", "v", "k_cache", "v_cache", "pos"))
    W = kc.shape[1]
    kc[:, pos % W] = k
    vc[:, pos % W] = v
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3))
    return o.squeeze(2)


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(STEP_OP, _name, _ours_step(_name), available=backend_available(_name, STEP_OP))
impl(STEP_OP, "torch-sdpa", torch_step, alternative=True)


def step_case(B, H, D, window, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    case(STEP_OP, f"B{B}-H{H}-D{D}-W{window}", device, dtype, step_inputs(B, H, D, window), backward=False,
         flops=4 * D * B * H * window, bytes=2 * B * window * H * D * size, params=dict(B=B, H=H, D=D, window=window),
         **kw)


step_case(1, 8, 64, 128, "cpu", torch.float32, quick=True)
step_case(16, 8, 64, 128, "cpu", torch.float32)
for _B in (1, 16):
    step_case(_B, 8, 64, 128, "cuda", torch.bfloat16)
