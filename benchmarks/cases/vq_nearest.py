"""Nearest-code search (docs/ops.md §1.6): our backends beside torch.cdist + argmin and the expanded
|z|² - 2 z·c + |c|² matrix + argmin, both of which materialise the [N, K] distances.

Roofline: 2·N·K·D FLOPs (the products z·c), the bytes of z and the codebook read once.
"""

from __future__ import annotations

import torch

from agiformer_kernels import vq_nearest
from benchmarks.registry import backend_available, case, impl

OP = "vq_nearest"


def vq_inputs(N, K, D):
    def make(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        return {"z": torch.randn(N, D, device=device, dtype=dtype, generator=g),
                "codebook": torch.randn(K, D, device=device, dtype=dtype, generator=g)}

    return make


def vq_case(N, K, D, device, dtype, **kw):
    size = torch.finfo(dtype).bits // 8
    case(OP, f"N{N}-K{K}-D{D}", device, dtype, vq_inputs(N, K, D), backward=False, flops=2 * N * K * D,
         bytes=(N + K) * D * size, params=dict(N=N, K=K, D=D), **kw)


def _ours(backend: str):
    def run(inputs):
        return vq_nearest(inputs["z"], inputs["codebook"], backend=backend)

    return run


for _name in ("reference", "cpu", "triton", "cuda"):
    impl(OP, _name, _ours(_name), available=backend_available(_name, OP))


def cdist_argmin(inputs):
    z, cb = inputs["z"], inputs["codebook"]
    d = torch.cdist(z, cb)  # [N, K]
    index = d.argmin(-1)
    return index, d.gather(1, index.unsqueeze(1)).squeeze(1).square()


def expanded_argmin(inputs):
    z, cb = inputs["z"], inputs["codebook"]
    d = torch.addmm(cb.square().sum(-1), z, cb.t(), alpha=-2) + z.square().sum(-1, keepdim=True)  # [N, K]
    index = d.argmin(-1)
    return index, d.gather(1, index.unsqueeze(1)).squeeze(1)


impl(OP, "cdist-argmin", cdist_argmin, alternative=True)
impl(OP, "matmul-argmin", expanded_argmin, alternative=True)

# CPU (fp32)
vq_case(16384, 1024, 64, "cpu", torch.float32, quick=True)
vq_case(8192, 4096, 256, "cpu", torch.float32)
# GPU (fp32: the search ranks codes, which tf32 or bf16 products would reorder)
vq_case(65536, 4096, 256, "cuda", torch.float32)
