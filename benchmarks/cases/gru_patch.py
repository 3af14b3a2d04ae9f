"""GRU patch decoder (docs/ops.md §1.3): our backends beside AGIFORMER v1's head (``benchmarks/baselines/v1.py``).

- ``gru_patch_loss`` (training): the fused teacher-forced GRU + head + cross-entropy, forward and backward,
  against v1's embedding → concat → nn.GRU (cuDNN on GPU, oneDNN/ATen on CPU) → Linear → cross_entropy
  over the [M, P, 256] logits ("v1-nn.GRU").
- ``gru_patch_decode``: the plain path returning hidden states, against the same nn.GRU without the head.
- ``gru_patch_sample`` (inference): one call per patch against v1's per-byte loop (embedding, concat,
  nn.GRU step, Linear, argmax or softmax + multinomial: ~5 ops per byte, "v1-loop"). Our calls get the
  byte table (``gru_patch_byte_table``) built once outside the timing, as generation builds it once for all
  its patches; v1's loop has no such table and needs none. ``gru_patch_sample_t1``
  is the same at temperature 1, where v1 draws with torch.multinomial and we with the counter-based hash:
  the bytes differ (err column ~1), only their distribution agrees (tests/ops/test_gru_patch.py).

The v1 paths are ``alternative`` impls; they run on CPU too and are the CPU baselines. All impls of a case
share one set of weights (an nn.GRU / nn.Embedding / nn.Linear whose parameters the inputs dict also holds).

The issue's CPU targets (training 3x, sampling 10x at M 1 and 16, 2x at M 512) are these quick cases:
``python -m benchmarks.run --quick --op gru_patch_loss --op gru_patch_sample --op gru_patch_sample_t1 --rounds 5``.

FLOPs count our formulation's useful work (2 per multiply-add): the byte table 256×3h×h where the call
builds it (or the per-step byte projection when that is smaller; nothing when it is given), the context
part M×3h×h, W_hh for the P - 1 steps after the first (h_0 = 0), and the head M×P×256×h; bytes count the
weights, inputs and outputs once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agiformer_kernels import gru_patch_byte_table, gru_patch_decode, gru_patch_loss, gru_patch_sample
from benchmarks.registry import backend_available, case, impl

DECODE_OP = "gru_patch_decode"
LOSS_OP = "gru_patch_loss"
SAMPLE_OP = "gru_patch_sample"
BACKENDS = ("reference", "cpu", "triton", "cuda")


def make_inputs(M: int, P: int, h: int, grad: bool, table: bool = False):
    """table: also the byte table of the weights, built once outside the timing, as generation does."""

    def make(device, dtype):
        torch.manual_seed(0)
        gru = nn.GRU(2 * h, h, batch_first=True).to(device, dtype)
        emb = nn.Embedding(256, h).to(device, dtype)
        head = nn.Linear(h, 256).to(device, dtype)
        for module in (gru, emb, head):
            module.requires_grad_(grad)
        return {
            "byte_table": gru_patch_byte_table(emb.weight, gru.weight_ih_l0) if table else None,
            "context": torch.randn(M, h, device=device, dtype=dtype, requires_grad=grad),
            "targets": torch.randint(0, 256, (M, P), device=device),
            "byte_emb": emb.weight, "weight_ih": gru.weight_ih_l0, "weight_hh": gru.weight_hh_l0,
            "bias_ih": gru.bias_ih_l0, "bias_hh": gru.bias_hh_l0, "head_weight": head.weight, "head_bias": head.bias,
            "modules": (gru, emb, head), "P": P,
        }

    return make


def _weights(inputs):
    return tuple(inputs[k] for k in ("byte_emb", "weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def _prev_bytes(targets):
    return torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], 1)


# ------------------------------------------------------------------ ours


def _decode(backend):
    def run(inputs):
        return gru_patch_decode(inputs["context"], _prev_bytes(inputs["targets"]), *_weights(inputs), backend=backend)

    return run


def _loss(backend):
    def run(inputs):
        return gru_patch_loss(inputs["context"], inputs["targets"], *_weights(inputs), inputs["head_weight"],
                              inputs["head_bias"], backend=backend)

    return run


def _sample(backend, temperature):
    def run(inputs):
        return gru_patch_sample(inputs["context"], *_weights(inputs), inputs["head_weight"], inputs["head_bias"],
                                patch_size=inputs["P"], temperature=temperature, byte_table=inputs["byte_table"],
                                backend=backend)

    return run


# ------------------------------------------------------------------ v1 (benchmarks/baselines/v1.py's head)


def v1_hidden(inputs):
    """v1's teacher-forced path up to the GRU: embedding, concat with the latent, nn.GRU."""
    gru, emb, _ = inputs["modules"]
    c, y = inputs["context"], inputs["targets"]
    M, P = y.shape
    x = torch.cat([emb(_prev_bytes(y)), c[:, None].expand(M, P, c.shape[1])], -1)
    return gru(x)[0]


