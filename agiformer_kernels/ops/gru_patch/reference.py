"""Pure-PyTorch GRU patch decoder (docs/ops.md §1.3): the naive oracle and the efficient fallback.

The ``naive_*`` functions follow the math literally: every step builds the concatenated input
x_t = [byte_emb[b_t] | c] and multiplies it by the whole ``weight_ih``. The efficient forms (the
"reference" backend) use the structure the fused kernels use: W_ih·x_t splits into a row of the
256×3h table byte_emb·W_ih[:, :h]ᵀ (a gather) plus W_ih[:, h:]·c (one GEMM per patch, shared by
the P steps). The P steps stay a loop: they are the recurrence itself, batched over all M patches.

Sampling draws one uniform per (row, step) from a counter-based hash of a seed taken from the
generator, and picks the byte by inverse CDF over softmax(logits / temperature). Every backend
computes the same hash, so for the same generator state all backends sample the same bytes
(up to rounding at the edges of the CDF).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import backends
from ._common import DECODE_OP, LOSS_OP, SAMPLE_OP, VOCAB, acc_dtype, draw_seed, reduce, teacher_inputs


def gru_cell(gi: torch.Tensor, h: torch.Tensor, weight_hh: torch.Tensor, bias_hh: torch.Tensor) -> torch.Tensor:
    """One PyTorch GRU step from the input projection gi = W_ih·x + b_ih ``[..., 3h]``."""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


# ---------------------------------------------------------------------------------------------
# Counter-based RNG shared by every backend: lowbias32 (C. Wellons) chained over seed, row, step.


MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x·c) mod 2^32 from two 16-bit halves of c, so no int64 product overflows.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, rows: torch.Tensor, step: int, dtype: torch.dtype) -> torch.Tensor:
    """u ∈ [0, 1) with 24 random bits for each row at this step: mix(mix(mix(s0 ^ row) ^ s1) ^ step)."""
    x = _mix32(seed[0] ^ rows)
    x = _mix32(x ^ seed[1])
    x = _mix32(x ^ step)
    return (x >> 8).to(dtype) * (1.0 / (1 << 24))


def choose_bytes(
    logits: torch.Tensor, temperature: float, top_k: Optional[int], u: Optional[torch.Tensor]
) -> torch.Tensor:
    """The byte of each row ``[M]`` from logits ``[M, 256]`` (accumulation dtype).

    temperature 0: argmax, first index on ties. Otherwise inverse CDF: with e_k = exp((l_k - max) / T)
    (zero outside the top_k logits, ties at the k-th value kept) and c its running sum, the byte is the
    first k with c_k > u·c_255; if rounding leaves none, the argmax. A NaN logit is the maximum, as for
    torch.argmax: a row holding NaNs gets the first NaN's byte, greedy or not (its c is all NaN).
    """
    best = logits.argmax(-1)
    if temperature == 0:
        return best
    if top_k is not None and top_k < VOCAB:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    mx = logits.gather(1, best[:, None])
    c = torch.exp((logits - mx) / temperature).cumsum(-1)
    above = c > u[:, None] * c[:, -1:]
    return torch.where(above.any(-1), above.int().argmax(-1), best)


# ---------------------------------------------------------------------------------------------
# Naive oracle: explicit steps over the concatenated input.


def naive_gru_patch_decode(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh) -> torch.Tensor:
    M, P = prev_bytes.shape
    h = context.new_zeros(M, context.shape[1])
    out = []
    for t in range(P):
        x = torch.cat([byte_emb[prev_bytes[:, t].long()], context], -1)
        h = gru_cell(x @ weight_ih.T + bias_ih, h, weight_hh, bias_hh)
        out.append(h)
    return torch.stack(out, 1)


def naive_gru_patch_loss(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight,
                         head_bias, *, sos=0, reduction="mean") -> torch.Tensor:
    prev = teacher_inputs(targets, sos)
    hidden = naive_gru_patch_decode(context, prev, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    logits = (hidden @ head_weight.T + head_bias).to(acc_dtype(context.dtype))
    picked = logits.gather(-1, targets.long()[..., None])[..., 0]
    loss = torch.logsumexp(logits, -1) - picked
    return reduce(loss, reduction)


def naive_gru_patch_sample(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *,
                           patch_size, temperature=0.0, top_k=None, prefix=None, sos=0, seed=None) -> torch.Tensor:
    """Sampling straight from the math; ``seed`` is draw_seed's output (needed when temperature > 0)."""
    M = context.shape[0]
    rows = torch.arange(M, device=context.device)
    forced = 0 if prefix is None else prefix.shape[1]
    h = context.new_zeros(M, context.shape[1])
    b = torch.full((M,), sos, dtype=torch.int64, device=context.device)
    out = []
    for t in range(patch_size):
        x = torch.cat([byte_emb[b], context], -1)
        h = gru_cell(x @ weight_ih.T + bias_ih, h, weight_hh, bias_hh)
        if t < forced:
            b = prefix[:, t].long()
        else:
            logits = (h @ head_weight.T + head_bias).to(acc_dtype(context.dtype))
            u = None if temperature == 0 else counter_uniform(seed, rows, t, logits.dtype)
            b = choose_bytes(logits, temperature, top_k, u)
        out.append(b)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------
