"""Causal linear attention (docs/ops.md §1.1) and its one-token decode step."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ... import backends
from ..common import FLOAT_DTYPES, check_cu_seqlens, check_float, check_qkv, check_scale, check_shape
from . import cpp, reference  # noqa: F401  (each registers its backends)
from ._common import FEATURE_MAPS, OP, STEP_OP, State, acc_dtype

if importlib.util.find_spec("triton") is not None:
    from . import triton  # noqa: F401  (registers the "triton" backends)


def _check_options(feature_map: str, eps: float) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _check_state(name: str, state: object, n: int, H: int, D: int, Dv: int, dtype, device) -> State:
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{name} must be a tuple (S, z), got {type(state).__name__}")
    S, z = state
    check_float(f"{name}[0] (S)", S, 4)
    check_float(f"{name}[1] (z)", z, 3)
    check_shape(f"{name}[0] (S)", S, (n, H, D, Dv), "(N, H, D, Dv)")
    check_shape(f"{name}[1] (z)", z, (n, H, D), "(N, H, D)")
    for part, t in ((f"{name}[0] (S)", S), (f"{name}[1] (z)", z)):
        if t.dtype != dtype:
            raise TypeError(f"{part} must be {dtype} (the state dtype for these inputs), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{part} is on {t.device} but q is on {device}")
    return S, z


@backends.without_autocast
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu+1",
    feature_eps: float = 1e-4,
    scale: Optional[float] = None,
    eps: float = 1e-4,
    normalize: bool = True,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Causal linear attention o_t = q̂_tᵀS_t / (q̂_tᵀz_t + eps) with q̂ = scale·φ(q), k̂ = φ(k).

    Args:
        q, k: [B, L, H, D]; v: [B, L, H, Dv] (one float dtype; views are fine).
        feature_map: "elu+1" (φ(x) = elu(x) + 1 + feature_eps) or "identity".
        scale: defaults to 1/√D.
        normalize: divide by q̂_tᵀz_t + eps (else o_t = q̂_tᵀS_t).
        initial_state: (S_0 [N, H, D, Dv], z_0 [N, H, D]) in fp32 (fp64 for fp64 inputs), N = B,
            or the number of segments with ``cu_seqlens``.
        output_final_state: also return (S_L, z_L), same shapes and dtype as the initial state.
        cu_seqlens: int32/int64 [n + 1] offsets of n independent segments in a packed batch of B = 1.
        backend: None/"auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        o [B, L, H, Dv] in q's dtype, or (o, (S_L, z_L)) with ``output_final_state``.
    """
    check_qkv(q, k, v, "[B, L, H, D]")
    B, L, H, D = q.shape
    Dv = v.shape[3]
    _check_options(feature_map, eps)
    n = B
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, q)
        n = cu_seqlens.numel() - 1
    if initial_state is not None:
        initial_state = _check_state("initial_state", initial_state, n, H, D, Dv, acc_dtype(q.dtype), q.device)
    kwargs = dict(
        feature_map=feature_map,
        feature_eps=float(feature_eps),
        scale=check_scale(scale, D),
        eps=float(eps),
        normalize=bool(normalize),
        initial_state=initial_state,
        output_final_state=bool(output_final_state),
        cu_seqlens=cu_seqlens,
    )
    return backends.select(OP, backend, q.device, q, k, v, **kwargs)(q, k, v, **kwargs)


@backends.without_autocast
def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    feature_map: str = "elu+1",
    feature_eps: float = 1e-4,
    scale: Optional[float] = None,
    eps: float = 1e-4,
    normalize: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One decode step of ``linear_attention``: updates ``state`` in place, returns this token's output.

    Args:
        q, k: [B, H, D]; v: [B, H, Dv].
        state: (S [B, H, D, Dv], z [B, H, D]) in fp32 (fp64 for fp64 inputs), e.g. the final state
            of ``linear_attention(..., output_final_state=True)``; S += k̂vᵀ and z += k̂ in place.

    Returns:
        o [B, H, Dv] = q̂ᵀS / (q̂ᵀz + eps) in q's dtype (after the update). Inference only: no autograd.
    """
    if not _step_inputs_ok(q, k, v, state):  # the full checks, for their error messages
        check_qkv(q, k, v, "[B, H, D]")
        _check_state("state", state, q.shape[0], q.shape[1], q.shape[2], v.shape[2], acc_dtype(q.dtype), q.device)
    if not (feature_map == "elu+1" or feature_map == "identity") or eps < 0:
        _check_options(feature_map, eps)
    # Called once per generated token: keyword arguments spelled out, no dict to build and unpack.
    scale = float(q.shape[2] ** -0.5) if scale is None else check_scale(scale, q.shape[2])
    feature_eps, eps, normalize = float(feature_eps), float(eps), bool(normalize)
    fn = backends.select(STEP_OP, backend, q.device, q, k, v, state)  # checks need no options
    if torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or state[0].requires_grad or state[1].requires_grad
    ):
        with torch.no_grad():
            return fn(q, k, v, state, feature_map=feature_map, feature_eps=feature_eps, scale=scale, eps=eps,
                      normalize=normalize)
    return fn(q, k, v, state, feature_map=feature_map, feature_eps=feature_eps, scale=scale, eps=eps,
              normalize=normalize)


def _step_inputs_ok(q, k, v, state) -> bool:
    """One cheap test of everything linear_attention_step checks: a decode loop calls it per token."""
    try:
        S, z = state
        shape, v_shape, dtype, device = q.shape, v.shape, q.dtype, q.device
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return (
            len(shape) == 3 and k.shape == shape and len(v_shape) == 3 and v_shape[:2] == shape[:2]
            and dtype in FLOAT_DTYPES and k.dtype == dtype and v.dtype == dtype
            and S.dtype == state_dtype and z.dtype == state_dtype
            and S.shape == (*shape, v_shape[2]) and z.shape == shape
            and k.device == device and v.device == device and S.device == device and z.device == device
        )
    except (TypeError, ValueError, AttributeError):  # not a pair, not tensors: the full checks say what
        return False


__all__ = ["linear_attention", "linear_attention_step"]
