"""The lm-evaluation-harness model type ``agiformer`` (the ``eval`` and ``hf`` extras), registered on import.

    python -m agiformer.lm_eval --model agiformer --model_args pretrained=runs/tiny/last.pt \\
        --tasks agiformer_tiny_choice --include_path tests/data/lm_eval --device cpu

    import agiformer.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="agiformer", model_args="pretrained=exported/tiny", tasks=[...])

``python -m agiformer.lm_eval ARGS`` is the harness's own command line (``lm_eval ARGS``) with this model
type registered: the harness finds models only in its own table or in modules imported before it runs.
``pretrained`` is our checkpoint, an original v1 ``best_model.pth`` or a folder written by
``python -m agiformer.export``. Other model arguments: ``max_length`` (the scoring window in bytes; default
the model's training window), ``prefix`` (text put before every context and document; default none),
``backend``, ``seed`` (for sampled generation) and, for a v1 state_dict, ``num_heads``, ``window_size``,
``thinking_steps``; the harness's ``--batch_size`` and ``--device`` apply.

How bytes are scored (text is UTF-8; ``next_byte_logits`` gives each byte's distribution from the bytes
before it, the bytes of its own patch teacher-forced into the head):

- ``loglikelihood(context, continuation)``: the exact causal log-probability of the continuation's bytes
  after ``prefix + context``, patches aligned to the start of the text, wherever the continuation starts in a
  patch. Up to ``max_length`` bytes it is one window; a longer text is scored in windows of ``max_length``
  ending at the continuation's end, so the continuation keeps as much context as fits. The first patch
  of the text is never predicted, so a context (with ``prefix``) shorter than ``patch_size`` bytes is a
  ``ValueError`` naming the request: give ``prefix=`` to score such tasks. ``is_greedy``: every byte
  is its distribution's argmax.
- ``loglikelihood_rolling(document)``: the log-likelihood of the document's bytes from the first patch on
  (with ``prefix``: of all of them), in ``agiformer.evaluate``'s windows (``max_length`` long, stride
  ``max_length − P``, each window's first patch context only), so its bits per byte over the scored bytes
  equal ``evaluate.bits_per_byte`` of the same bytes. Bytes after the last whole patch, which evaluate
  leaves out, are scored too, as the continuation of a patch. The harness divides by all of a document's
  bytes, the unscored first patch included (P bytes fewer in the numerator than the denominator).
- ``generate_until(context, gen_kwargs)``: ``agiformer.generation.stream`` from ``prefix + context`` (its
  last bytes within ``max_length − P``, whole patches dropped from the front), cut before the first stop
  string of ``until``; ``max_gen_toks`` counts bytes; greedy unless ``do_sample`` (``temperature``,
  ``top_k``).

Requests are batched ``batch_size`` windows (or prompts) at a time, windows grouped by length.
"""

from __future__ import annotations

from . import _runtime  # noqa: F401  (before torch: malloc settings)

import sys
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  (the harness's own models first: it loads them only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise ImportError(f'agiformer.lm_eval needs lm-evaluation-harness: pip install "agiformer-kernels[eval]" '
                      f"({e})") from e

from . import checkpoint
from .data import eval_windows
from .generation import stream
from .hf import DEFAULT_SEQ_LEN, AgiformerForCausalLM, next_byte_logits
from .model import AGIFORMER

MODEL_TYPE = "agiformer"
DEFAULT_BATCH_SIZE = 8
GEN_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k"}
Span = tuple[int, int, int, int]  # a window [start, end) of a text and the bytes [lo, hi) it scores


