"""The lm-evaluation-harness model type: each log-likelihood is the model's causal probability of the bytes
given only the bytes before them (a continuation starting anywhere in a patch, long texts in windows),
documents score as agiformer.evaluate scores them, generation is ours cut at stop strings, and the harness
(Python API and command line) reports exactly these numbers on a local task (needs the eval and hf extras)."""

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from agiformer import checkpoint  # noqa: E402
from agiformer import lm_eval as agiformer_lm_eval  # noqa: E402
from agiformer.evaluate import bits_per_byte  # noqa: E402
from agiformer.generation import generate  # noqa: E402
from agiformer.lm_eval import AgiformerLM, rolling_spans, tail_spans  # noqa: E402
from tests.model.test_hf import byte_logprobs_reference, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval"
P = 4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny model's checkpoint whose bytes are printable ASCII (so generated text decodes as it was made)."""
    model = tiny_model()
    with torch.no_grad():
        model.head.head.bias[:32] -= 30.0
        model.head.head.bias[127:] -= 30.0
    path = tmp_path_factory.mktemp("lm_eval") / "last.pt"
    checkpoint.save(path, model=model.state_dict(), config=model.config, train_config={"seq_len": 32})
    return path


@pytest.fixture
def lm(pretrained) -> AgiformerLM:
    return AgiformerLM(str(pretrained), backend="reference", device="cpu", batch_size=3)


def requests(kind, *args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def reference(model, text: bytes, spans) -> tuple[float, bool]:
    """What ``spans`` score, byte by byte: each byte's probability from a run given only the window's bytes
    before it."""
    total, greedy = 0.0, True
    for start, _, lo, hi in spans:
        for j in range(lo, hi):
            logp = byte_logprobs_reference(model, text[start:], j - start)
            total += float(logp[text[j]])
            greedy = greedy and int(logp.argmax()) == text[j]
    return total, greedy


def test_loglikelihood_is_exact_wherever_the_continuation_starts_in_a_patch(lm):
    pairs = [("abcdefghijk"[:n], "lmnopq"[:m]) for n in range(P, P + 2 * P) for m in (1, 2, 5)]
    for (ll, greedy), (context, continuation) in zip(lm.loglikelihood(requests("loglikelihood", *pairs)), pairs):
        text = (context + continuation).encode()
        assert len(tail_spans(len(text), P, lm.max_length, len(context))) == 1  # one window: the whole text
        want, want_greedy = reference(lm.model, text, [(0, len(text), len(context), len(text))])
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_a_long_text_is_scored_in_windows_that_end_at_the_continuation(lm):
    lm.max_length = 16
    context, continuation = "the context runs on for a while, ", "and so does this continuation."
    text = (context + continuation).encode()
    spans = tail_spans(len(text), P, 16, len(context))
    assert sum(hi - lo for *_, lo, hi in spans) == len(continuation) and all(s % P == 0 for s, *_ in spans)
    assert all(e - s <= 16 for s, e, *_ in spans)
    ((ll, greedy),) = lm.loglikelihood(requests("loglikelihood", (context, continuation)))
    assert (ll, greedy) == pytest.approx(reference(lm.model, text, spans), abs=1e-4)


def test_rolling_log_likelihood_is_evaluate_bits_per_byte_on_the_same_bytes(lm):
    lm.max_length = 16
    doc = "AGIFORMER reads bytes in patches of four; this document has 64.\n"
    assert len(doc) == 64
    (ll,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (doc,)))
    bpb, n = bits_per_byte(lm.model, torch.tensor(list(doc.encode())), seq_len=16, batch_size=2)
    assert n == 64 - P and -ll / n / math.log(2) == pytest.approx(bpb, rel=1e-6)
    # Two more bytes: evaluate leaves out what follows the last whole patch; the harness gets them too.
    (longer,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (doc + "!?",)))
    spans = rolling_spans(66, P, 16, P)
    assert longer - ll == pytest.approx(reference(lm.model, (doc + "!?").encode(), spans[-1:])[0], abs=1e-4)


def test_a_context_shorter_than_a_patch_needs_a_prefix(lm):
    with pytest.raises(ValueError, match="loglikelihood request 1: .* 3 bytes.*prefix=TEXT"):
        lm.loglikelihood(requests("loglikelihood", ("abcd", "e"), ("abc", "d")))
    lm.prefix = b"\n\n"
    ((ll, _),) = lm.loglikelihood(requests("loglikelihood", ("abc", "defg")))
    assert ll == pytest.approx(reference(lm.model, b"\n\nabcdefg", [(0, 9, 5, 9)])[0], abs=1e-4)


