"""Ctrl-C at any point of a real training process, repeatedly, then --resume auto: the same run bit for bit."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from agiformer.checkpoint import read
from tests.tools.tiny_runs import REPO, TINY, metrics

# One process imports torch and agiformer once, then forks a child per run: a real training process, sent a real
# SIGINT, without paying the imports again. Each line "<point> <n> <out>" on its stdin runs train.main in a child
# that sends itself SIGINT (os.kill, as a terminal's Ctrl-C does) the nth time it reaches point; it answers
# "pid <pid>" when the child starts and "rc <exit status>" when it ends. The child's stderr goes to <out>.log.
SERVER = r"""
import os, signal, sys, time, traceback
import torch
from agiformer import train
from agiformer.model import AGIFORMER

count = [0]

def reached(nth):
    count[0] += 1
    if count[0] == nth:
        os.kill(os.getpid(), signal.SIGINT)

def before(owner, name, nth, condition=lambda *a, **k: True):
    real = getattr(owner, name)
    def patched(*args, **kwargs):
        if condition(*args, **kwargs):
            reached(nth)
        return real(*args, **kwargs)
    setattr(owner, name, patched)

def patch(point, nth):
    if point == "startup":  # loading the data, before the model exists
        before(train, "load_corpus", nth)
    elif point == "forward":  # a step's forward
        before(train.SequenceLoss, "forward", nth)
    elif point == "update":  # after optimizer.step, before the schedule and the step counter move
        before(torch.optim.lr_scheduler.LambdaLR, "step", nth)  # (LambdaLR's constructor is call 1)
    elif point == "validation":  # between two batches of a validation
        before(AGIFORMER, "sequence_loss", nth, lambda self, *a, **k: not self.training)
    elif point == "final":  # between two batches of the final validation (the whole split)
        real_bpb, final = train.bits_per_byte, [False]
        def bits_per_byte(*args, **kwargs):
            final[0] = kwargs["max_bytes"] is None
            return real_bpb(*args, **kwargs)
        train.bits_per_byte = bits_per_byte
        before(AGIFORMER, "sequence_loss", nth, lambda self, *a, **k: final[0] and not self.training)
    elif point == "save":  # a checkpoint written, not yet renamed into place
        real_save = torch.save
        def save(*args, **kwargs):
            real_save(*args, **kwargs)
            reached(nth)
        torch.save = save
    elif point == "slow":  # for a SIGINT from outside: steps slow enough to land in one
        before(train.SequenceLoss, "forward", nth, lambda *a: time.sleep(0.05) or False)

for line in sys.stdin:
    point, nth, out = line.split()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(out + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            patch(point, int(nth))
            train.main([*sys.argv[1:], "--out", out])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    print("pid", pid, flush=True)
    print("rc", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_sigint_anywhere_then_resume_reproduces_the_uninterrupted_run(tmp_path, text_file):
    """SIGINT before the first step, in a forward, after an optimizer update, from outside at a random moment,
    in a checkpoint write, in a periodic and in the final validation, each followed by --resume auto: the
    metrics rows, the final validation and the weights and optimizer state equal an uninterrupted run's."""
    flags = ["--data", str(text_file), *TINY, "--steps", "12", "--eval-every", "4", "--eval-bytes", "600",
             "--checkpoint-every", "6", "--dropout", "0.1", "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-c", SERVER, *flags], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    watchdog = threading.Timer(240, server.kill)  # a hung run ends the test instead of the session
    watchdog.start()

    def run(point: str, out: Path, nth: int = 1, signal_after: str = "") -> tuple[int, str]:
        server.stdin.write(f"{point} {nth} {out}\n")
        server.stdin.flush()
        pid = int(server.stdout.readline().split()[1])
        log = Path(f"{out}.log")
        while signal_after:  # a Ctrl-C from outside, once that line is out
            if log.exists() and any(line.startswith(signal_after) for line in log.read_text().splitlines()):
                os.kill(pid, signal.SIGINT)
                break
            os.kill(pid, 0)  # ProcessLookupError: it ended without that line
            time.sleep(0.01)
        rc = int(server.stdout.readline().split()[1])
        return rc, log.read_text()

    def interrupted(point: str, nth: int = 1, signal_after: str = "") -> None:
        rc, err = run(point, parts, nth, signal_after)
        assert rc == 130, f"{point}: exit status {rc}\n{err}"
        assert "Traceback" not in err, err

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    try:
        rc, err_whole = run("none", whole)
        assert rc == 0, err_whole
        interrupted("startup")
        assert not (parts / "last.pt").exists()  # nothing had happened: nothing saved, and a fresh start follows
        interrupted("forward", 3)  # the step in hand is finished, then saved
        assert read(parts / "last.pt")["step"] == 3
        interrupted("slow", signal_after="step 5 ")  # a real Ctrl-C from outside, at whatever moment
        interrupted("update", 2)
        interrupted("save")
        interrupted("validation")
        interrupted("final", 2)
        ckpt = read(parts / "last.pt")
        assert ckpt["step"] == 12 and ckpt["pending"] is not None  # stopped inside the last step's validation
        rc, err = run("none", parts)
        assert rc == 0, err
    finally:
        watchdog.cancel()
        server.stdin.close()
        server.wait(timeout=60)
    final = [e.splitlines()[-1].split(";")[0] for e in (err, err_whole)]  # "step 12: validation ... bits/byte"
    assert final[0] == final[1] and final[0].startswith("step 12: validation"), final

    keys = ("step", "lr", "loss", "bpb", "val_bpb")
    rows_whole, rows_parts = metrics(whole), metrics(parts)
    assert [r["step"] for r in rows_parts] == list(range(1, 13))
    assert [[r.get(k) for k in keys] for r in rows_parts] == [[r.get(k) for k in keys] for r in rows_whole]
    for name in ("last.pt", "best.pt"):
        a, b = read(whole / name), read(parts / name)
        assert a["step"] == b["step"] and a["best_val_bpb"] == b["best_val_bpb"]
        for part in ("model", "optimizer"):
            flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
            assert flat_a.keys() == flat_b.keys()
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), f"{name} {part} differs"


def _tensors(tree, prefix="") -> dict:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}/{i}").items()}
    return {}
