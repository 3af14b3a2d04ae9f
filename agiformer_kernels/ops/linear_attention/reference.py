"""Causal linear attention in pure PyTorch (SPEC §1.1).

``linear_attention_naive`` is the oracle: the recurrence over t written straight from the math.
``linear_attention_chunked`` is the fallback, and the strong pure-PyTorch baseline the kernels are
measured against: every chunk of C tokens in single batched matmuls, the inter-chunk states by an
exclusive cumsum. Its memory is O(L·C) for the masked intra-chunk scores plus O(L/C·D·Dv) states.
Both accumulate in fp32 (fp64 for fp64 inputs) and return the output in the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import backends

CHUNK = 64

State = tuple[torch.Tensor, torch.Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and state) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature(x: torch.Tensor, feature_map: str, feature_eps: float) -> torch.Tensor:
    """φ(x) in the accumulation dtype."""
    x = x.to(acc_dtype(x.dtype))
    if feature_map == "identity":
        return x
    return F.elu(x) + (1.0 + feature_eps)


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
    initial_state: Optional[State],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
):
    """S_t = S_0 + Σ_{s≤t} k̂_s v_sᵀ, z_t = z_0 + Σ_{s≤t} k̂_s, o_t = q̂_tᵀS_t / (q̂_tᵀz_t + eps): one t at a time."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    qh = feature(q, feature_map, feature_eps) * scale
    kh = feature(k, feature_map, feature_eps)
    vv = v.to(qh.dtype)
    if cu_seqlens is None:
        segments = [(b, 0, L) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(segments):
        if initial_state is None:
            S = qh.new_zeros(H, D, Dv)
            z = qh.new_zeros(H, D)
        else:
            S, z = initial_state[0][n].to(qh.dtype), initial_state[1][n].to(qh.dtype)
        for t in range(start, end):
            S = S + kh[b, t, :, :, None] * vv[b, t, :, None, :]
            z = z + kh[b, t]
            num = torch.einsum("hd,hde->he", qh[b, t], S)
            if normalize:
                num = num / (torch.einsum("hd,hd->h", qh[b, t], z) + eps)[:, None]
            outputs.append(num)
        finals.append((S, z))
    if cu_seqlens is None:
        o = torch.stack(outputs).reshape(B, L, H, Dv)
    else:
        o = torch.stack(outputs).reshape(1, L, H, Dv) if outputs else qh.new_zeros(1, 0, H, Dv)
    o = o.to(q.dtype)
    if not output_final_state:
        return o
    state_dtype = acc_dtype(q.dtype)
    S_final = torch.stack([S for S, _ in finals]).to(state_dtype)
    z_final = torch.stack([z for _, z in finals]).to(state_dtype)
    return o, (S_final, z_final)


def _segments_to_batch(x: torch.Tensor, cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Packed [1, T, ...] -> [n, length, ...] with zeros past each segment's end (one gather)."""
    starts, lens = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    pos = torch.arange(length, device=x.device)
    valid = pos[None, :] < lens[:, None]
    idx = (starts[:, None] + pos[None, :]).clamp_max(max(x.shape[1] - 1, 0))
    out = x[0][idx]
    return out * valid.view(*valid.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def _batch_to_segments(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[n, length, ...] -> packed [1, T, ...] (inverse of _segments_to_batch on the valid positions)."""
    starts, lens = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lens), device=x.device), lens)
    pos = torch.arange(int(cu_seqlens[-1]), device=x.device) - starts[seg]
    return x[seg, pos][None]


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
    initial_state: Optional[State],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    chunk: int = CHUNK,
):
    """The same op with every chunk in one batched matmul and an exclusive cumsum over chunk states."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    qh = feature(q, feature_map, feature_eps) * scale
    kh = feature(k, feature_map, feature_eps)
    vv = v.to(qh.dtype)
    if cu_seqlens is not None:
        length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        qh, kh, vv = (_segments_to_batch(x, cu_seqlens, length) for x in (qh, kh, vv))
    else:
        length = L
    N = qh.shape[0]
    nc = max(1, -(-length // chunk))
    pad = nc * chunk - length
    # Padded keys and values are zero, so they add nothing to any state.
    qh, kh, vv = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qh, kh, vv))
    # [N, T, H, D] -> [N, H, nc, C, D]
    qc, kc, vc = (x.view(N, nc, chunk, H, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (qh, kh, vv))

    if initial_state is None:
        S0 = qc.new_zeros(N, H, 1, D, Dv)
        z0 = qc.new_zeros(N, H, 1, D)
    else:
        S0 = initial_state[0].to(qc.dtype)[:, :, None]
        z0 = initial_state[1].to(qc.dtype)[:, :, None]

    scores = torch.tril(qc @ kc.transpose(-1, -2))  # [N, H, nc, C, C], s <= t
    kv = kc.transpose(-1, -2) @ vc  # [N, H, nc, D, Dv]
    S_incl = torch.cumsum(torch.cat([S0, kv], dim=2), dim=2)  # S after chunk c is S_incl[:, :, c + 1]
    num = scores @ vc + qc @ S_incl[:, :, :-1]
    if normalize or output_final_state:
        z_incl = torch.cumsum(torch.cat([z0, kc.sum(-2)], dim=2), dim=2)
    if normalize:
        den = scores.sum(-1) + (qc @ z_incl[:, :, :-1, :, None]).squeeze(-1) + eps
        num = num / den[..., None]
    o = num.permute(0, 2, 3, 1, 4).reshape(N, nc * chunk, H, Dv)[:, :length]
    if cu_seqlens is not None:
        o = _batch_to_segments(o, cu_seqlens) if N else o.new_zeros(1, 0, H, Dv)
    o = o.to(q.dtype)
    if not output_final_state:
        return o
    state_dtype = acc_dtype(q.dtype)
    return o, (S_incl[:, :, -1].to(state_dtype), z_incl[:, :, -1].to(state_dtype))


def linear_attention_step_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    feature_map: str,
    feature_eps: float,
    scale: float,
    eps: float,
    normalize: bool,
) -> torch.Tensor:
    """One token: S += k̂ vᵀ, z += k̂ (in place), o = q̂ᵀS / (q̂ᵀz + eps)."""
    S, z = state
    qh = feature(q, feature_map, feature_eps).to(S.dtype) * scale
    kh = feature(k, feature_map, feature_eps).to(S.dtype)
    S.add_(kh[..., :, None] * v.to(S.dtype)[..., None, :])
    z.add_(kh)
    num = (qh[..., None, :] @ S).squeeze(-2)
    if normalize:
        num = num / ((qh * z).sum(-1, keepdim=True) + eps)
    return num.to(q.dtype)


backends.register("linear_attention", "reference", linear_attention_chunked)
backends.register("linear_attention_step", "reference", linear_attention_step_reference)
