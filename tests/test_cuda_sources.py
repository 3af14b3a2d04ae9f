"""Every CUDA source compiles for sm_80 and sm_90 (nvcc only: the kernels include no torch headers)."""

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*/*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CU_FILES, ids=[p.stem for p in CU_FILES])
def test_cuda_source_compiles(source, tmp_path):
    cmd = ["nvcc", "-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-I", str(CSRC / "common"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           str(source), "-o", str(tmp_path / "kernel.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"nvcc failed on {source.name}:\n{done.stderr[-4000:]}"


def test_every_op_has_cuda_sources():
    ops = [p for p in CSRC.iterdir() if p.is_dir() and p.name != "common"]
    for op in ops:
        assert (op / f"{op.name}.cu").is_file() and (op / f"{op.name}_cuda.cpp").is_file(), f"{op.name} lacks CUDA sources"
