"""Every op computes in its inputs' dtypes whatever autocast region it is called in: an fp32 call under bf16
autocast gives the same bits as outside it, on every backend here. Autocast stays on inside a custom op's
implementation and a backward, where it would cast the backends' own torch products: the byte table and the
context product of the Triton GRU, the C++ GRU backward's, a reference's state products (and turn the Triton
sampler's h scratch bf16, which its kernel does not compile for)."""

import pytest
import torch

import agiformer_kernels as K
from agiformer_kernels.backends import available_backends
from tests.ops.test_gru_patch import decode_args, loss_args, make_inputs, sample_args

H = 32


def _attention(call):
    def make():
        q, k, v = (torch.randn(1, 70, 2, 16, requires_grad=True) for _ in range(3))
        return [q, k, v], lambda backend: call(q, k, v, backend)
    return make


def _gru(args, op):
    def make():
        x, prev = make_inputs(5, 4, H, torch.float32, requires_grad=True)
        return list(x.values()), lambda backend: op(*args(x, prev), backend=backend)
    return make


# op -> make() -> (float leaves, call(backend) -> output)
CASES = {
    "linear_attention": _attention(lambda q, k, v, b: K.linear_attention(q, k, v, backend=b)),
    "sliding_window_attention": _attention(lambda q, k, v, b: K.sliding_window_attention(q, k, v, 8, backend=b)),
    "gru_patch_decode": _gru(decode_args, K.gru_patch_decode),
    "gru_patch_loss": _gru(loss_args, K.gru_patch_loss),
}


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request):
    return request.param


def _skip_unavailable(op, backend):
    state = available_backends("cpu")[op][backend]
    if state != "available":
        pytest.skip(state)


def _run(op, backend, autocast_forward, autocast_backward):
    torch.manual_seed(1)
    leaves, call = CASES[op]()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast_forward):
        out = call(backend)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast_backward):
        out.square().sum().backward()
    return [out] + [x.grad for x in leaves if x.grad is not None]  # decode leaves the head out


def _assert_same(what, got, plain):
    assert len(got) == len(plain), f"{what}: {len(got)} outputs, {len(plain)} outside autocast"
    for i, (a, b) in enumerate(zip(got, plain)):
        assert a.dtype == b.dtype and torch.equal(a, b), (
            f"{what}: output {i} differs by {float((a.double() - b.double()).abs().max()):.3e}")


@pytest.mark.parametrize("op", sorted(CASES))
def test_fp32_training_calls_ignore_autocast(op, backend):
    _skip_unavailable(op, backend)
    plain = _run(op, backend, False, False)
    # the AMP recipe (forward under autocast, backward outside) for every backend; backward under autocast
    # too for the custom ops (a reference's backward is PyTorch's autograd, cast there as any torch code)
    for forward, backward in [(True, False)] + ([(True, True)] if backend != "reference" else []):
        _assert_same(f"{op} {backend}, autocast forward {forward}, backward {backward}",
                     _run(op, backend, forward, backward), plain)


def test_fp32_decode_steps_ignore_autocast(backend):
    for op in ("linear_attention_step", "sliding_window_attention_step"):
        _skip_unavailable(op, backend)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    state = (torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16) + 1)
    cache = torch.randn(2, 2, 8, 3, 16)
    results = []
    for autocast in (False, True):
        s, kv = tuple(t.clone() for t in state), cache.clone()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            o_lin = K.linear_attention_step(q, k, v, s, backend=backend)
            o_win = K.sliding_window_attention_step(q, k, v, kv[0], kv[1], 5, backend=backend)
        results.append([o_lin, *s, o_win, kv])
    _assert_same(f"decode steps {backend}", results[1], results[0])


def test_fp32_sampling_and_byte_table_ignore_autocast(backend):
    _skip_unavailable("gru_patch_sample", backend)
    x, _ = make_inputs(20, 4, H, torch.float32)
    table = K.gru_patch_byte_table(x["byte_emb"], x["weight_ih"])
    with torch.autocast("cpu", torch.bfloat16):
        _assert_same("byte table", [K.gru_patch_byte_table(x["byte_emb"], x["weight_ih"])], [table])
    for kw in (dict(), dict(byte_table=table), dict(temperature=0.7)):
        bytes_ = []
        for autocast in (False, True):
            generator = torch.Generator().manual_seed(3)
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                bytes_.append(K.gru_patch_sample(*sample_args(x), patch_size=4, generator=generator, backend=backend,
                                                 **kw))
        _assert_same(f"sample {backend} {sorted(kw)}", bytes_[1:], bytes_[:1])