# Efficient forms: table gather + one context GEMM, the P steps batched over all patches.


def input_projection(context, prev_bytes, byte_emb, weight_ih, bias_ih) -> torch.Tensor:
    """W_ih·[byte_emb[b] | c] + b_ih for every step ``[M, P, 3h]``, as table gather + context GEMM."""
    h = context.shape[1]
    table = byte_emb @ weight_ih[:, :h].T  # [256, 3h]
    gc = F.linear(context, weight_ih[:, h:], bias_ih)  # [M, 3h]
    return table[prev_bytes.long()] + gc[:, None]


def gru_patch_decode_reference(context, prev_bytes, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh):
    gi = input_projection(context, prev_bytes, byte_emb, weight_ih, bias_ih)
    h = context.new_zeros(context.shape)
    out = []
    for t in range(prev_bytes.shape[1]):
        h = gru_cell(gi[:, t], h, weight_hh, bias_hh)
        out.append(h)
    return torch.stack(out, 1)


def gru_patch_loss_reference(context, targets, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight,
                             head_bias, *, sos=0, reduction="mean") -> torch.Tensor:
    prev = teacher_inputs(targets, sos)
    hidden = gru_patch_decode_reference(context, prev, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh)
    logits = F.linear(hidden, head_weight, head_bias).to(acc_dtype(context.dtype))
    out = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1).long(), reduction=reduction)
    return out.view(targets.shape) if reduction == "none" else out


@torch.no_grad()
def gru_patch_sample_reference(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *,
                               patch_size, temperature=0.0, top_k=None, prefix=None, sos=0, generator=None,
                               byte_table=None) -> torch.Tensor:
    seed = None if temperature == 0 else draw_seed(generator, context.device)
    return sample_seeded(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias,
                         patch_size=patch_size, temperature=temperature, top_k=top_k, prefix=prefix, sos=sos,
                         seed=seed, byte_table=byte_table)


def sample_seeded(context, byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, head_weight, head_bias, *,
                  patch_size, temperature, top_k, prefix, sos, seed, byte_table=None) -> torch.Tensor:
    M, hdim = context.shape
    rows = torch.arange(M, device=context.device)
    forced = 0 if prefix is None else prefix.shape[1]
    table = byte_emb @ weight_ih[:, :hdim].T if byte_table is None else byte_table.to(context.dtype)
    gc = F.linear(context, weight_ih[:, hdim:], bias_ih)
    h = context.new_zeros(context.shape)
    b = torch.full((M,), sos, dtype=torch.int64, device=context.device)
    out = torch.empty(M, patch_size, dtype=torch.int64, device=context.device)
    for t in range(patch_size):
        h = gru_cell(table[b] + gc, h, weight_hh, bias_hh)
        if t < forced:
            b = prefix[:, t].long()
        else:
            logits = F.linear(h, head_weight, head_bias).to(acc_dtype(context.dtype))
            u = None if temperature == 0 else counter_uniform(seed, rows, t, logits.dtype)
            b = choose_bytes(logits, temperature, top_k, u)
        out[:, t] = b
    return out


backends.register(DECODE_OP, "reference", gru_patch_decode_reference)
backends.register(LOSS_OP, "reference", gru_patch_loss_reference)
backends.register(SAMPLE_OP, "reference", gru_patch_sample_reference)
