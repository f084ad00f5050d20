"""HarnessLM against log-probabilities computed directly from the model's logits, batched against one by one."""

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'mf_lightning[eval]'")

from eval_support import direct_logprob
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mf_lightning.eval.adapter import HarnessLM, cut_at_stops
from mf_lightning.eval.scoring_windows import scoring_windows
from mf_lightning.models import decode_step

PAIRS = [
    ("", "hello"),
    ("The cat sat on the", " mat"),
    ("Question: which is heavier?\nAnswer:", " a stone"),
    ("trailing space ", "moves"),
    ("a context that is far longer than the thirty-two tokens the model can read at once, so it is cut", " off"),
    ("x", ""),
]
DOCUMENTS = ["short text", "a document of several windows: " * 4, "é" * 40]


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


@pytest.mark.parametrize("length,max_len", [(1, 4), (4, 4), (5, 4), (11, 4), (40, 7), (3, 32)])
def test_windows_follow_the_harness_rolling_convention(length: int, max_len: int) -> None:
    tokens = list(range(100, 100 + length))
    ours = scoring_windows([0, *tokens], 1, max_len)
    theirs = [
        ((context + continuation)[-(max_len + 1) :][:-1], continuation)
        for context, continuation in map(make_disjoint_window, get_rolling_token_windows(tokens, 0, max_len, 1))
    ]
    assert ours == theirs
    assert [t for _, targets in ours for t in targets] == tokens  # every token scored exactly once


def test_windows_read_the_tokens_right_before_their_targets() -> None:
    tokens = list(range(50))
    for inputs, targets in scoring_windows(tokens, 9, 8):
        end = tokens.index(targets[-1])
        assert inputs == tokens[max(0, end - 8) : end] and len(inputs) <= 8


def test_loglikelihood_matches_the_logits(model, tokenizer) -> None:
    lm = HarnessLM(model, tokenizer, batch_size=4)
    results = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        tokens = [tokenizer.eos_id, *tokenizer.encode(context + continuation)]
        first = 1 + len(tokenizer.encode(context))
        expected = direct_logprob(model, tokens, first) if first < len(tokens) else (0.0, True)
        assert logprob == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]


def test_greedy_flag_is_true_exactly_for_the_argmax_continuation(model, tokenizer) -> None:
    context = [tokenizer.eos_id, *tokenizer.encode("abc")]
    greedy = model.generate(torch.tensor([context]), 5, temperature=0)[0, len(context) :].tolist()
    lm = HarnessLM(model, tokenizer)
    other = [(greedy[0] + 1) % 256, *greedy[1:]]
    scores = lm.score(
        [scoring_windows(context + greedy, len(context), 32), scoring_windows(context + other, len(context), 32)]
    )
    assert [is_greedy for _, is_greedy in scores] == [True, False]
    assert scores[0][0] > scores[1][0]


def test_rolling_loglikelihood_of_a_short_document_is_its_full_logprob(model, tokenizer) -> None:
    text = "fits in one window"
    (logprob,) = HarnessLM(model, tokenizer).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert logprob == pytest.approx(direct_logprob(model, [tokenizer.eos_id, *tokenizer.encode(text)], 1)[0], abs=1e-4)


def test_rolling_loglikelihood_sums_its_windows(model, tokenizer) -> None:
    text = DOCUMENTS[1]
    tokens = [tokenizer.eos_id, *tokenizer.encode(text)]
    (logprob,) = HarnessLM(model, tokenizer).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    windows = scoring_windows(tokens, 1, 32)
    assert len(windows) > 2
    expected = sum(
        direct_logprob(model, inputs + targets[-1:], len(inputs) + 1 - len(targets))[0] for inputs, targets in windows
    )
    assert logprob == pytest.approx(expected, abs=1e-3)


def test_batched_results_equal_one_by_one(model, tokenizer) -> None:
    one, batched = HarnessLM(model, tokenizer, batch_size=1), HarnessLM(model, tokenizer, batch_size=5)
    pairs = requests("loglikelihood", PAIRS)
    for (a, greedy_a), (b, greedy_b) in zip(one.loglikelihood(pairs), batched.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    documents = requests("loglikelihood_rolling", [(text,) for text in DOCUMENTS])
    assert one.loglikelihood_rolling(documents) == pytest.approx(batched.loglikelihood_rolling(documents), abs=1e-4)
    prompts = requests(
        "generate_until", [(text, {"until": ["\n"], "max_gen_toks": 6}) for text in ["abc", "xyz", "hello"]]
    )
    assert one.generate_until(prompts) == batched.generate_until(prompts)


def test_generate_until_is_greedy_kv_cache_generation_cut_at_the_stop(model, tokenizer) -> None:
    prompt = [tokenizer.eos_id, *tokenizer.encode("Once upon")]
    out = model.generate(torch.tensor([prompt]), 12, temperature=0, eos_id=tokenizer.eos_id, use_cache=False)
    full = tokenizer.decode(out[0, len(prompt) :].tolist())
    stop = full[5:7]
    lm = HarnessLM(model, tokenizer)
    [uncut, cut] = lm.generate_until(
        requests(
            "generate_until",
            [("Once upon", {"until": [], "max_gen_toks": 12}), ("Once upon", {"until": [stop], "max_gen_toks": 12})],
        )
    )
    assert uncut == full
    assert cut == full[: full.index(stop)] and len(cut) <= 5


def test_generate_until_decodes_through_the_compiled_step(model, tokenizer, monkeypatch) -> None:
    calls = []
    compiled = decode_step.compiled_decode_step
    monkeypatch.setattr(decode_step, "compiled_decode_step", lambda *args: calls.append(1) or compiled(*args))
    lm = HarnessLM(model, tokenizer, batch_size=2)
    texts = lm.generate_until(
        requests("generate_until", [(text, {"until": [], "max_gen_toks": 6}) for text in ["abc", "xyz"]])
    )
    assert len(calls) == 5, "one batch of two prompts: five steps after the prompt"
    prompts = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(text)] for text in ["abc", "xyz"]])
    eager = model.generate(prompts, 6, temperature=0, eos_id=tokenizer.eos_id, compile=False)
    assert texts == [tokenizer.decode(row[prompts.shape[1] :].tolist()) for row in eager]


def test_generate_until_cuts_long_prompts_from_the_left(model, tokenizer) -> None:
    long_prompt = "an old prompt start " * 5 + "the end"
    lm = HarnessLM(model, tokenizer)
    [text] = lm.generate_until(requests("generate_until", [(long_prompt, {"until": [], "max_gen_toks": 8})]))
    kept = tokenizer.encode(long_prompt)[-(32 - 8) :]
    out = model.generate(torch.tensor([kept]), 8, temperature=0, eos_id=tokenizer.eos_id)
    assert text == tokenizer.decode(out[0, len(kept) :].tolist())


def test_cut_at_stops_takes_the_earliest_stop() -> None:
    assert cut_at_stops("one. two\nthree", ["\n", ".", ""]) == "one"
    assert cut_at_stops("no stop here", ["#"]) == "no stop here"


@pytest.mark.parametrize("name,value", [("batch_size", 0), ("batch_size", 2.5), ("max_gen_toks", -1)])
def test_bad_settings_are_one_clear_error(model, tokenizer, name, value) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got {value}"):
        HarnessLM(model, tokenizer, **{name: value})
