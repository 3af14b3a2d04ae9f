"""benchmarks/tune_gru.py end to end at a toy size (the interpreter on CPU; on a GPU the real kernels)."""

import json

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import tune_gru  # noqa: E402
from agiformer_kernels.ops.gru_patch import triton as gru_triton  # noqa: E402


def test_tune_writes_a_checked_row_per_config(tmp_path, capsys):
    out = tmp_path / "tune.json"
    default = dict(gru_triton.GPU_CONFIGS)
    configs = ["32,64,64,4,3", "16,32,32,8,2"]
    argv = ["--m", "5", "--p", "3", "--h", "32", "--min-run-time", "0.01", "--out", str(out)]
    assert tune_gru.main(argv + [a for c in configs for a in ("--config", c)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["config"]) for r in rows] == [
        (k, [int(v) for v in c.split(",")]) for k in tune_gru.KERNELS for c in configs]
    assert all(r["ok"] and r["ms"] > 0 for r in rows), rows
    assert [r["default"] for r in rows[:2]] == [True, False]
    assert gru_triton.GPU_CONFIGS == default, "the default configs are restored"
    assert "DIFFERS" not in capsys.readouterr().out


def test_disagreement_sees_a_wrong_output():
    ref = [torch.ones(4, 4), torch.arange(8)]
    assert tune_gru.disagreement([torch.ones(4, 4), torch.arange(8)], ref) == 0
    assert tune_gru.disagreement([torch.ones(4, 4) * 1.1, torch.arange(8)], ref) == pytest.approx(0.1)
    assert tune_gru.disagreement([torch.ones(4, 4), torch.arange(8).flip(0)], ref) == 1.0


def test_bad_config_is_refused():
    with pytest.raises(SystemExit):
        tune_gru.main(["--config", "32,64,64,4"])
