"""The benchmark runner on a toy op: rows, error check, speedups and the JSON it writes."""

import argparse
import json
import os
import subprocess

import pytest
import torch

from agiformer_kernels import extension
from benchmarks import registry, run


@pytest.fixture
def toy_registry(monkeypatch):
    monkeypatch.setattr(registry, "CASES", [])
    monkeypatch.setattr(registry, "IMPLS", {})
    monkeypatch.setattr(run, "CASES", registry.CASES)
    monkeypatch.setattr(run, "IMPLS", registry.IMPLS)
    monkeypatch.setattr(registry, "load_all", lambda: None)

    def inputs(device, dtype):
        return {"x": torch.randn(256, 256, device=device, dtype=dtype, requires_grad=True)}

    registry.case("toy", "N256", "cpu", torch.float32, inputs, flops=2 * 256**3, bytes=3 * 256 * 256 * 4,
                  params={"L": 256}, quick=True)
    registry.impl("toy", "reference", lambda i: i["x"] @ i["x"])
    registry.impl("toy", "wrong", lambda i: i["x"] @ i["x"] + 1)
    registry.impl("toy", "slow-alt", lambda i: (i["x"] @ i["x"]).clone(), alternative=True)
    registry.impl("toy", "absent", lambda i: i["x"], available=lambda c: "not here")


