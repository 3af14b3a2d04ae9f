"""pytest-benchmark over the same registry as benchmarks.run (fwd+bwd, or fwd for inference cases).

    python -m pytest benchmarks/test_bench.py --benchmark-only       # quick (CPU) cases, or the GPU cases on a GPU
"""

import pytest
import torch

from benchmarks import registry
from benchmarks.run import make_steps, synchronize

registry.load_all()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAIRS = [
    (c, i)
    for c in registry.CASES
    if c.device == DEVICE and (c.quick or DEVICE == "cuda") and not c.sweep
    for i in registry.IMPLS.get(c.op, [])
]


@pytest.mark.parametrize("case,impl", PAIRS, ids=[f"{c.op}-{c.name}-{i.name}" for c, i in PAIRS])
def test_fwd_bwd(benchmark, case, impl):
    reason = impl.available(case)
    if reason:
        pytest.skip(reason)
    fwd, fwd_bwd = make_steps(case, impl, case.make_inputs(case.device, case.dtype))
    step = fwd_bwd or fwd

    def run():
        step()
        synchronize(case.device)

    benchmark(run)
