"""Convert a checkpoint to the Hugging Face layout (``config.json`` + ``model.safetensors``; the ``hf`` extra).

    python -m agiformer.export runs/tiny/last.pt exported/tiny
    python -m agiformer.export best_model.pth exported/v1          # an original v1 state_dict

Then ``import agiformer.hf`` and ``AutoModelForCausalLM.from_pretrained("exported/tiny")``, or score it with
``python -m agiformer.lm_eval --model agiformer --model_args pretrained=exported/tiny …``.
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import argparse
from pathlib import Path
from typing import Optional

from . import _cli, checkpoint
from .errors import UsageError
from .evaluate import add_model_overrides, model_overrides

def export(path: str, out_dir: str, *, seq_len: Optional[int] = None, overrides: Optional[dict] = None) -> Path:
    """Write the model of checkpoint ``path`` (ours or an original v1 state_dict) to ``out_dir`` with
    ``save_pretrained``; ``seq_len`` (default: the checkpoint's training window, else 1024) is recorded as
    the window ``agiformer.lm_eval`` scores in."""
    from .hf import DEFAULT_SEQ_LEN, AgiformerForCausalLM

    model, ckpt = checkpoint.load_model(path, overrides=overrides)
    seq_len = seq_len or ckpt.get("train_config", {}).get("seq_len", DEFAULT_SEQ_LEN)
    if seq_len % model.patch_size or seq_len < 2 * model.patch_size:
        raise UsageError(f"seq_len {seq_len}: must be a multiple of the model's patch_size {model.patch_size} "
                         f"and at least two patches")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: a file, not a folder to export into")
    AgiformerForCausalLM.from_agiformer(model, seq_len).save_pretrained(out)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agiformer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="our checkpoint (.pt) or an original v1 best_model.pth")
    parser.add_argument("out_dir", help="folder for config.json and model.safetensors (created)")
    parser.add_argument("--seq-len", type=int, help="window in bytes the model is scored in (default: the "
                                                    "checkpoint's training length, 1024 for a v1 state_dict)")
    add_model_overrides(parser)
    args = parser.parse_args(argv)
    _cli.at_least(parser, args, 1, "seq_len", "num_heads", "window_size")
    _cli.at_least(parser, args, 0, "thinking_steps")
    try:
        from . import hf  # noqa: F401
    except ImportError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    with _cli.user_errors(parser):
        try:
            out = export(args.checkpoint, args.out_dir, seq_len=args.seq_len, overrides=model_overrides(args))
        except FileExistsError as e:
            parser.exit(1, f"{parser.prog}: error: {e}\n")
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"{out}: {files}")


if __name__ == "__main__":
    main()
