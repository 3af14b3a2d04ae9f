"""Checkpoints: ours (model, optimizer, scheduler, RNG, step, config) and original v1 state_dicts.

Ours are two files: ``<name>`` (``last.pt``: everything but the model weights, by ``torch.save``) and the
model's state_dict in safetensors beside it, ``<name>.<12 hex>.safetensors``, which ``<name>`` names (the
hex is the start of the checkpoint's checksum, so a save never overwrites the weights the previous one
reads). Copy or move the two together. A file of ours written before the weights moved out holds them
inline and loads unchanged.

Ours carry a SHA-256 checksum of what they hold (each tensor's bytes, each other value's repr), checked
on every ``read``: a damaged, truncated, empty, foreign or unreadable file is refused with a
``CheckpointError`` whose one line names the file and the problem. A file of ours written before
checksums existed loads with an ``UnverifiedCheckpointWarning`` (there is nothing to check it against;
saving it again adds one). Original v1 state_dicts never had one and load silently.

A save writes the new weights file, then ``<name>.tmp``, flushes both to disk and renames the ``.tmp`` over
``<name>``; only then does it delete the weights file the previous ``<name>`` named (unless another
checkpoint in the folder, ``*.pt`` or ``*.pth``, names it too). An interrupted save leaves the previous
checkpoint whole, and ``remove_leftovers`` deletes what a killed save left (``.tmp`` files; weights no
checkpoint names).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .components import UnknownComponentError
from .errors import CheckpointError, UsageError
from .model import AGIFORMER, DEFAULT_CONFIG

FORMAT = "agiformer-checkpoint-1"
TEMP_SUFFIX = ".tmp"
WEIGHTS_SUFFIX = ".safetensors"
WEIGHTS_KEY = "model_file"  # in <name>: the weights file's name, in the same folder
CHECKPOINT_GLOBS = ("*.pt", "*.pth")  # the files whose weights a save or remove_leftovers never deletes


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint of ours without a checksum (written before they existed) was loaded unchecked."""


def checksum(contents: Any) -> str:
    """"sha256:<hex>" of ``contents``: tensors by dtype, shape and bytes; dicts (keys in repr order), lists
    and tuples element by element; anything else by its repr."""
    h = hashlib.sha256()
    _digest(h, contents)
    return "sha256:" + h.hexdigest()


def _digest(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}:".encode())
            _digest(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _digest(h, item)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _write(path: Path, write: Any) -> None:
    """``write(f)`` into ``path`` + ``.tmp``, flushed to disk, renamed over ``path``; no ``.tmp`` stays behind."""
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too
        tmp.unlink(missing_ok=True)
        raise


def _weights_name(path: Path) -> Optional[str]:
    """The weights file a checkpoint of ours names (None: weights inline, not ours, or unreadable)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    name = ckpt.get(WEIGHTS_KEY) if isinstance(ckpt, dict) else None
    return name if isinstance(name, str) else None


def _named_weights(folder: Path, but: Optional[Path] = None) -> set:
    """The weights files the checkpoints in ``folder`` (but ``but``) name."""
    return {_weights_name(p) for g in CHECKPOINT_GLOBS for p in folder.glob(g) if p != but} - {None}


def save(path: os.PathLike, **contents: Any) -> None:
    """Write ``contents`` with their checksum, atomically (see the module docstring); a ``model`` state_dict
    goes to the safetensors file beside ``path``."""
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    if path.suffix == WEIGHTS_SUFFIX:
        raise ValueError(f"path {path}: the checkpoint itself is a torch file (last.pt); its weights go beside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, **contents}
    body["checksum"] = checksum(body)
    previous = _weights_name(path) if path.exists() else None
    weights = None
    if _is_state_dict(body.get("model")):
        model = body.pop("model")
        weights = path.with_name(f"{path.name}.{body['checksum'][7:19]}{WEIGHTS_SUFFIX}")
        body[WEIGHTS_KEY] = weights.name
        body["model_keys"] = list(model)  # safetensors stores keys sorted; the state_dict's order comes back
        existed = weights.exists()  # the same contents saved again: the file is already right
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.items()}
        _write(weights, lambda f: f.write(safetensors_bytes(tensors, metadata={"format": "pt"})))
    try:
        _write(path, lambda f: torch.save(body, f))
    except BaseException:
        if weights is not None and not existed:
            weights.unlink(missing_ok=True)
        raise
    if previous and (weights is None or previous != weights.name) and previous not in _named_weights(
            path.parent, path):
        (path.parent / previous).unlink(missing_ok=True)


_WEIGHTS_FILE = re.compile(r".+\.[0-9a-f]{12}" + re.escape(WEIGHTS_SUFFIX))


def remove_leftovers(folder: os.PathLike) -> list[Path]:
    """Delete what saves in ``folder`` that were killed mid-write left: ``*.tmp`` files of checkpoints and
    weights, and weights files (``<name>.<12 hex>.safetensors``) that neither ``<name>`` nor a ``*.pt`` or
    ``*.pth`` in ``folder`` names.
    Returns them."""
    folder = Path(folder)
    found = sorted(p for p in folder.glob("*" + TEMP_SUFFIX)
                   if p.name.endswith((".pt" + TEMP_SUFFIX, WEIGHTS_SUFFIX + TEMP_SUFFIX)))
    named = _named_weights(folder)
    for p in sorted(folder.glob("*" + WEIGHTS_SUFFIX)):
        owner = p.with_name(p.name[: -len(".0123456789ab" + WEIGHTS_SUFFIX)])  # the checkpoint it was written for
        if _WEIGHTS_FILE.fullmatch(p.name) and p.name not in named and _weights_name(owner) != p.name:
            found.append(p)
    for leftover in found:
        leftover.unlink(missing_ok=True)
    return found


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read(path: os.PathLike, map_location: Any = "cpu") -> dict:
    """The checkpoint dict in ``path``, its checksum verified; ``CheckpointError`` when it cannot be used."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder, not a checkpoint file") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not magic:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle and unpickler errors, whose messages run to many lines
        if not magic.startswith((b"PK", b"\x80")):  # a zip archive (torch.save) or a pickle (older torch)
            problem = "not a PyTorch checkpoint"
        elif isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            problem = "holds Python objects other than tensors and plain values (a pickled model?), not a state_dict"
        else:
            problem = "truncated or damaged (PyTorch cannot read it)"
        raise CheckpointError(f"{path}: {problem}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint (a dict)")
    if isinstance(ckpt.get(WEIGHTS_KEY), str):
        ckpt = _with_weights(ckpt, path, map_location)
    expected = ckpt.get("checksum")
    if expected is not None:
        if checksum({k: v for k, v in ckpt.items() if k != "checksum"}) != expected:
            raise CheckpointError(f"{path}: checksum mismatch: the contents changed after it was written "
                                  f"(a damaged file)")
    elif ckpt.get("format") == FORMAT:
        warnings.warn(f"{path}: written without a checksum (before checksums existed), loaded unverified",
                      UnverifiedCheckpointWarning, stacklevel=2)
    return ckpt