def rolling_spans(length: int, patch_size: int, window: int, first: int) -> list[Span]:
    """``agiformer.evaluate``'s windows over a text of ``length`` bytes (padded to whole patches), scoring the
    bytes from ``first`` (at least the first patch's end) on."""
    P = patch_size
    padded = -(-length // P) * P
    spans = []
    for w in eval_windows(torch.arange(padded), window, P):
        start, end = int(w[0]), int(w[-1]) + 1
        spans.append((start, end, max(start + P, first), min(end, length)))
    return spans


def tail_spans(length: int, patch_size: int, window: int, first: int) -> list[Span]:
    """Windows of at most ``window`` bytes ending at the text's end (padded to whole patches), each scoring
    what follows its first patch, back to byte ``first``; every window starts at a multiple of P."""
    P = patch_size
    end = -(-length // P) * P
    spans = []
    while True:
        start = max(0, end - window)
        spans.append((start, end, max(start + P, first), min(end, length)))
        if start + P <= first or start == 0:
            return spans
        end = start + P


@torch.no_grad()
def score(model: AGIFORMER, texts: list[bytes], spans: list[list[Span]], batch_size: int = DEFAULT_BATCH_SIZE,
          progress: bool = False) -> list[tuple[float, bool]]:
    """For each text, (sum of the natural log-probabilities of the bytes its spans score, whether each of
    those bytes is its distribution's argmax); windows run ``batch_size`` at a time, longest first, each
    padded on the right to the longest of its batch."""
    P = model.patch_size
    device = next(model.parameters()).device
    jobs = sorted(((i, span) for i, text_spans in enumerate(spans) for span in text_spans if span[3] > span[2]),
                  key=lambda job: job[1][0] - job[1][1])  # longest first: a batch pads to its first window
    padded = [t + bytes(-len(t) % P) for t in texts]
    total = [0.0] * len(texts)
    greedy = [True] * len(texts)
    batches = [jobs[k : k + batch_size] for k in range(0, len(jobs), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="agiformer", disable=not progress, leave=False):
            n = batch[0][1][1] - batch[0][1][0]
            x = torch.tensor([list(padded[i][s:e].ljust(n, b"\0")) for i, (s, e, _, _) in batch], dtype=torch.long,
                             device=device)  # bytes after a window's end change no logit of its bytes
            logp = next_byte_logits(model, x[:, :-1]).float().log_softmax(-1)  # [:, t] predicts byte t + 1
            target = x[:, 1:]
            t = torch.arange(target.shape[1], device=device) + 1
            lo = torch.tensor([lo - s for _, (s, _, lo, _) in batch], device=device)[:, None]
            hi = torch.tensor([hi - s for _, (s, _, _, hi) in batch], device=device)[:, None]
            scored = (t >= lo) & (t < hi)
            byte_logp = logp.gather(-1, target[..., None]).squeeze(-1)
            sums = torch.where(scored, byte_logp.double(), 0.0).sum(1).tolist()
            hits = ((logp.argmax(-1) == target) | ~scored).all(1).tolist()
            for (i, _), s, h in zip(batch, sums, hits):
                total[i] += s
                greedy[i] = greedy[i] and h
    finally:
        model.train(was_training)
    return list(zip(total, greedy))


def load(pretrained: Union[str, Path], *, device: str = "cpu", backend: Optional[str] = None,
         overrides: Optional[dict] = None) -> tuple[AGIFORMER, int]:
    """(model in eval mode, its training window in bytes) from a checkpoint file (ours or v1's) or a folder
    (or Hub id) of ``save_pretrained``."""
    path = Path(pretrained)
    if path.is_file():
        model, ckpt = checkpoint.load_model(path, device=device, backend=backend, overrides=overrides)
        return model, ckpt.get("train_config", {}).get("seq_len", DEFAULT_SEQ_LEN)
    if any(v is not None for v in (overrides or {}).values()):
        raise ValueError(f"pretrained {pretrained}: num_heads, window_size and thinking_steps apply only to an "
                         f"original v1 state_dict; an exported folder records them")
    try:
        hf = AgiformerForCausalLM.from_pretrained(str(pretrained), backend=backend)
    except OSError as e:
        raise ValueError(f"pretrained {pretrained}: neither a checkpoint file nor a folder written by "
                         f"python -m agiformer.export ({str(e).splitlines()[0]})") from e
    return hf.model.to(device).eval(), hf.config.seq_len


def _batch_size(value: Union[int, str, None]) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE  # no search for the largest batch that fits: windows are small
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ValueError(f"batch_size {value!r}: a positive integer (or auto)")
    return size


@register_model(MODEL_TYPE)
class AgiformerLM(LM):
    """The harness's view of an AGIFORMER: bytes in, log-likelihoods and generated text out (see the
    module docstring for how each request is scored)."""

    def __init__(self, pretrained: str, *, device: Optional[str] = None, batch_size: Union[int, str, None] = None,
                 max_batch_size: Optional[int] = None, max_length: Optional[int] = None, prefix: str = "",
                 backend: Optional[str] = None, seed: int = 0, num_heads: Optional[int] = None,
                 window_size: Optional[int] = None, thinking_steps: Optional[int] = None, max_gen_toks: int = 256):
        super().__init__()
        del max_batch_size  # the harness passes it to every model type; batches here are fixed
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        overrides = dict(num_heads=num_heads, window_size=window_size, thinking_steps=thinking_steps)
        self.model, trained = load(pretrained, device=device, backend=backend, overrides=overrides)
        self._device = torch.device(device)
        P = self.patch_size = self.model.patch_size
        self.max_length = trained if max_length is None else max_length
        if not isinstance(self.max_length, int) or self.max_length % P or self.max_length < 2 * P:
            raise ValueError(f"max_length {self.max_length!r}: a multiple of the model's patch_size {P}, at least "
                             f"two patches ({2 * P})")
        self.batch_size = _batch_size(batch_size)
        self.prefix = ("" if prefix is None else str(prefix)).encode("utf-8")
        self.seed, self.max_gen_toks = seed, max_gen_toks

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        texts, spans = [], []
        for n, request in enumerate(requests):
            context, continuation = request.args
            context = self.prefix + context.encode("utf-8")
            if len(context) < self.patch_size and continuation:
                raise ValueError(
                    f"loglikelihood request {n}: its context (with the prefix model argument) is {len(context)} "
                    f"bytes; the model predicts a byte only after a whole patch ({self.patch_size} bytes): give "
                    f"model_args prefix=TEXT to put before every context")
            text = context + continuation.encode("utf-8")
            texts.append(text)
            spans.append(tail_spans(len(text), self.patch_size, self.max_length, len(context)))
        results = score(self.model, texts, spans, self.batch_size, progress=not disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self.prefix + request.args[0].encode("utf-8") for request in requests]
        first = max(self.patch_size, len(self.prefix))
        spans = [rolling_spans(len(t), self.patch_size, self.max_length, first) for t in texts]
        results = [ll for ll, _ in score(self.model, texts, spans, self.batch_size, progress=not disable_tqdm)]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = [self._gen_settings(n, request.args[1]) for n, request in enumerate(requests)]
        for n, s in enumerate(settings):
            groups.setdefault(repr(s), []).append(n)
        out: list[str] = [""] * len(requests)
        for rows in tqdm(groups.values(), desc="agiformer generate", disable=disable_tqdm, leave=False):
            for k in range(0, len(rows), self.batch_size):
                batch = rows[k : k + self.batch_size]
                prompts = [self._prompt(n, requests[n].args[0]) for n in batch]
                for n, text in zip(batch, self._generate(prompts, **settings[batch[0]])):
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    def _prompt(self, n: int, context: str) -> bytes:
        prompt = self.prefix + context.encode("utf-8")
        if len(prompt) < self.patch_size:
            raise ValueError(f"generate_until request {n}: its context (with the prefix model argument) is "
                             f"{len(prompt)} bytes, fewer than a patch ({self.patch_size}): give model_args "
                             f"prefix=TEXT to put before every context")
        keep = self.max_length - self.patch_size
        drop = -(-max(0, len(prompt) - keep) // self.patch_size) * self.patch_size
        return prompt[drop:]

    def _gen_settings(self, n: int, gen_kwargs: dict) -> dict:
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise ValueError(f"generate_until request {n}: gen_kwargs {unknown} not supported (the supported: "
                             f"{', '.join(sorted(GEN_KWARGS))})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False))
        return dict(until=[s.encode("utf-8") for s in until if s],
                    max_new_bytes=int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens",
                                                                                      self.max_gen_toks))),
                    temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                    top_k=gen_kwargs.get("top_k") if sample else None)

    def _generate(self, prompts: list[bytes], *, until: list[bytes], max_new_bytes: int, temperature: float,
                  top_k: Optional[int]) -> list[str]:
        """Each prompt's continuation, decoded, cut before its first stop string; rows stop early once
        every row holds one."""
        single = {s[0] for s in until if len(s) == 1}  # a one-byte stop ends its row inside stream
        pieces = [b""] * len(prompts)
        cut = [None] * len(prompts)
        for chunk in stream(self.model, prompts, max_new_bytes, temperature=temperature, top_k=top_k,
                            seed=self.seed, stop_bytes=single):
            for b, new in enumerate(chunk):
                if cut[b] is None and new:
                    pieces[b] += new
                    found = [i for i in (pieces[b].find(s) for s in until) if i >= 0]
                    cut[b] = min(found) if found else None
            if all(c is not None for c in cut):
                break
        return [(p if c is None else p[:c]).decode("utf-8", errors="replace") for p, c in zip(pieces, cut)]

    def get_model_info(self) -> dict:
        return {"model_config": self.model.config, "max_length": self.max_length}


def main(argv: Optional[list[str]] = None) -> None:
    """The harness's command line (``lm_eval …``) with ``--model agiformer`` available."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
