"""The C++ extension's linear attention (csrc/linear_attention/): the "cpu" and "cuda" backends.

``torch.ops.agiformer_kernels.linear_attention_fwd`` / ``_bwd`` follow the contract in ``_common``;
``linear_attention_step`` updates (S, z) in place. Their fake kernels and the forward's autograd are
attached when the library loads.
"""

from __future__ import annotations

import torch

from ... import backends
from ..common import register_autograd
from ._common import LIBRARY, OP, STEP_OP, autograd, bwd_fake, check_step_state, fwd_fake, run_forward, step_fake

FWD = "agiformer_kernels::linear_attention_fwd"
MAX_CUDA_HEAD_DIM = 128


def _on_load() -> None:
    torch.library.register_fake(FWD, fwd_fake(states_transposed=True))
    torch.library.register_fake("agiformer_kernels::linear_attention_bwd", bwd_fake)
    torch.library.register_fake("agiformer_kernels::linear_attention_step", step_fake)
    register_autograd(FWD, autograd(torch.ops.agiformer_kernels.linear_attention_bwd))


def load_library(device_type: str = "cpu") -> backends.Reason:
    """Load the extension (building it if needed) with its fake and autograd registrations; why not, or None."""
    return backends.extension_available(LIBRARY, "linear_attention_fwd", device_type, _on_load)(device_type)


def linear_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options):
    return run_forward(torch.ops.agiformer_kernels.linear_attention_fwd, q, k, v, **options)


def linear_attention_step_cpp(q, k, v, state, *, feature_map, feature_eps, scale, eps, normalize) -> torch.Tensor:
    # Called once per generated token: the op itself makes a non-unit-stride head dim contiguous.
    return torch.ops.agiformer_kernels.linear_attention_step.default(
        q, k, v, state[0], state[1], feature_map, feature_eps, scale, eps, normalize
    )


def _check_cuda(q, k, v, *args, **kwargs) -> backends.Reason:
    if q.dtype == torch.float64:
        return "the CUDA kernels take float32, float16 or bfloat16 (fp32 state), not float64"
    if q.shape[-1] > MAX_CUDA_HEAD_DIM or v.shape[-1] > MAX_CUDA_HEAD_DIM:
        return f"the CUDA kernels take head dims up to {MAX_CUDA_HEAD_DIM}, got D = {q.shape[-1]}, Dv = {v.shape[-1]}"
    return None


def _check_cuda_step(q, k, v, state, **kwargs) -> backends.Reason:
    return _check_cuda(q, k, v) or check_step_state(q, k, v, state)


backends.register_extension(OP, linear_attention_cpp, library=LIBRARY, kernel="linear_attention_fwd",
                            on_load=_on_load, checks={"cpu": backends.always, "cuda": _check_cuda})
backends.register_extension(STEP_OP, linear_attention_step_cpp, library=LIBRARY, kernel="linear_attention_step",
                            on_load=_on_load, checks={"cpu": check_step_state, "cuda": _check_cuda_step})
