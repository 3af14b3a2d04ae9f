"""What the benchmarks measure: cases (an op at one shape) and the implementations that run them.

A case file under ``benchmarks/cases/`` declares its shapes with ``case(...)`` and its
implementations with ``impl(...)``; adding a backend or an alternative is one ``impl`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Case:
    op: str  # the group its implementations are registered under, e.g. "linear_attention"
    name: str  # shape id, e.g. "B1-L2048-H8-D64"
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    make_inputs: Callable[[str, torch.dtype], Inputs]  # fresh inputs on (device, dtype); grads where wanted
    flops: float = 0.0  # forward useful FLOPs, for the roofline (0: not modelled)
    bytes: float = 0.0  # forward minimal memory traffic in bytes, for the roofline
    backward: bool = True  # time the backward pass too
    params: dict = field(default_factory=dict)  # the shape, for tables and plots (e.g. {"L": 2048})
    quick: bool = False  # part of the CPU-sized --quick run
    sweep: bool = False  # part of --sweep: one op over a range of L, for the time/memory-vs-L plots


@dataclass(frozen=True)
class Impl:
    op: str
    name: str  # "reference", "cpu", "triton", "cuda", or an alternative: "fla", "flex", "sdpa", "nn.GRU", ...
    run: Callable[[Inputs], Any]  # forward; returns a tensor or tuple whose first element is backpropagated
    available: Callable[[Case], Optional[str]]  # why it cannot run this case, or None
    alternative: bool = False  # not ours: a baseline to compare against


CASES: list[Case] = []
IMPLS: dict[str, list[Impl]] = {}


def case(op: str, name: str, device: str, dtype: torch.dtype, make_inputs, **kw) -> Case:
    c = Case(op, name, device, dtype, make_inputs, **kw)
    CASES.append(c)
    return c


def impl(op: str, name: str, run, available=None, alternative: bool = False) -> Impl:
    i = Impl(op, name, run, available or (lambda case: None), alternative)
    IMPLS.setdefault(op, []).append(i)
    return i


def load_all() -> None:
    """Import every case file (each registers on import)."""
    import importlib
    import pkgutil

    from benchmarks import cases

    for mod in pkgutil.iter_modules(cases.__path__):
        importlib.import_module(f"benchmarks.cases.{mod.name}")
