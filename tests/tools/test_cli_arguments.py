"""Every command line checks its flags before loading anything and answers a bad one with argparse's usage
error, not a traceback; prompts are any bytes; override flags apply only to original v1 files."""

import os
import sys

import pytest

from agiformer import evaluate, generate, inspect, plot, train
from agiformer.generation import generate as api_generate
from agiformer.checkpoint import load_model
from tests.tools.tiny_runs import TINY


def usage_error(main, argv, capsysbinary) -> str:
    """The one error line of a usage error (exit status 2), which names what was wrong."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsysbinary.readouterr().err.decode(errors="replace")
    assert done.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# train ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--seq-len", "10"], "--seq-len 10"),  # not whole patches: trained, then failed in the first validation
    (["--seq-len", "6"], "--seq-len 6"),  # under two patches: a reshape error
    (["--seq-len", "4"], "--seq-len 4"),
    (["--seq-len", "10", "--resume", "auto"], "--seq-len 10"),  # checked against the checkpoint's sizes, if any
    (["--batch-size", "0"], "--batch-size 0"),
    (["--patch-size", "0"], "--patch-size 0"),  # ZeroDivisionError
    (["--steps", "0"], "--steps 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--lr", "0"], "--lr 0"),
    (["--dropout", "1"], "--dropout 1"),
    (["--d-model", "30", "--num-heads", "4"], "--d-model 30"),
    (["--eval-bytes", "5"], "--eval-bytes 5"),
    (["--device", "nonsense"], "--device nonsense"),
    (["--backend", "fastest"], "--backend fastest"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_refuses_a_bad_flag_before_loading(tmp_path, text_file, flags, named, capsysbinary):
    argv = ["--data", str(text_file), "--out", str(tmp_path), *TINY, "--steps", "1", "--eval-every", "1", *flags]
    assert named in usage_error(train.main, argv, capsysbinary)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran


def test_train_refuses_data_without_one_validation_window(tmp_path, capsysbinary):
    data = tmp_path / "small.txt"
    data.write_bytes(bytes(range(256)) * 4)  # its validation split: 51 bytes, under two 32-byte patches
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--patch-size", "32", "--steps", "1"]
    assert "validation split holds 51 bytes" in usage_error(train.main, argv, capsysbinary)


def test_train_missing_data_or_checkpoint_is_one_line(tmp_path, text_file, capsysbinary):
    for flags in (["--data", str(tmp_path / "absent.txt")], ["--data", str(text_file), "--resume", str(text_file)]):
        with pytest.raises(SystemExit) as done:
            train.main([*flags, "--out", str(tmp_path), *TINY, "--steps", "1"])
        err = capsysbinary.readouterr().err.decode(errors="replace")
        assert done.value.code in (1, 2) and err.count("\n") == 1 and "Traceback" not in err, err


# evaluate / generate / inspect ----------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--max-bytes", "0"], "--max-bytes 0"),
    (["--seq-len", "0"], "--seq-len 0"),
    (["--num-heads", "0"], "--num-heads 0"),
])
def test_evaluate_checks_flags_before_loading(tmp_path, flags, named, capsysbinary):
    """The checkpoint does not exist: the flag is what the error names."""
    assert named in usage_error(evaluate.main, [str(tmp_path / "absent.pt"), *flags], capsysbinary)


@pytest.mark.parametrize("flags, named", [
    (["--max-bytes", "5"], "--max-bytes 5"),  # was "0.0000 bits/byte over 0 bytes"
    (["--seq-len", "10"], "--seq-len 10"),
])
def test_evaluate_refuses_what_scores_nothing(tiny_run, flags, named, capsysbinary):
    line = usage_error(evaluate.main, [str(tiny_run / "last.pt"), "--backend", "reference", *flags], capsysbinary)
    assert named in line


@pytest.mark.parametrize("tool", [evaluate, generate, inspect], ids=lambda t: t.__name__.split(".")[-1])
@pytest.mark.parametrize("flag, value, recorded", [
    ("--thinking-steps", "5", "thinking_steps = 1"),  # had turned 2.3458 bits/byte into 2.7778
    ("--window-size", "2", "window_size = 4"),
    ("--num-heads", "8", "num_heads = 2"),
])
def test_v1_overrides_are_refused_for_our_checkpoints(tiny_run, tool, flag, value, recorded, capsysbinary):
    """Our checkpoints record these sizes; the flags exist for original v1 files, whose weights do not show them."""
    line = usage_error(tool.main, [str(tiny_run / "last.pt"), "--backend", "reference", flag, value], capsysbinary)
    assert f"{flag} {value}" in line and recorded in line


def test_an_override_equal_to_the_recorded_value_is_accepted(tiny_run, capsysbinary):
    evaluate.main([str(tiny_run / "last.pt"), "--backend", "reference", "--thinking-steps", "1", "--quiet"])
    assert b"bits/byte" in capsysbinary.readouterr().out


@pytest.mark.parametrize("tool", [generate, inspect], ids=lambda t: t.__name__.split(".")[-1])
def test_a_prompt_is_the_arguments_bytes(tiny_run, tool, capsysbinary):
    """Not UTF-8: Python hands argv over with surrogate escapes, os.fsencode gives the bytes back."""
    prompt = b"\xff\xfe caf\xe9 \x80abc"
    argv = [str(tiny_run / "last.pt"), "--prompt", os.fsdecode(prompt), "--backend", "reference"]
    if tool is generate:
        generate.main([*argv, "-n", "6", "--quiet"])
        model, _ = load_model(tiny_run / "last.pt", backend="reference")
        assert capsysbinary.readouterr().out == prompt + api_generate(model, prompt, 6) + b"\n"
    else:
        inspect.main([*argv, "--json"])
        assert b'"patches": 3' in capsysbinary.readouterr().out


@pytest.mark.parametrize("stop", ["\\x", "\\x4", "\\u20ac", "\\N{nonsense}"])
def test_stop_escapes_that_fail_are_usage_errors(tiny_run, stop, capsysbinary):
    assert "--stop" in usage_error(generate.main, [str(tiny_run / "last.pt"), "--stop", stop], capsysbinary)


def test_stop_takes_escapes_and_raw_bytes(tiny_run, capsysbinary):
    model, _ = load_model(tiny_run / "last.pt", backend="reference")
    free = api_generate(model, b"alpha beta", 24)
    stop = free[5]
    escaped = "\\x%02x" % stop
    for given in (escaped, os.fsdecode(bytes([stop]))):
        generate.main([str(tiny_run / "last.pt"), "--prompt", "alpha beta", "-n", "24", "--stop", given,
                       "--backend", "reference", "--quiet"])
        assert capsysbinary.readouterr().out == b"alpha beta" + free[: free.index(stop) + 1] + b"\n"


@pytest.mark.parametrize("flags, named", [
    (["-n", "0"], "--max-new-bytes 0"),
    (["--top-k", "0"], "--top-k 0"),
    (["--top-k", "300"], "--top-k 300"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file /nonexistent/prompt.txt"),
])
def test_generate_checks_flags_before_loading(tmp_path, flags, named, capsysbinary):
    assert named in usage_error(generate.main, [str(tmp_path / "absent.pt"), *flags], capsysbinary)


# plot -----------------------------------------------------------------------------------------------

def test_plot_without_matplotlib_says_what_to_install(tiny_run, monkeypatch, capsysbinary):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as done:
        plot.main([str(tiny_run), "-o", os.devnull])
    err = capsysbinary.readouterr().err.decode(errors="replace")
    assert done.value.code == 1 and err.count("\n") == 1
    assert 'pip install "agiformer-kernels[plot]"' in err


def test_plot_of_a_folder_without_metrics_is_a_usage_error(tmp_path, capsysbinary):
    assert "no metrics.jsonl" in usage_error(plot.main, [str(tmp_path)], capsysbinary)
