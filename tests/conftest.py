import os

import torch

# Triton kernels run on CPU tensors through the interpreter, which must be chosen before
# triton is imported (agiformer_kernels imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# oneDNN runs CPU bf16 matmuls on AMX where the CPU advertises it; on VMs that do not enable the AMX
# state that is SIGILL, which would end the whole test run. Read at oneDNN's
# first use, so this must come before any test runs a bf16 reference.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import pytest  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Fresh float tensors from torch.empty/empty_like hold NaN, so an element a kernel forgot to write fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    """With AGIFORMER_TEST_FAILURE_LOG set, append each failure's traceback to that file as it happens, so a
    run cut short by a time limit still leaves every failure it saw."""
    path = os.environ.get("AGIFORMER_TEST_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # once, in the controller
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
