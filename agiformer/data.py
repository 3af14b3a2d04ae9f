"""Byte corpora split by position, random training windows, sequential evaluation windows.

Sources (``load_corpus``):
- ``"stdlib"`` (the default): the Python standard library's own ``.py`` sources (test packages and
  site-packages left out), concatenated in sorted path order. Present on every machine, offline.
- ``"enwik8"``: a local ``enwik8`` or ``enwik8.zip`` (looked for in ``--data-dir``, ``$AGIFORMER_DATA``
  and the working directory), else downloaded when the network allows. Split 90M / 5M / 5M.
- a path: one file, or every file under a folder in sorted path order.
Everything but enwik8 is split 90% / 5% / 5% by position.
"""

from __future__ import annotations

import io
import os
import sysconfig
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import UsageError

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
ENWIK8_SPLIT = (90_000_000, 95_000_000)
SPLIT_FRACTIONS = (0.90, 0.95)


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # uint8 [n]
    val: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, name)


def _split(name: str, data: bytes, bounds: tuple[int, int]) -> Corpus:
    t = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    a, b = bounds
    return Corpus(name, t[:a], t[a:b], t[b:])


def _by_fraction(name: str, data: bytes) -> Corpus:
    n = len(data)
    return _split(name, data, (int(n * SPLIT_FRACTIONS[0]), int(n * SPLIT_FRACTIONS[1])))


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if any(s in ("site-packages", "dist-packages") or s.startswith("test") for s in parts):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus() -> Corpus:
    data = b"\n".join(p.read_bytes() for p in stdlib_files())
    return _by_fraction("stdlib", data)


def _enwik8_bytes(data_dir: Optional[str], download: bool) -> bytes:
    dirs = [Path(d) for d in (data_dir, os.environ.get("AGIFORMER_DATA"), ".") if d]
    for d in dirs:
        if (d / "enwik8").is_file():
            return (d / "enwik8").read_bytes()
        if (d / "enwik8.zip").is_file():
            with zipfile.ZipFile(d / "enwik8.zip") as z:
                return z.read("enwik8")
    if not download:
        raise FileNotFoundError(f"enwik8 or enwik8.zip not found in {[str(d) for d in dirs]}")
    try:
        with urllib.request.urlopen(ENWIK8_URL, timeout=30) as r:
            archive = r.read()
    except OSError as e:
        raise FileNotFoundError(
            f"enwik8 not found locally ({[str(d) for d in dirs]}) and the download from {ENWIK8_URL} failed: {e}. "
            "Put enwik8 or enwik8.zip in one of those folders."
        ) from e
    target = dirs[0] / "enwik8.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read("enwik8")


def path_corpus(path: Path) -> Corpus:
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UsageError(f"--data {path}: the folder holds no files")
        data = b"\n".join(p.read_bytes() for p in files)
    elif path.is_file():
        data = path.read_bytes()
    else:
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if len(data) < 1000:
        raise UsageError(f"--data {path}: {len(data)} bytes is too little to split into train/val/test")
    return _by_fraction(path.name, data)


def load_corpus(source: str = "stdlib", data_dir: Optional[str] = None, download: bool = True) -> Corpus:
    """``source``: "stdlib", "enwik8", or a file/folder path (see the module docstring)."""
    if source == "stdlib":
        return stdlib_corpus()
    if source == "enwik8":
        data = _enwik8_bytes(data_dir, download)
        if len(data) != ENWIK8_SIZE:
            raise UsageError(f"enwik8 must hold {ENWIK8_SIZE} bytes, this one holds {len(data)}")
        return _split("enwik8", data, ENWIK8_SPLIT)
    return path_corpus(Path(source))


class RandomWindows:
    """Training batches of ``seq_len``-byte windows at uniformly random offsets.

    One seeded stream draws the global batch of ``batch_size · world_size`` offsets per step and rank r
    takes rows [r·batch_size, (r+1)·batch_size): every rank sees its own windows, and W ranks together
    see exactly what one process with the combined batch would. ``state_dict`` resumes the stream.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(data) <= seq_len:
            raise UsageError(f"the training split ({len(data)} bytes) must be longer than seq_len = {seq_len}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._index = torch.arange(seq_len)

    def next(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len]`` int64 batch (on the CPU)."""
        offsets = torch.randint(0, len(self.data) - self.seq_len + 1, (self.batch_size * self.world_size,),
                                generator=self.generator)
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.data[mine.unsqueeze(1) + self._index].long()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(data: torch.Tensor, seq_len: int, patch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive windows covering a whole split, for v1's alignment (each window's first patch is
    context only). Window i starts at i·(seq_len − P), so every byte from P on is predicted exactly once;
    the last window is shortened to whole patches (bytes after the last whole patch are not scored)."""
    P = patch_size
    if seq_len % P or seq_len < 2 * P:
        raise ValueError(f"seq_len must be a multiple of patch_size = {P} and at least {2 * P}, got {seq_len}")
    stride = seq_len - P
    start = 0
    while len(data) - start >= 2 * P:
        n = min(seq_len, (len(data) - start) // P * P)
        yield data[start : start + n]
        start += stride