def test_runner_writes_rows(toy_registry, tmp_path):
    out = tmp_path / "r.json"
    assert run.main(["--quick", "--device", "cpu", "--min-run-time", "0.01", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["impl"]: r for r in record["rows"]}
    assert rows["absent"]["status"] == "skipped: not here"
    assert rows["reference"]["status"] == "ok" and rows["reference"]["err"] is None
    assert rows["wrong"]["err"] > 1e-3  # the runner's correctness check sees the wrong implementation
    assert rows["slow-alt"]["err"] < 1e-6
    # the roofline against the peaks the run measured and recorded (which a busy machine can underestimate, so
    # the toy may pass 100% of them: only the computation is checked, not a bound on it); its 768 KiB take the
    # bandwidth measured at the smallest footprint, 1 MiB
    peaks = record["peaks"]
    assert sorted(map(int, peaks["bytes_per_s"])) == [mib * 2**20 for mib in run.COPY_FOOTPRINTS_MIB]
    ideal_s = max(2 * 256**3 / peaks["flops"][str(torch.float32)], 3 * 256 * 256 * 4 / peaks["bytes_per_s"][str(2**20)])
    for r in (rows["reference"], rows["wrong"], rows["slow-alt"]):
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["baseline"] == "slow-alt"
        assert r["roofline"] == pytest.approx(ideal_s / (r["fwd_ms"] / 1e3), rel=1e-9)
    assert record["device_type"] == "cpu" and "torch" in record["versions"] and record["commit"]
    assert record["complete"] is True


def test_copy_bandwidth_takes_the_smallest_footprint_that_holds_the_bytes():
    peaks = {"bytes_per_s": {str(2**20): 100.0, str(2**26): 50.0, str(2**22): 70.0}}
    assert run.copy_bandwidth(peaks, 1000) == 100.0
    assert run.copy_bandwidth(peaks, 2**20) == 100.0
    assert run.copy_bandwidth(peaks, 2**20 + 1) == 70.0
    assert run.copy_bandwidth(peaks, 2**26) == 50.0
    assert run.copy_bandwidth(peaks, 2**30) == 50.0  # past the largest footprint: its bandwidth


def test_cpu_device_names_family_and_model(tmp_path, monkeypatch):
    """A VM's model name can be as bare as "AMD EPYC"; its family and model tell Zen 4 from Zen 5."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
    cpuinfo.write_text(block.format(0) + block.format(1))
    monkeypatch.setattr(run, "CPUINFO", cpuinfo)
    assert run.device_name("cpu") == f"AMD EPYC (family 25 model 17, {torch.get_num_threads()} threads)"
    cpuinfo.write_text("model name\t: Some CPU\n")
    assert run.device_name("cpu") == f"Some CPU ({torch.get_num_threads()} threads)"


def test_rounds_keep_each_implementations_best(toy_registry, tmp_path):
    out = tmp_path / "r.json"
    run.main(["--quick", "--device", "cpu", "--min-run-time", "0.01", "--rounds", "3", "--impl", "reference",
              "--impl", "slow-alt", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["reference", "slow-alt"]
    assert all(r["rounds"] == 3 and r["status"] == "ok" for r in rows)


def test_isolated_measurement_runs_in_a_child_process(tmp_path):
    out = tmp_path / "r.json"
    assert run.main(["--device", "cpu", "--op", "sliding_window_attention_step", "--case", "B1-", "--impl",
                     "reference", "--min-run-time", "0.01", "--isolate", "--profile", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in rows), rows
    assert all(0 < len(r["profile"]["top"]) <= 2 for r in rows), "the child profiles too"


def profiled_row(tmp_path, *extra) -> dict:
    out = tmp_path / "r.json"
    assert run.main(["--quick", "--device", "cpu", "--min-run-time", "0.01", "--no-memory", "--impl", "reference",
                     "--out", str(out), *extra]) == 0
    [row] = json.loads(out.read_text())["rows"]
    return row


def test_profile_lists_the_ops_taking_the_most_time(toy_registry, tmp_path, capsys):
    row = profiled_row(tmp_path, "--profile", "3")
    assert row["status"] == "ok"
    top, total = row["profile"]["top"], row["profile"]["total_ms"]
    assert 0 < len(top) <= 3
    assert all(t["name"] and t["ms"] > 0 and t["calls"] > 0 for t in top), top
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    assert total >= sum(t["ms"] for t in top) * (1 - 1e-9)  # the top entries are a part of the total
    assert "aten::mm" in [t["name"] for t in top]  # the forward's matmul and the backward's two
    printed = capsys.readouterr().out
    assert "top 3 ops by self CPU time" in printed and "aten::mm" in printed


def test_profile_error_is_recorded_not_raised(toy_registry, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    row = profiled_row(tmp_path, "--profile", "3")
    assert row["status"] == "ok" and row["fwd_ms"] > 0
    assert row["profile"] == {"error": "RuntimeError: no profiler here"}


def test_error_rows_keep_the_whole_message(toy_registry, tmp_path, capsys):
    """A Triton CompilationError's first line is only "at 20:32:": the source line and the cause come after it."""
    def broken(inputs):
        try:
            raise ValueError("the cause")
        except ValueError as e:
            raise RuntimeError("at 20:32:\n    h = f(x)\n        ^\n" + "x" * 300) from e

    registry.impl("toy", "broken", broken)
    out = tmp_path / "r.json"
    run.main(["--quick", "--device", "cpu", "--min-run-time", "0.01", "--impl", "broken", "--out", str(out)])
    status = json.loads(out.read_text())["rows"][0]["status"]
    assert status == "error: RuntimeError: at 20:32: | h = f(x) | ^ | " + "x" * 300 + " <- ValueError: the cause"
    table = [line for line in capsys.readouterr().out.splitlines() if "broken" in line][-1]
    assert table.endswith("...") and "at 20:32: | h = f(x)" in table and len(table) < 250


def test_profile_off_by_default(toy_registry, tmp_path):
    assert "profile" not in profiled_row(tmp_path)


def test_interrupted_run_keeps_finished_cases(toy_registry, tmp_path):
    def interrupt(inputs):
        raise KeyboardInterrupt

    registry.case("stop", "N1", "cpu", torch.float32, lambda device, dtype: {}, flops=1, bytes=1, quick=True)
    registry.impl("stop", "reference", interrupt)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--quick", "--device", "cpu", "--min-run-time", "0.01", "--impl", "reference", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] is False
    assert [(r["op"], r["status"]) for r in record["rows"]] == [("toy", "ok")]


@pytest.fixture
def avx512_host(monkeypatch):
    """An x86-64-v4 CPU with nothing prebuilt and no op loaded, whatever this machine is; the runner's --cpu-arch
    sets AGIFORMER_KERNELS_CPU_ARCH in os.environ, which monkeypatch restores."""
    monkeypatch.setattr(extension, "host_isa", lambda *args, **kwargs: "x86-64-v4")
    monkeypatch.setattr(extension, "prebuilt_libraries", lambda op: {})
    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.delenv(extension.CPU_ARCH_VAR, raising=False)


def test_cpu_arch_is_recorded_and_names_the_default_output(toy_registry, avx512_host, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    assert run.main(["--quick", "--device", "cpu", "--min-run-time", "0.01", "--no-memory", "--impl", "reference",
                     "--cpu-arch", "x86-64-v3"]) == 0
    assert os.environ[extension.CPU_ARCH_VAR] == "x86-64-v3"
    record = json.loads((tmp_path / "cpu-quick-x86-64-v3.json").read_text())
    assert record["host_isa"] == "x86-64-v4" and record["cpu_arch"] == "x86-64-v3"
    assert record["kernels_isa"] == {op: "x86-64-v3" for op in extension.ops_with_sources()}
    assert "isa: host x86-64-v4, C++ kernels x86-64-v3 (--cpu-arch x86-64-v3)" in capsys.readouterr().out


def test_default_output_names_a_level_that_is_not_the_hosts():
    def name(cpu_arch, kernels, ops=()):
        info = {"host_isa": "x86-64-v4", "cpu_arch": cpu_arch, "kernels_isa": dict.fromkeys(["a", "b"], kernels)}
        return run.default_output("cpu", "quick", list(ops), info).name

    assert name("native", "x86-64-v4") == "cpu-quick.json"
    assert name("native", "x86-64-v4", ["lin", "gru"]) == "cpu-quick-gru-lin.json"
    assert name("x86-64-v4", "x86-64-v4") == "cpu-quick.json"  # the host's own level
    assert name("x86-64-v2", "x86-64-v2", ["gru"]) == "cpu-quick-gru-x86-64-v2.json"
    assert name("native", "x86-64-v3") == "cpu-quick-x86-64-v3.json"  # the highest level prebuilt is below the host's


def test_isolated_children_get_the_cpu_arch(toy_registry, monkeypatch):
    calls = []

    def child(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"status": "ok"}\n', stderr="")

    monkeypatch.setattr(run.subprocess, "run", child)
    args = argparse.Namespace(min_run_time=0.01, no_memory=True, threads=None, profile=0, cpu_arch="x86-64-v3")
    assert run.measure_isolated(registry.CASES[0], registry.IMPLS["toy"][0], args) == {"status": "ok"}
    [cmd] = calls
    assert cmd[cmd.index("--cpu-arch") + 1] == "x86-64-v3"


def test_cpu_arch_above_the_host_is_refused(toy_registry, avx512_host, monkeypatch, capsys):
    monkeypatch.setattr(extension, "host_isa", lambda *args, **kwargs: "x86-64-v2")
    with pytest.raises(SystemExit):
        run.main(["--quick", "--device", "cpu", "--list", "--cpu-arch", "x86-64-v3"])
    assert f"{extension.CPU_ARCH_VAR}=x86-64-v3: this CPU runs x86-64-v2 at most" in capsys.readouterr().err
