"""First use: a JIT build of the C++ kernels says so before it compiles, and the metrics' elapsed time
counts training steps only."""

import os
import time

import pytest

from agiformer.model import AGIFORMER
from agiformer_kernels import extension
from tests.tools.tiny_runs import metrics, run_train

OP = "gru_patch"
MESSAGE = "building the C++ kernels (first use, about a minute)"


def test_a_jit_build_is_announced_only_when_it_compiles(tmp_path, monkeypatch, capsys):
    if extension.prebuilt_libraries(OP):
        pytest.skip("a prebuilt library is loaded, never JIT-built")
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(extension.CPU_ARCH_VAR, raising=False)
    monkeypatch.delenv("AGIFORMER_KERNELS_NO_JIT", raising=False)
    built = []

    def fake_build(name, **kwargs):  # what a build leaves in torch's cache: the library
        library = tmp_path / name / f"{name}.so"
        library.parent.mkdir(exist_ok=True)
        library.write_bytes(b"")
        built.append(library)

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    extension._load(OP)
    assert MESSAGE in capsys.readouterr().err  # an empty cache: it compiles
    extension._load(OP)
    assert MESSAGE not in capsys.readouterr().err  # cached and current: it only loads
    os.utime(built[0], (0, 0))
    extension._load(OP)
    assert MESSAGE in capsys.readouterr().err  # older than its sources: ninja rebuilds it


def test_elapsed_time_leaves_out_a_first_uses_build(tmp_path, text_file, monkeypatch):
    """The first call of the model's ops, where kernels get built, used to land inside step 1's time."""
    real, calls = AGIFORMER.sequence_loss, []

    def first_call_slow(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # a JIT build, compressed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AGIFORMER, "sequence_loss", first_call_slow)
    run_train(tmp_path, text_file, "--steps", "2", "--eval-every", "100")
    assert metrics(tmp_path)[0]["elapsed_s"] < 0.5