def test_generate_until_is_our_generation_cut_before_the_first_stop_string(lm):
    prompts = ["Once upon", "a time"]
    made = [generate(lm.model, p, 12).decode() for p in prompts]
    stops = [made[0][5:7], made[1][3]]  # a two-byte stop and a one-byte stop, both in the output
    out = lm.generate_until(requests("generate_until", *[
        (p, {"until": [s, "never"], "max_gen_toks": 12, "do_sample": False}) for p, s in zip(prompts, stops)]))
    assert out == [m[: m.find(s)] for m, s in zip(made, stops)]
    assert lm.generate_until(requests("generate_until", (prompts[0], {"max_gen_toks": 7}))) == [made[0][:7]]
    with pytest.raises(ValueError, match=r"gen_kwargs \['top_p'\] not supported"):
        lm.generate_until(requests("generate_until", (prompts[0], {"top_p": 0.9})))


def test_an_exported_folder_scores_as_its_checkpoint(pretrained, lm, tmp_path):
    from agiformer.export import export

    export(str(pretrained), str(tmp_path / "exported"))
    folder = AgiformerLM(str(tmp_path / "exported"), backend="reference", device="cpu")
    assert folder.max_length == lm.max_length == 32
    pairs = requests("loglikelihood", ("alpha beta gam", "ma delta"), ("The quick brown fox", " jumps"))
    assert folder.loglikelihood(pairs) == lm.loglikelihood(pairs)


def test_bad_model_arguments_are_named(pretrained, tmp_path):
    with pytest.raises(ValueError, match="max_length 30: a multiple of the model's patch_size 4"):
        AgiformerLM(str(pretrained), max_length=30, device="cpu")
    with pytest.raises(ValueError, match="batch_size 'x'"):
        AgiformerLM(str(pretrained), batch_size="x", device="cpu")
    with pytest.raises(ValueError, match=f"pretrained {tmp_path / 'none'}: neither a checkpoint file nor a folder"):
        AgiformerLM(str(tmp_path / "none"), device="cpu")


@pytest.fixture
def local_tasks_only(monkeypatch):
    """Run from the repository (the task files name their data from there), indexing only the local tasks,
    not the harness's thousands."""
    import lm_eval.tasks

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))


def test_the_harness_reports_the_models_own_log_likelihoods(pretrained, local_tasks_only):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="agiformer", model_args=f"pretrained={pretrained},backend=reference", device="cpu", batch_size=4,
        tasks=["agiformer_tiny_choice", "agiformer_tiny_perplexity", "agiformer_tiny_generate"],
        task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    model = checkpoint.load_model(pretrained, backend="reference")[0]
    checked = 0
    for sample in out["samples"]["agiformer_tiny_choice"]:
        for (context, continuation), ((ll, greedy),) in zip(sample["arguments"], sample["resps"]):
            text = (context + continuation).encode()
            want = reference(model, text, tail_spans(len(text), P, 32, len(context.encode())))
            assert (ll, greedy) == pytest.approx(want, abs=1e-4), (context, continuation)
            checked += 1
    assert checked == 14
    for sample in out["samples"]["agiformer_tiny_perplexity"]:
        ((doc,),), ((ll,),) = sample["arguments"], sample["resps"]
        text = doc.encode()
        assert ll == pytest.approx(reference(model, text, rolling_spans(len(text), P, 32, P))[0], abs=1e-4)
    for sample in out["samples"]["agiformer_tiny_generate"]:
        ((context, kwargs),), ((made,),) = sample["arguments"], sample["resps"]
        prompt = context.encode()
        prompt = prompt[-(-max(0, len(prompt) - (32 - P)) // P) * P :]  # what fits the window, whole patches
        full = generate(model, prompt, kwargs["max_gen_toks"]).decode()
        cut = min([i for i in (full.find(s) for s in kwargs["until"]) if i >= 0], default=len(full))
        assert made == full[:cut]
    assert 0 <= out["results"]["agiformer_tiny_choice"]["acc,none"] <= 1


def test_the_command_line_runs_the_harness_with_the_model_registered(pretrained, local_tasks_only, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main hands the harness its arguments through sys.argv
    agiformer_lm_eval.main(["--model", "agiformer", "--model_args", f"pretrained={pretrained},backend=reference",
                            "--tasks", "agiformer_tiny_perplexity", "--include_path", str(TASKS), "--device", "cpu",
                            "--limit", "2"])
    out = capsys.readouterr().out
    assert "agiformer_tiny_perplexity" in out and "bits_per_byte" in out
