"""Every Triton kernel the ops launch compiles for sm_90 (the H100's target), checked without a GPU.

The interpreter runs the kernels with Python's semantics, so it cannot see what only the compiler rejects: on
the H100 the GRU sampler did not compile inside bf16 generation (autocast had made its h scratch bf16, so a
branch redefined an fp32 variable as bf16), and fp64 top-k sampling met an early return in a static if. Here
tests/sm90_compile.py runs the ops' Triton launchers on CPU tensors through a stand-in driver that reports an
sm_90 device and launches nothing: each kernel is specialised and compiled as on the GPU, in a process of its
own without the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "sm90_compile.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the Triton tests compile the kernels for real")
@pytest.mark.parametrize("op", ["linear_attention", "sliding_window_attention", "gru_patch", "gru_patch_sample",
                                "segment_ops"])
def test_triton_kernels_compile_for_sm90(op):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT), op], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
