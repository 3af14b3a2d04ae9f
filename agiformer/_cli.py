"""What the command-line tools share: argument checks that run before anything loads, prompts from any
bytes, and one line (not a traceback) for an error the user can fix."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, Optional

from .errors import CheckpointError, UsageError

PLOT_EXTRA = 'pip install "agiformer-kernels[plot]"'


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """UsageError -> argparse's usage error (status 2); a checkpoint or data file that cannot be used -> one
    line naming it (status 1)."""
    try:
        yield
    except UsageError as e:
        parser.error(str(e))
    except (CheckpointError, FileNotFoundError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")


def at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: float, *names: str) -> None:
    """parser.error unless each named option (given, i.e. not None) is at least ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")


def check_device(parser: argparse.ArgumentParser, text: str) -> None:
    """parser.error for a device torch does not know or this machine lacks."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        parser.error(f"--device {text}: {str(e).splitlines()[0]}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: torch sees no CUDA device here (--device cpu runs on the CPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_backend(parser: argparse.ArgumentParser, name: Optional[str]) -> None:
    from agiformer_kernels.backends import BACKENDS

    if name is not None and name not in (*BACKENDS, "auto"):
        parser.error(f"--backend {name}: one of {', '.join(('auto', *BACKENDS))}")


def arg_bytes(text: str) -> bytes:
    """A command-line argument's own bytes: Python decodes argv with surrogateescape, so bytes that are not
    UTF-8 (a Latin-1 terminal, binary) come back unchanged."""
    return os.fsencode(text)


def unescape(parser: argparse.ArgumentParser, flag: str, text: str) -> bytes:
    """The bytes an argument with backslash escapes stands for ('\\n', '\\x00'; other bytes as given);
    an escape that does not parse, or names a character above \\xff, is a usage error."""
    try:
        return arg_bytes(text).decode("unicode_escape").encode("latin-1")
    except UnicodeDecodeError as e:
        parser.error(f"{flag} '{text}': a backslash escape that does not parse ({e.reason} at byte {e.start})")
    except UnicodeEncodeError:
        parser.error(f"{flag} '{text}': escapes name bytes, \\x00 to \\xff; a character above that is not one")


def read_bytes(parser: argparse.ArgumentParser, flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        parser.error(f"{flag} {path}: {e.strerror}")


def add_prompt(parser: argparse.ArgumentParser, default: str,
               file_help: str = "the prompt: the whole file's bytes") -> argparse._MutuallyExclusiveGroup:
    """``--prompt`` (the argument's bytes) or ``--prompt-file`` (a file's bytes); the group, for more sources."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=default,
                     help="the prompt: the argument's bytes as given (default %(default)r)")
    src.add_argument("--prompt-file", help=file_help)
    return src


def read_prompt(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bytes:
    """The bytes ``add_prompt``'s flags give."""
    if args.prompt_file:
        return read_bytes(parser, "--prompt-file", args.prompt_file)
    return arg_bytes(args.prompt)


def interrupted(parser: argparse.ArgumentParser) -> None:
    """Ctrl-C: exit with 130 (the shell's 128 + SIGINT), no traceback."""
    sys.stderr.flush()
    parser.exit(130)
