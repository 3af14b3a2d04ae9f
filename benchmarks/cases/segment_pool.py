"""Learned-query segment pooling (docs/ops.md §1.5): our backends beside dense-mask SDPA, the formulation
Abstractinator's LearnedQueryAttention uses (every segment's Q queries against the whole row under an
[S·Q, L] boolean mask), per batch row.

Roofline numbers count the useful work only: every position against the Q queries of its own segment,
2·D + 2·Dv FLOPs per (position, query, head), and the bytes of k, v read once and the output written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agiformer_kernels import segment_pool
from benchmarks.registry import backend_available, case, impl

OP = "segment_pool"


def segment_lengths(B: int, L: int, mean: float, seed: int = 0) -> list[list[int]]:
    """Per row, segment lengths drawn uniformly from 1 .. 2·mean - 1 (mean ``mean``) until the row is full."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        left, row = L, []
        while left:
            n = min(left, int(torch.randint(1, int(2 * mean), (1,), generator=g)))
            row.append(n)
            left -= n
        rows.append(row)
    return rows


def pool_inputs(B, L, H, D, Q, mean):
    rows = segment_lengths(B, L, mean)
    lengths = torch.tensor([n for row in rows for n in row])

    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        queries = torch.randn(Q, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
        k, v = (torch.randn(B * L, H, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(2))
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)
        return {"queries": queries, "k": k, "v": v, "offsets": offsets, "rows": [len(r) for r in rows], "L": L}

    return make


def pool_case(B, L, H, D, Q, mean, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    T = B * L
    case(OP, f"B{B}-L{L}-H{H}-D{D}-Q{Q}-seg{mean}", device, dtype, pool_inputs(B, L, H, D, Q, mean),
         flops=4 * D * T * Q * H, bytes=2 * T * H * D * size, params=dict(B=B, L=L, H=H, D=D, Q=Q, mean=mean), **kw)


def _ours(backend: str):
    def run(inputs):
        return segment_pool(inputs["queries"], inputs["k"], inputs["v"], inputs["offsets"], backend=backend)

    return run


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(OP, _name, _ours(_name), available=backend_available(_name, OP))


def sdpa_dense(inputs):
    """Per batch row: the row's S_b·Q queries against its L positions under a dense [S_b·Q, L] mask."""
    queries, k, v, offsets, L = inputs["queries"], inputs["k"], inputs["v"], inputs["offsets"], inputs["L"]
    Q, H, D = queries.shape
    outs, s0 = [], 0
    pos = torch.arange(L, device=k.device)
    for b, S_b in enumerate(inputs["rows"]):
        starts = offsets[s0 : s0 + S_b].long() - b * L  # segment starts within the row
        seg = torch.searchsorted(starts, pos, right=True) - 1  # [L]
        mask = (torch.arange(S_b, device=k.device).repeat_interleave(Q).view(-1, 1) == seg.view(1, L))  # [S_b·Q, L]
        q = queries.transpose(0, 1).unsqueeze(1).expand(H, S_b, Q, D).reshape(1, H, S_b * Q, D)
        kb, vb = (t[b * L : (b + 1) * L].transpose(0, 1).unsqueeze(0) for t in (k, v))
        o = F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask)  # [1, H, S_b·Q, D]
        outs.append(o[0].view(H, S_b, Q, D).permute(1, 2, 0, 3))
        s0 += S_b
    return torch.cat(outs)


def _dense_fits(c):
    p = c.params
    S_row = p["L"] / p["mean"]
    need = p["H"] * S_row * p["Q"] * p["L"] * 4  # one row's fp32 scores (the mask and softmax add more)
    return None if need <= 2 * 2**30 else f"dense [H, S·Q, L] scores of one row need {need / 2**30:.0f} GiB"


impl(OP, "sdpa-dense-mask", sdpa_dense, available=_dense_fits, alternative=True)

# CPU (fp32): a 2048-byte row, Q 4 and 1, mean segment 4.5 bytes.
pool_case(1, 2048, 8, 64, 4, 4.5, "cpu", torch.float32, quick=True)
pool_case(1, 2048, 8, 64, 1, 4.5, "cpu", torch.float32)
# GPU (bf16): the shape, Q 1 and 4.
for _Q in (1, 4):
    pool_case(8, 8192, 8, 64, _Q, 4.5, "cuda", torch.bfloat16)
