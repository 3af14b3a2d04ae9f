"""Mixers: what moves information between positions. Each is a thin module over one fused op and streams.

The mixer contract (every registered mixer keeps it, so generation works for any architecture):

- ``forward(x [B, L, d]) -> [B, L, d]``, causal;
- ``prefill(x [B, L, d]) -> (y, state)``: ``forward`` over positions 0..L−1 plus the state that continues it;
- ``step(x [B, d], state, pos) -> [B, d]``: position ``pos`` (int, or int64 ``[B]`` per row); ``state``
  advances in place. A state is a tuple or list of tensors whose first dimension is the batch; rows that
  generation prefills apart are merged by zero-padding every other dimension to the largest.

``slot`` is the attribute name a block stores the mixer under (v1's ``attn`` and ``ssm``, so v1 checkpoints
keep their keys).
"""

from __future__ import annotations

from ..cards import Carded
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from agiformer_kernels import backends, sliding_window_attention, sliding_window_attention_step
from agiformer_kernels.nn import LinearAttention, SlidingWindowAttention
from agiformer_kernels.ops.sliding_window_attention._common import OP as WINDOW_OP
from agiformer_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference

from .registry import Context, Registry, heads, require_int

MIXERS = Registry("mixer", "mixer_cls")
Positions = Union[int, torch.Tensor]


@MIXERS.register("window_attention")
class WindowAttention(Carded, SlidingWindowAttention):
    """v1's local branch: softmax attention over the last ``window_size`` positions (default: the model's),
    on ``sliding_window_attention``. Streams with a ring buffer of the last ``window_size`` keys and values:
    O(window) per step, a fixed-size state."""

    slot = "attn"

    def __init__(self, ctx: Context, *, window_size: Optional[int] = None, num_heads: Optional[int] = None):
        key = "window_size" if window_size is not None else "window_size (the model's)"
        window = require_int(key, ctx.window_size if window_size is None else window_size, 1)
        super().__init__(ctx.d_model, heads(ctx, num_heads), window, backend=ctx.backend)


@MIXERS.register("linear_attention")
class LinearAttentionMixer(Carded, LinearAttention):
    """v1's global branch: causal linear attention (elu+1 features, normalised) with its out_proj, LayerNorm
    and dropout, on ``linear_attention``. Streams with the (S, z) state: O(1) per step, a fixed-size state."""

    slot = "ssm"

    def __init__(self, ctx: Context, *, num_heads: Optional[int] = None):
        super().__init__(ctx.d_model, heads(ctx, num_heads), ctx.dropout, backend=ctx.backend)

    def step(self, x: torch.Tensor, state, pos: Positions) -> torch.Tensor:
        return super().step(x, state)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """Causal SDPA ``[B, L, H, D]`` on a kernel that keeps O(L) memory (flash, memory-efficient or cuDNN);
    None where none of them takes these inputs (never the math kernel, which forms the L×L scores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
    except RuntimeError:  # "No available kernel": dtype, head size or device outside these kernels
        return None
    return o.transpose(1, 2)


# From this length (in patches) causal_attention's forward runs on SDPA's flash kernel instead of our window
# op with window = L, on the CPU when no backend is named. Measured fp32 forward + backward, H8-D64, AVX2 CPU
# (medians, ms, ours against SDPA): 1 thread B4-L256 25 / 29, B1-L1024 68 / 89, L2048 255 / 256, L4096
# 1109 / 935; 2 threads L2048 384 / 344, L4096 1368 / 1196. CUDA keeps our kernels until measured there.
SDPA_MIN_CPU_LENGTH = 2048


@MIXERS.register("causal_attention")
class CausalAttention(Carded, nn.Module):
    """Full causal softmax attention: each position attends every earlier one and itself.

    Runs on ``sliding_window_attention`` with window = L (O(L) memory in the C++, Triton and CUDA kernels) or,
    where that was measured faster (the CPU from L = ``SDPA_MIN_CPU_LENGTH``) or where no kernel of ours
    serves the call, and no backend is named, on SDPA's flash kernel; never on a kernel that forms the L×L
    scores (but for a named ``reference`` backend, the oracle, and fp64 on a GPU, which no O(L) kernel takes).

    Streams with a KV cache that **grows with the context**: a step costs O(context) and the state holds every
    past key and value (capacity doubled as it fills, so appending is O(1) amortised); it is the one
    registered mixer whose step is not O(1).
    """

    slot = "causal"

    def __init__(self, ctx: Context, *, num_heads: Optional[int] = None):
        super().__init__()
        self.num_heads = heads(ctx, num_heads)
        self.head_dim = ctx.d_model // self.num_heads
        self.backend = ctx.backend
        self.qkv = nn.Linear(ctx.d_model, 3 * ctx.d_model)
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        L = q.shape[1]
        if self.backend in (None, "auto"):
            # SDPA where measured faster, and where auto would fall back to the reference, whose blocked form
            # keeps BLOCK × (BLOCK + L) scores per block: L² at window = L.
            faster = q.device.type == "cpu" and L >= SDPA_MIN_CPU_LENGTH
            fallback = backends.select(WINDOW_OP, None, q.device, q, k, v, L, scale=q.shape[-1] ** -0.5,
                                       cu_seqlens=None) is sliding_window_attention_reference
            o = _sdpa(q, k, v) if faster or fallback else None
            if o is not None:
                return o
        return sliding_window_attention(q, k, v, L, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, d_model]`` -> ``[B, L, d_model]``."""
        return self.proj(self._attend(*self._split(x)).flatten(-2))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward`` over positions 0..L−1, plus the KV cache ``[k_cache, v_cache]`` (``[B, L, H, E]``
        each, position j in slot j)."""
        q, k, v = self._split(x)
        o = self._attend(q, k, v)
        return self.proj(o.flatten(-2)), [k.contiguous(), v.contiguous()]

    def step(self, x: torch.Tensor, state: list[torch.Tensor], pos: Positions) -> torch.Tensor:
        """Position ``pos``: x ``[B, d_model]`` -> ``[B, d_model]``; appends to the cache in ``state``
        (replacing its tensors by larger ones when full)."""
        q, k, v = self._split(x)
        need = (int(pos.max()) if isinstance(pos, torch.Tensor) else int(pos)) + 1
        capacity = state[0].shape[1]
        if need > capacity:
            for i, cache in enumerate(state):
                grown = cache.new_zeros(cache.shape[0], max(need, 2 * capacity), *cache.shape[2:])
                grown[:, :capacity] = cache
                state[i] = grown
        # The window op's ring buffer with more slots than positions: position j sits in slot j, and the
        # query attends the pos + 1 filled slots, which is causal attention over the whole context.
        o = sliding_window_attention_step(q, k, v, state[0], state[1], pos, backend=self.backend)
        return self.proj(o.flatten(-2))
