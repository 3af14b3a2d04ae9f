"""Comparison helpers: relative RMS error against a float64 reference, with a message that says where."""

from __future__ import annotations

import torch

# docs/ops.md §3: relative RMS error allowed per dtype against the float64 oracle.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_rms(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖out − ref‖ / max(‖ref‖, floor)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(max(floor, 1e-300)))


def describe(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> str:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    nans = int(torch.isnan(out).sum())
    diff = (out - ref).abs().nan_to_num(float("inf"))
    if diff.numel() == 0:
        return "empty tensors"
    worst = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    return (
        f"rel RMS {rel_rms(out, ref, floor):.3e}, max abs error {float(diff.max()):.3e} at {index} "
        f"(got {float(out.flatten()[worst]):.6g}, expected {float(ref.flatten()[worst]):.6g}), "
        f"{nans} NaN of {out.numel()}"
    )


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float | None = None) -> None:
    """rel RMS(out, ref) <= tol (default: TOLERANCE[out.dtype]); NaN never passes."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    tol = TOLERANCE[out.dtype] if tol is None else tol
    err = rel_rms(out, ref)
    ok = err <= tol and not torch.isnan(out).any()
    assert ok, f"{name}: {describe(out, ref)} exceeds tolerance {tol:.1e}"


def assert_low_precision_close(
    name: str, out: torch.Tensor, ref: torch.Tensor, ref_same_dtype: torch.Tensor, floor: float = 0.0
) -> None:
    """docs/ops.md §3 for fp16/bf16: rel RMS <= 1e-2 and at most twice the error of the reference run in the
    same dtype (flash-attention's rule), both against the float64 oracle. The reference's own error is
    floored at half the dtype's epsilon, the rounding of its output alone.

    Errors are relative to max(‖ref‖, floor). A gradient that vanishes, exactly or by cancellation
    (window 1: dq = dk = 0; one token of normalized linear attention: dq = O(eps)), has no relative
    error to speak of: kernels that form D = rowsum(dO ∘ O) from the stored fp16/bf16 output, as
    FlashAttention does, leave rounding of O's size in it. Such a gradient's tests pass the norm of a
    gradient of the same call that does not vanish (dv) as the floor."""
    own = max(rel_rms(ref_same_dtype, ref, floor), torch.finfo(out.dtype).eps / 2)
    allowed = min(TOLERANCE[out.dtype], 2 * own)
    err = rel_rms(out, ref, floor)
    ok = err <= allowed and not torch.isnan(out).any()
    assert ok, (
        f"{name}: {describe(out, ref, floor)}; reference in {out.dtype} errs {own:.3e}, allowed {allowed:.3e}"
        + (f" (errors relative to max(‖ref‖, {floor:.3e}))" if floor else "")
    )
