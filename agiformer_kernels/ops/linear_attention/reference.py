"""Causal linear attention in pure PyTorch (docs/ops.md §1.1).

``naive_linear_attention`` is the oracle: the recurrence over t written straight from the math.
``linear_attention_reference`` is the fallback, and the strong pure-PyTorch baseline the kernels are
measured against: every chunk of C tokens in single batched matmuls, the inter-chunk states by an
exclusive cumsum. Its memory is O(L·C) for the masked intra-chunk scores plus O(L/C·D·Dv) states.
Both accumulate in fp32 (fp64 for fp64 inputs) and return the output in the input dtype.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ... import backends
from ._common import CHUNK, OP, STEP_OP, acc_dtype


def feature(x: torch.Tensor, feature_map: str, feature_eps: float) -> torch.Tensor:
    """φ(x) in the accumulation dtype."""
    x = x.to(acc_dtype(x.dtype))
    if feature_map == "identity":
        return x
    return F.elu(x) + (1.0 + feature_eps)


def naive_linear_attention(q, k, v, *, feature_map, feature_eps, scale, eps, normalize, initial_state,
                           output_final_state, cu_seqlens):
    """S_t = S_0 + Σ_{s≤t} k̂_s v_sᵀ, z_t = z_0 + Σ_{s≤t} k̂_s, o_t = q̂_tᵀS_t / (q̂_tᵀz_t + eps), one t at a
    time."""
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


def linear_attention_reference(q, k, v, *, feature_map, feature_eps, scale, eps, normalize, initial_state,
                               output_final_state, cu_seqlens, chunk=CHUNK):
    """The same op with every chunk in one batched matmul and an exclusive cumsum over chunk states.

    v gets a column of ones, so the normalizer rides along in every matmul: [S | z] is one state and
    one product yields [q̂ᵀS | q̂ᵀz]. With ``normalize`` the scale cancels except against eps, so it
    is applied as eps / scale instead of as a pass over q.
    """
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    qh = feature(q, feature_map, feature_eps)
    kh = feature(k, feature_map, feature_eps)
    v1 = F.pad(v.to(qh.dtype), (0, 1), value=1.0)
    if normalize and scale != 0:
        eps_over_scale = eps / scale
    else:
        qh = qh * scale
    if cu_seqlens is not None:
        length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        qh, kh, v1 = (_segments_to_batch(x, cu_seqlens, length) for x in (qh, kh, v1))
    else:
        length = L
    N = qh.shape[0]
    nc = max(1, -(-length // chunk))
    pad = nc * chunk - length
    # [N, T, H, D] -> [N·H·nc, C, D], padded with zero keys, which add nothing to any state.
    qc, kc, vc = (
        F.pad(x.transpose(1, 2), (0, 0, 0, pad)).reshape(N * H * nc, chunk, x.shape[-1]) for x in (qh, kh, v1)
    )

    scores = torch.bmm(qc, kc.transpose(1, 2)).tril_()  # s <= t within the chunk
    kv = torch.bmm(kc.transpose(1, 2), vc).view(N * H, nc, D, Dv + 1)  # chunk states [k̂ᵀv | Σk̂]
    if initial_state is None:
        first = kv.new_zeros(N * H, 1, D, Dv + 1)
    else:
        S0, z0 = (t.to(kv.dtype) for t in initial_state)
        first = torch.cat([S0, z0[..., None]], dim=-1).view(N * H, 1, D, Dv + 1)
    S_prev = torch.cat([first, kv[:, :-1]], dim=1).cumsum(1)  # the state before each chunk
    num = torch.baddbmm(torch.bmm(qc, S_prev.view(-1, D, Dv + 1)), scores, vc)
    if normalize:
        o = num[..., :Dv] / (num[..., Dv:] + (eps_over_scale if scale != 0 else eps))
    else:
        o = num[..., :Dv]
    o = o.view(N, H, nc * chunk, Dv)[:, :, :length].transpose(1, 2)
    if cu_seqlens is not None:
        o = _batch_to_segments(o, cu_seqlens) if N else o.new_zeros(1, 0, H, Dv)
    o = o.to(q.dtype).contiguous()
    if not output_final_state:
        return o
    final = (S_prev[:, -1] + kv[:, -1]).view(N, H, D, Dv + 1).to(acc_dtype(q.dtype))
    return o, (final[..., :Dv].contiguous(), final[..., Dv].contiguous())


def linear_attention_step_reference(q, k, v, state, *, feature_map, feature_eps, scale, eps,
                                    normalize) -> torch.Tensor:
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


backends.register(OP, "reference", linear_attention_reference)
backends.register(STEP_OP, "reference", linear_attention_step_reference)
