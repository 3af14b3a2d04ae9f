"""Registries of components by name, the context every component is built from, and the one builder.

A component is an ``nn.Module`` class whose constructor takes the ``Context`` first and its options as
keyword arguments with defaults: ``__init__(self, ctx, *, window_size=None, num_heads=None)``. The
options a config may give are exactly those keyword arguments (a ``**kwargs`` catch-all accepts any),
so a misspelt key is a ``TypeError``, never silently dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn


class UnknownComponentError(ValueError):
    """A config names a component no registry holds; the message says where, which, and what is registered."""


class LocatedError(ValueError):
    """A ValueError whose message already names its place in the config (the builder does not prefix it again)."""


class LocatedTypeError(TypeError):
    """An option a component does not take; the message names its place in the config."""


@dataclass(frozen=True)
class Context:
    """What every component is built from: the model's sizes (the defaults of its options), the op backend,
    the index of the layer it is built for (None outside the layers) and ``path``, its place in the config
    for error messages (``architecture[2]``)."""

    d_model: int
    num_heads: int
    window_size: int
    patch_size: int
    dropout: float
    thinking_steps: int
    backend: Optional[str] = None
    layer: Optional[int] = None
    path: str = ""


class Registry(Mapping):
    """Component classes of one kind by name. ``kind`` names them in messages, ``key`` is the config key that
    picks one (``mixer_cls``). Read-only as a mapping; ``register`` adds, ``unregister`` removes."""

    def __init__(self, kind: str, key: str, reserved: tuple[str, ...] = ()):
        self.kind, self.key = kind, key
        self.reserved = reserved  # constructor arguments the builder fills, not options (a block's mixer, mlp, norm)
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: ``@MIXERS.register("conv")`` makes the class buildable as ``{"mixer_cls": "conv"}``.
        A name already taken raises ``ValueError``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(cls: type) -> type:
            if name in self._classes:
                taken = self._classes[name]
                raise ValueError(f"{self.kind} {name!r} is registered already (by {taken.__module__}."
                                 f"{taken.__qualname__}); unregister it first or pick another name")
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise TypeError(f"{self.kind} {name!r}: a component must be an nn.Module class, got {cls!r}")
            self._classes[name] = cls
            return cls

        return add

    def unregister(self, name: str) -> type:
        """Remove and return ``name`` (a component registered for a test or a notebook session)."""
        return self._classes.pop(name)

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._classes)})"

    def lookup(self, name: Any, where: str) -> type:
        """The class called ``name``; ``UnknownComponentError`` naming ``where`` and the registered names."""
        if not isinstance(name, str) or name not in self._classes:
            raise UnknownComponentError(f"{where}.{self.key} = {name!r}: no such {self.kind}; registered: "
                                        f"{', '.join(self._classes) or 'none'}")
        return self._classes[name]

    def options(self, name: str) -> Optional[dict[str, Any]]:
        """The options ``name`` takes, with their defaults; None when it takes any (``**kwargs``)."""
        params = list(inspect.signature(self._classes[name]).parameters.values())[1:]  # after the Context
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name: p.default for p in params
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in self.reserved}

    def check(self, spec: Any, where: str, default: Optional[str] = None) -> dict:
        """``spec`` with its ``key`` filled in (``default`` when absent), the name registered and every other
        key an option the component takes: ``ValueError`` / ``UnknownComponentError`` / ``LocatedTypeError``."""
        if isinstance(spec, str):  # shorthand: "rms" for {"norm_cls": "rms"}
            spec = {self.key: spec}
        if not isinstance(spec, Mapping):
            raise LocatedError(f"{where} = {spec!r}: must be a dict with {self.key!r} and the {self.kind}'s "
                               f"options")
        spec = dict(spec)
        if self.key not in spec:
            if default is None:
                raise LocatedError(f"{where}: no {self.key!r} (one of {', '.join(self._classes)})")
            spec = {self.key: default, **spec}
        name = spec[self.key]
        self.lookup(name, where)
        known = self.options(name)
        if known is not None:
            given = [k for k in spec if k != self.key and k not in self.reserved]
            unknown = [k for k in given if k not in known]
            if unknown:
                takes = ", ".join(known) if known else "no options"
                raise LocatedTypeError(f"{where}: {self.kind} {name!r} takes no option {unknown[0]!r} "
                                       f"(it takes: {takes})")
        return spec


def build(registry: Registry, spec: Mapping, ctx: Context, where: str) -> nn.Module:
    """The component ``spec`` names, built with its other keys as keyword arguments. Errors name ``where``:
    a ``ValueError`` from the component's own checks comes back as ``LocatedError("<where> (<name>): ...")``."""
    spec = registry.check(spec, where)
    name = spec[registry.key]
    try:
        return registry[name](ctx, **{k: v for k, v in spec.items() if k != registry.key})
    except (LocatedError, LocatedTypeError, UnknownComponentError):
        raise
    except ValueError as e:
        raise LocatedError(f"{where} ({name}): {e}") from e


def require_int(key: str, value: Any, minimum: int) -> int:
    """``value`` when it is an int of at least ``minimum``; else ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} = {value!r}: must be an integer")
    if value < minimum:
        raise ValueError(f"{key} = {value}: must be at least {minimum}")
    return value


def heads(ctx: Context, num_heads: Optional[int]) -> int:
    """The mixer's head count (the model's when None): a positive int dividing d_model, else ValueError."""
    key = "num_heads" if num_heads is not None else "num_heads (the model's)"
    n = require_int(key, ctx.num_heads if num_heads is None else num_heads, 1)
    if ctx.d_model % n:
        raise ValueError(f"{key} = {n}: must divide d_model = {ctx.d_model}")
    return n