def _with_weights(ckpt: dict, path: Path, map_location: Any) -> dict:
    """``ckpt`` with the state_dict of the weights file it names put back as ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path.parent / ckpt.pop(WEIGHTS_KEY)
    keys = ckpt.pop("model_keys", None)
    if not weights.is_file():
        raise CheckpointError(f"{path}: its weights file {weights.name} is missing (a checkpoint is the file and "
                              f"the .safetensors beside it: copy both)")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: its weights file {weights.name} is truncated or damaged "
                              f"({_one_line(e)})") from e
    if keys is not None and sorted(keys) == sorted(tensors):
        tensors = {k: tensors[k] for k in keys}
    if map_location not in (None, "cpu"):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return {**ckpt, "model": tensors}


def _unwrap(ckpt: dict, path: os.PathLike) -> tuple[dict, Optional[dict]]:
    """(model state_dict, config or None) of either format."""
    if ckpt.get("format") == FORMAT:
        if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{path}: an AGIFORMER checkpoint without its model or config")
        return ckpt["model"], ckpt["config"]
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key], ckpt.get("config")
    if "encoder.byte_embedding.weight" in ckpt:
        return ckpt, None
    raise CheckpointError(f"{path}: not an AGIFORMER checkpoint (no model state_dict in it)")


def infer_config(state: dict, overrides: Optional[dict] = None) -> dict:
    """A v1 state_dict's config: sizes read off the weights; num_heads, window_size and thinking_steps
    do not show in the shapes and take v1's defaults unless ``overrides`` names them."""
    config = dict(DEFAULT_CONFIG)
    config["d_model"] = state["encoder.byte_embedding.weight"].shape[1]
    config["patch_size"] = state["encoder.patch_conv.weight"].shape[2]
    config["n_layers"] = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config


def load_model(path: os.PathLike, *, device: Any = "cpu", backend: Optional[str] = None,
               overrides: Optional[dict] = None) -> tuple[AGIFORMER, dict]:
    """(model in eval mode, checkpoint dict) from our checkpoint (of any architecture: its config is rebuilt)
    or an original v1 ``best_model.pth``.

    ``overrides`` (num_heads, window_size, thinking_steps; None: not given) apply to a v1 state_dict only,
    whose weights do not show them; for our checkpoints, which record them, a value that differs from
    the recorded one is a ``UsageError`` naming the flag."""
    ckpt = read(path)
    state, config = _unwrap(ckpt, path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config is None:
        try:
            config = infer_config(state, given)
        except (KeyError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: not an AGIFORMER state_dict (no {_one_line(e)})") from e
    else:
        differ = {k: v for k, v in given.items() if config.get(k) != v}
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in differ.items())
            recorded = ", ".join(f"{k} = {config.get(k)}" for k in differ)
            raise UsageError(f"{flags}: only for an original v1 state_dict, whose weights do not show it; "
                             f"{path} records {recorded}")
    try:
        model = AGIFORMER.from_config(config, backend=backend)
    except UnknownComponentError as e:
        raise CheckpointError(f"{path}: its architecture names a component not registered in this process: "
                              f"{e} (import the code that registers it before loading)") from e
    except (TypeError, ValueError) as e:
        if given and ckpt.get("format") != FORMAT:
            raise UsageError(f"{path} with {given}: {_one_line(e)}") from e
        raise CheckpointError(f"{path}: its config does not build a model ({_one_line(e)})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model it describes ({_one_line(e)})") from e
    return model.to(device).eval(), ckpt
