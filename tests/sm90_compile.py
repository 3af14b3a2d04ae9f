"""Compile every Triton kernel the ops launch for an H100 (sm_90), with no GPU: run by tests/ops/test_triton_sm90.py
in a process without the interpreter.

Triton's compiler needs no GPU, only a driver to ask for the target. A stand-in driver reports an sm_90 device and
launches nothing, so the ops run their Triton launchers on CPU tensors with the launchers' own arguments: every
kernel they launch is specialised and compiled for sm_90 exactly as on the GPU (outputs are left unwritten, which
no check here reads). What only the compiler rejects shows here: the H100 failed the GRU sampler inside bf16
generation, where autocast had made its h scratch bf16; fp64 top-k sampling once met an early return in a static if.

usage: python tests/sm90_compile.py OP [OP ...]   (prints one line per call; exits 1 on the first failure)
"""

from __future__ import annotations

import sys
import traceback

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module):
        pass


class _Launcher:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class StandInSM90:
    utils = _Utils()
    launcher_cls = _Launcher

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(StandInSM90())

import agiformer_kernels as K  # noqa: E402  (after the driver: the kernels bind to it)
from agiformer_kernels import backends  # noqa: E402
from agiformer_kernels.ops.gru_patch import triton as gru_triton  # noqa: E402
from tests.ops.test_gru_patch import decode_args, loss_args, make_inputs, sample_args  # noqa: E402

for _op in backends._registry:  # the Triton backend serves these CPU tensors: they only carry shapes and dtypes
    backends._availability[(_op, "triton", "cpu")] = None
_gru_config = gru_triton._Config.__init__
gru_triton._Config.__init__ = lambda self, h, dtype, device, kernel="fwd": _gru_config(
    self, h, dtype, torch.device("cuda"), kernel)  # the GPU's blocks and warps


def _leaves(*ts):
    return [t.requires_grad_(True) for t in ts]


def linear_attention(dtype, D=64):
    q, k, v = _leaves(*(torch.randn(1, 70, 2, D, dtype=dtype) for _ in range(3)))
    o = K.linear_attention(q, k, v, backend="triton")
    o.float().sum().backward()
    o, (S, z) = K.linear_attention(q.detach(), k.detach(), v.detach(), output_final_state=True, backend="triton")
    K.linear_attention_step(q[:, 0].detach(), k[:, 0].detach(), v[:, 0].detach(), (S, z), backend="triton")


def sliding_window_attention(dtype):
    q, k, v = _leaves(*(torch.randn(1, 70, 2, 64, dtype=dtype) for _ in range(3)))
    K.sliding_window_attention(q, k, v, 16, backend="triton").float().sum().backward()
    cache = torch.randn(2, 1, 16, 2, 64, dtype=dtype)
    K.sliding_window_attention_step(q[:, 0].detach(), k[:, 0].detach(), v[:, 0].detach(), cache[0], cache[1], 20,
                                    backend="triton")


def gru_patch(dtype, h=256):
    x, targets = make_inputs(40, 4, h, dtype, requires_grad=True)
    K.gru_patch_decode(*decode_args(x, targets), backend="triton").float().sum().backward()
    K.gru_patch_loss(*loss_args(x, targets), backend="triton").backward()


def gru_patch_sample(dtype, h=256):
    x, _ = make_inputs(16, 4, h, dtype)
    table = K.gru_patch_byte_table(x["byte_emb"], x["weight_ih"])
    prefix = torch.randint(0, 256, (16, 1))
    g = torch.Generator().manual_seed(0)
    modes = [dict(), dict(temperature=0.8, generator=g), dict(temperature=0.8, top_k=40, generator=g),
             dict(prefix=prefix, byte_table=table)]
    for kw in modes:
        K.gru_patch_sample(*sample_args(x), patch_size=4, backend="triton", **kw)
    if dtype == torch.bfloat16:  # the model's call: bf16 weights under bf16 autocast
        with torch.autocast("cpu", torch.bfloat16):
            K.gru_patch_sample(*sample_args(x), patch_size=4, byte_table=table, backend="triton")


def segment_ops(dtype):
    logits = torch.randn(2, 50, 256, dtype=dtype)
    K.entropy_segments(logits, rule="delta", threshold=None, delta=0.1, max_len=8, backend="triton")
    queries, k, v = _leaves(torch.randn(4, 2, 64, dtype=dtype), torch.randn(40, 2, 64, dtype=dtype),
                            torch.randn(40, 2, 64, dtype=dtype))
    offsets = torch.tensor([0, 1, 5, 20, 40], dtype=torch.int32)
    K.segment_pool(queries, k, v, offsets, backend="triton").float().sum().backward()
    K.vq_nearest(torch.randn(70, 256, dtype=dtype), torch.randn(300, 256, dtype=dtype), backend="triton")


F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# op -> (call, dtype) pairs. The GRU's widest tiles come at the largest h each dtype takes:
# fp64's head tiles overflowed shared memory from h = 64, fp32's weight gradient at h = 1024.
CASES = {
    "linear_attention": [(linear_attention, F32), (linear_attention, BF16),
                         (lambda d: linear_attention(d, D=128), BF16)],  # its gradient's tf32 dots overflowed
    "sliding_window_attention": [(sliding_window_attention, F32), (sliding_window_attention, BF16)],
    "gru_patch": [(gru_patch, F32), (gru_patch, BF16), (lambda d: gru_patch(d, h=1024), F32),
                  (lambda d: gru_patch(d, h=512), F64)],
    "gru_patch_sample": [(gru_patch_sample, F32), (gru_patch_sample, BF16), (gru_patch_sample, F64),
                         (lambda d: gru_patch_sample(d, h=1024), F64)],
    "segment_ops": [(segment_ops, F32), (segment_ops, BF16)],
}

if __name__ == "__main__":
    for op in sys.argv[1:]:
        for i, (call, dtype) in enumerate(CASES[op]):
            try:
                call(dtype)
            except Exception:
                print(f"FAILED {op} call {i} ({dtype})\n{traceback.format_exc()}")
                sys.exit(1)
            print(f"compiled {op} call {i} ({dtype})", flush=True)
