"""Helpers of the eval tests: the local tasks' folder and log-probabilities straight from a model's logits."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mf_lightning.models.base import DecoderLM

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "eval" / "tasks"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def direct_logprob(model: DecoderLM, tokens: list[int], first: int) -> tuple[float, bool]:
    """log P(tokens[first:] | tokens[:first]) and whether each is the argmax, from the logits of one forward
    over the last max_seq_len + 1 tokens (the continuation must fit in max_seq_len)."""
    count = len(tokens) - first
    kept = tokens[-(model.config.max_seq_len + 1) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor([kept[:-1]]))
    logprobs = F.log_softmax(logits[0, -count:].double(), dim=-1)
    targets = torch.tensor(kept[-count:])
    return float(logprobs.gather(-1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def bits_per_byte(logprob: float, text: str) -> float:
    return -logprob / (len(text.encode("utf-8")) * math.log(2))
