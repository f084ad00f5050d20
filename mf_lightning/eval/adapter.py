"""``HarnessLM``: one of our ``DecoderLM`` models and its ``Tokenizer`` as an lm-evaluation-harness model.

Every context starts with the end-of-text token, the document boundary our models are trained on (the
training stream is documents each followed by EOS, and ``mf predict`` prompts the same way), so an empty
context is just EOS. A context and continuation are tokenized together and split where the context's
own tokens end, with the context's trailing spaces moved into the continuation (as the harness does for
Hugging Face models), so a tokenizer that merges across the boundary scores the text it would produce.

Scoring is batched: the windows of all requests (see :mod:`.scoring_windows`) are sorted longest first, run
``batch_size`` at a time, right-padded (causal attention never looks at the padding), and the results
are put back in request order.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.eval import missing_extra
from mf_lightning.eval.scoring_windows import Window, scoring_windows
from mf_lightning.models.base import DecoderLM

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
except ModuleNotFoundError as error:
    raise missing_extra(error) from error

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


class HarnessLM(LM):
    """lm-eval's ``LM`` interface over ``model`` (used in eval mode, where it already is) and ``tokenizer``.

    Args:
        model: the language model; it stays on its device and dtype.
        tokenizer: the tokenizer it was trained with.
        batch_size: windows (loglikelihood) or prompts of equal length (generation) per forward pass.
        max_gen_toks: tokens to generate when a request does not say.
    """

    def __init__(
        self, model: DecoderLM, tokenizer: Tokenizer, batch_size: int = 1, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.max_len = model.config.max_seq_len

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def get_model_info(self) -> dict[str, Any]:
        """What the harness records about the model in its results JSON."""
        config = self.model.config
        return {
            "model_arch": config.arch,
            "model_num_parameters": self.model.num_parameters(),
            "model_max_seq_len": config.max_seq_len,
            "tokenizer": self.tokenizer.fingerprint,
        }

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), whether greedy decoding yields the continuation)`` per request."""
        pairs = [self.encode_pair(*request.args) for request in requests]
        results = self.score([scoring_windows(tokens, first, self.max_len) for tokens, first in pairs])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after EOS, in windows of ``max_seq_len`` tokens."""
        documents = [[self.tokenizer.eos_id, *self.tokenizer.encode(request.args[0])] for request in requests]
        results = [logprob for logprob, _ in self.score([scoring_windows(d, 1, self.max_len) for d in documents])]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuation of each context up to (not including) the first stop sequence, with the KV cache.

        Greedy unless the request's ``do_sample`` is true (then ``temperature``, ``top_k``, ``top_p`` apply).
        Prompts are cut from the left so that prompt plus ``max_gen_toks`` fit in ``max_seq_len``; prompts of
        equal length and options are decoded together, through the compiled decoding step (compiled with
        the first batch, reused by all later ones; ``generate`` already runs without gradients).
        """
        jobs = [self.generation_job(*request.args) for request in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (prompt, options, _) in enumerate(jobs):
            groups[(len(prompt), tuple(sorted(options.items())))].append(index)
        results: list[str] = [""] * len(requests)
        for (_, options), indices in groups.items():
            for batch in chunks(indices, self.batch_size):
                prompts = torch.tensor([jobs[i][0] for i in batch], device=self.device)
                out = self.model.generate(prompts, eos_id=self.tokenizer.eos_id, **dict(options))
                for row, index in enumerate(batch):
                    text = self.tokenizer.decode(out[row, prompts.shape[1] :].tolist())
                    results[index] = cut_at_stops(text, jobs[index][2])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, result)
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Tokens of EOS + context + continuation, and where the continuation's tokens start (an empty
        continuation has none and scores log-probability 0, greedy)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
        whole = [self.tokenizer.eos_id, *self.tokenizer.encode(context + continuation)]
        if len(whole) <= len(context_ids):  # the continuation merged into the context's last tokens
            whole = context_ids + self.tokenizer.encode(continuation)
        return whole, len(context_ids)

    def generation_job(self, context: str, gen_kwargs: dict[str, Any]) -> tuple[list[int], dict[str, Any], list[str]]:
        """``(prompt tokens, DecoderLM.generate options, stop sequences)`` of one generate_until request."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        stops = [until] if isinstance(until, str) else list(until)
        new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if new_tokens >= self.max_len:
            log.warning(
                "max_gen_toks=%d does not fit max_seq_len=%d; generating %d", new_tokens, self.max_len, self.max_len - 1
            )
            new_tokens = self.max_len - 1
        options: dict[str, Any] = {"max_new_tokens": new_tokens, "temperature": 0.0}
        if kwargs.get("do_sample"):
            options["temperature"] = float(kwargs.get("temperature", 1.0))
            options.update({key: kwargs[key] for key in ("top_k", "top_p") if kwargs.get(key) is not None})
        prompt = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
        return prompt[-(self.max_len - new_tokens) :], options, stops

    def score(self, requests: Sequence[Sequence[Window]]) -> list[tuple[float, bool]]:
        """``(summed log-probability, all targets greedy)`` per request, over all its windows."""
        windows = [(owner, window) for owner, request in enumerate(requests) for window in request]
        windows.sort(key=lambda item: len(item[1][0]), reverse=True)
        logprobs, greedy = [0.0] * len(requests), [True] * len(requests)
        for batch in chunks(windows, self.batch_size):
            for (owner, _), (logprob, is_greedy) in zip(batch, self.score_batch([window for _, window in batch])):
                logprobs[owner] += logprob
                greedy[owner] &= is_greedy
        return list(zip(logprobs, greedy))

    @torch.inference_mode()
    def score_batch(self, windows: Sequence[Window]) -> Iterator[tuple[float, bool]]:
        """``(log-probability of the targets, whether each target is the argmax)`` of each window, in one forward."""
        width = max(len(inputs) for inputs, _ in windows)
        ids = torch.full((len(windows), width), self.tokenizer.eos_id, dtype=torch.long)
        for row, (inputs, _) in enumerate(windows):
            ids[row, : len(inputs)] = torch.tensor(inputs)
        logits, _ = self.model(ids.to(self.device))
        for row, (inputs, targets) in enumerate(windows):
            scored = F.log_softmax(logits[row, len(inputs) - len(targets) : len(inputs)].float(), dim=-1)
            target = torch.tensor(targets, device=scored.device)
            logprob = scored.gather(-1, target[:, None]).sum().item()
            yield logprob, bool((scored.argmax(dim=-1) == target).all())


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of the non-empty ``stops`` it contains."""
    cut = min((text.find(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:cut]
