"""``mf generate``: continue a prompt with a trained model, printing the text as it is generated.

    mf generate --config runs/x/tensorboard/config.yaml --ckpt_path last "Once upon a time"
    echo "Once upon a time" | mf generate --model_dir exported/ --dtype bfloat16 --temperature 0

The model comes from a run (``--config`` + ``--ckpt_path last|FILE``) or a folder written by
``mf export`` (``--model_dir``), loaded by :func:`mf_lightning.lit.loading.load_for_inference`. The
prompt is the positional argument, or standard input (UTF-8) when it is absent. The continuation (not the
prompt) goes to standard output token by token; a token that ends inside a multi-byte character is
held back until the character is complete, so the streamed text is exactly the decoded continuation.
Generation stops after ``--max_new_tokens`` tokens or at the tokenizer's end-of-text token. The speed
(tokens/s, prompt processing included; building the CPU decoding operator, on a machine's first run, not) is printed to standard error at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import torch
from jsonargparse import Namespace

from mf_lightning.config_errors import OneLineArgumentParser
from mf_lightning.data.tokenizers import Tokenizer
from mf_lightning.kernels.fused_cpu import fused_cpu_available
from mf_lightning.lit.loading import load_for_inference
from mf_lightning.lit.run_folders import run_folders
from mf_lightning.models.base import DecoderLM
from mf_lightning.models.generation import stream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPLACEMENT = "\ufffd"
"""What decoding puts in place of bytes that do not (yet) form a character."""


class TextStream:
    """Turns generated token ids into text pieces whose concatenation is the decoded whole.

    Each :meth:`push` decodes all ids so far and returns the text not returned before, except while
    the text ends in an incomplete character (a byte-level token can stop in the middle of one); the
    decoded whole is only a prefix of the final text where it ends in a complete character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        """Add one token; the new text that is now final."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith(REPLACEMENT) else self.take(text)

    def finish(self) -> str:
        """The text not returned yet (including an incomplete character at the very end)."""
        return self.take(self.tokenizer.decode(self.ids))

    def take(self, text: str) -> str:
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def generate_text(
    model: DecoderLM,
    tokenizer: Tokenizer,
    prompt: str,
    out: TextIO,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    compile: bool = False,
) -> int:
    """Write the continuation of ``prompt`` to ``out`` as it is generated; return the number of tokens made.

    An empty prompt starts a new document (from the end-of-text token). The end-of-text token ends
    generation and decodes to nothing. ``compile`` decodes through the compiled step (see
    :mod:`mf_lightning.models.decode_step`); one run in a fresh process pays its compile time.
    """
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    text = TextStream(tokenizer)
    count = 0
    steps = stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id, generator=generator, compile=compile
    )
    for token in steps:
        count += 1
        out.write(text.push(int(token)))
        out.flush()
    out.write(text.finish())
    out.flush()
    return count


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="mf generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("prompt", nargs="?", default=None, help="text to continue (default: read standard input)")
    parser.add_argument("--config", default=None, help="a run's config.yaml (with --ckpt_path)")
    parser.add_argument("--ckpt_path", default=None, help="'last' or a .ckpt file of the run")
    parser.add_argument("--model_dir", default=None, help="a folder written by mf export (instead of a run)")
    parser.add_argument("--max_new_tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (default 50)")
    parser.add_argument("--top_p", type=float, default=None, help="sample from the smallest set of this probability")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling, for repeatable output")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights' dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode through the compiled fixed-shape step: faster per token, but compiling costs seconds at the "
        "start of every process, more than a short run of a small model decodes in (default: eager)",
    )
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    return args


def read_stdin_prompt(stdin: TextIO | None) -> str:
    """The prompt piped to standard input ``stdin``, decoded as UTF-8.

    Raises one ``ValueError`` naming standard input when there is none to read (closed, or a terminal
    nobody piped into) or its bytes are not UTF-8 (with the offset of the first bad byte), so the model
    never continues a prompt mangled by a wrong decoding.
    """
    if stdin is None or stdin.closed:
        raise ValueError("no prompt: standard input is closed; give the prompt as an argument or pipe it in")
    if stdin.isatty():
        raise ValueError("no prompt: give it as an argument, or pipe it to standard input")
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"standard input is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} ({error.reason}); "
            "convert the prompt to UTF-8 (e.g. iconv -t UTF-8) or give it as an argument"
        ) from None


def main(argv: Sequence[str], read_config: Callable[[Sequence[str]], Namespace]) -> None:
    """``mf generate``: load the model (a run's config read with ``read_config``, ``mf fit``'s parser), stream the
    continuation to stdout and the speed to stderr."""
    args = parse_args(argv)
    prompt = read_stdin_prompt(sys.stdin) if args.prompt is None else args.prompt
    run = None if args.config is None else run_folders(read_config([args.config]), args.config)
    model, tokenizer = load_for_inference(run, args.ckpt_path, args.model_dir, args.device, DTYPES[args.dtype])
    generator = None if args.seed is None else torch.Generator(args.device).manual_seed(args.seed)
    if next(model.parameters()).device.type == "cpu":
        fused_cpu_available()  # builds the decoding operator on a machine's first run: not part of the speed
    start = time.perf_counter()
    count = generate_text(
        model,
        tokenizer,
        prompt,
        sys.stdout,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        generator,
        args.compile,
    )
    seconds = time.perf_counter() - start
    print(f"\n{count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s", file=sys.stderr)