def v1_loss(inputs):
    """v1's training head: nn.GRU, Linear over all [M, P, 256] logits, cross-entropy."""
    _, _, head = inputs["modules"]
    logits = head(v1_hidden(inputs))
    return F.cross_entropy(logits.reshape(-1, 256).float(), inputs["targets"].reshape(-1))


def v1_loop(temperature):
    def run(inputs):
        """v1's sampling loop: per byte embedding, concat, one nn.GRU step, Linear, argmax or multinomial."""
        gru, emb, head = inputs["modules"]
        c = inputs["context"][:, None]
        byte = torch.zeros(c.shape[0], 1, dtype=torch.long, device=c.device)
        hx, produced = None, []
        for _ in range(inputs["P"]):
            out, hx = gru(torch.cat([emb(byte), c], -1), hx)
            logits = head(out[:, -1])
            if temperature > 0:
                byte = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)
            else:
                byte = logits.argmax(-1, keepdim=True)
            produced.append(byte)
        return torch.cat(produced, 1)

    return run


for _name in BACKENDS:
    impl(DECODE_OP, _name, _decode(_name), available=backend_available(_name, DECODE_OP))
    impl(LOSS_OP, _name, _loss(_name), available=backend_available(_name, LOSS_OP))
impl(DECODE_OP, "v1-nn.GRU", v1_hidden, alternative=True)
impl(LOSS_OP, "v1-nn.GRU", v1_loss, alternative=True)

# sampling: greedy and T = 1 are separate ops, so the runner compares each with the v1 loop of its kind
for _t, _op in ((0.0, SAMPLE_OP), (1.0, SAMPLE_OP + "_t1")):
    for _name in BACKENDS:
        impl(_op, _name, _sample(_name, _t), available=backend_available(_name, SAMPLE_OP))
    impl(_op, "v1-loop", v1_loop(_t), alternative=True)


# ------------------------------------------------------------------ cases


def work(M: int, P: int, h: int, head: bool, byte_rows: int) -> float:
    """Forward FLOPs of our formulation (see the module docstring); byte_rows: 256 where the call builds
    the byte table, M·P where it projects each step's embeddings instead, 0 where it is given."""
    gemm = 3 * h * h * (byte_rows + M + M * (P - 1))
    return 2.0 * (gemm + (M * P * 256 * h if head else 0))


def traffic(M: int, P: int, h: int, head: bool, dtype: torch.dtype, out_elems: int) -> float:
    size = torch.finfo(dtype).bits // 8
    weights = 3 * h * 2 * h + 3 * h * h + 6 * h + 256 * h + (256 * h + 256 if head else 0)
    return float(size * (weights + M * h + out_elems) + 8 * M * P)


def training_cases(M, P, h, device, dtype, **kw):
    params = dict(M=M, P=P, h=h)
    name = f"M{M}-P{P}-h{h}"
    byte_rows = 256 if M * P >= 512 else M * P  # the CPU kernels' choice (the GPU paths always build it)
    case(DECODE_OP, name, device, dtype, make_inputs(M, P, h, True), flops=work(M, P, h, False, byte_rows),
         bytes=traffic(M, P, h, False, dtype, M * P * h), params=params, **kw)
    case(LOSS_OP, name, device, dtype, make_inputs(M, P, h, True), flops=work(M, P, h, True, byte_rows),
         bytes=traffic(M, P, h, True, dtype, 1), params=params, **kw)


def sampling_cases(M, P, h, device, dtype, temperatures=(0.0, 1.0), **kw):
    for t in temperatures:
        case(SAMPLE_OP if t == 0 else SAMPLE_OP + "_t1", f"M{M}-P{P}-h{h}-T{t:g}", device, dtype,
             make_inputs(M, P, h, False, table=True), backward=False, flops=work(M, P, h, True, 0),
             bytes=traffic(M, P, h, True, dtype, M * P), params=dict(M=M, P=P, h=h, temperature=t), **kw)


# CPU (fp32, docs/ops.md §3: GRU M 512), and the generation regime M = 1, 16 for sampling
training_cases(512, 4, 256, "cpu", torch.float32, quick=True)
for _M in (1, 16, 512):
    sampling_cases(_M, 4, 256, "cpu", torch.float32, quick=True)
# GPU, docs/ops.md §3: M 8192 and 65536, P 4, h 256, bf16
for _M in (8192, 65536):
    training_cases(_M, 4, 256, "cuda", torch.bfloat16)
    sampling_cases(_M, 4, 256, "cuda", torch.bfloat16)
