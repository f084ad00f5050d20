"""``mf generate``: streamed text equals the decoded continuation, greedy is repeatable, bf16 stays close."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
import torch

from mf_lightning.cli import main as mf
from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import ByteTokenizer, save_tokenizer
from mf_lightning.kernels import fused_cpu
from mf_lightning.lit.generate_cli import TextStream
from mf_lightning.models import build_model, decode_step, load_pretrained

TEXT = "Le café crème coûte 3 €, the memory layer hashes tokens into buckets. " * 8
PROMPT = "Le café"


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A debug MemoryFormer trained for 150 steps on accented text, exported with the byte tokenizer."""
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    data = torch.tensor(tokenizer.encode(TEXT))
    model = build_model(ModelConfig.from_preset("debug", max_seq_len=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (8,))
        windows = torch.stack([data[start : start + 65] for start in starts])
        loss = model(windows[:, :-1], windows[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = model.save_pretrained(tmp_path_factory.mktemp("trained") / "model")
    save_tokenizer(tokenizer, directory)
    return directory


def generate(capsys, *args: str) -> tuple[str, str]:
    mf(["generate", *args])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_streamed_text_equals_the_decoded_continuation(trained_dir, capsys) -> None:
    out, err = generate(
        capsys,
        "--model_dir",
        str(trained_dir),
        "--max_new_tokens",
        "40",
        "--temperature",
        "1.0",
        "--top_k",
        "200",
        "--seed",
        "3",
        PROMPT,
    )
    model, tokenizer = load_pretrained(trained_dir).eval(), ByteTokenizer()
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    generator = torch.Generator().manual_seed(3)
    tokens = model.generate(prompt, 40, temperature=1.0, top_k=200, eos_id=tokenizer.eos_id, generator=generator)
    assert out == tokenizer.decode(tokens[0, prompt.shape[1] :].tolist())
    assert "tokens/s" in err


def test_greedy_is_repeatable_and_reads_the_prompt_from_stdin(trained_dir, capsys, monkeypatch) -> None:
    args = ["--model_dir", str(trained_dir), "--max_new_tokens", "30", "--temperature", "0"]
    first, _ = generate(capsys, *args, PROMPT)
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    second, _ = generate(capsys, *args)
    assert first == second
    assert first.startswith(" crème"), "the trained model should continue its training text"


def test_bfloat16_weights_stay_close_to_float32(trained_dir, capsys) -> None:
    full = load_pretrained(trained_dir).eval()
    half = load_pretrained(trained_dir, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    window = torch.tensor([ByteTokenizer().encode(TEXT[:100])])
    with torch.no_grad():
        (expected, _), (_, loss) = full(window[:, :-1]), full(window[:, :-1], window[:, 1:])
        (logits, _), (_, half_loss) = half(window[:, :-1]), half(window[:, :-1], window[:, 1:])
    assert (logits.float().argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    assert abs(half_loss.item() - loss.item()) < 0.05 * loss.item()
    args = ["--model_dir", str(trained_dir), "--max_new_tokens", "12", "--temperature", "0", PROMPT]
    assert generate(capsys, *args, "--dtype", "bfloat16")[0] == generate(capsys, *args)[0]


def test_compile_decodes_the_same_text_through_the_compiled_step(trained_dir, capsys, monkeypatch) -> None:
    calls = []
    compiled = decode_step.compiled_decode_step
    monkeypatch.setattr(decode_step, "compiled_decode_step", lambda *args: calls.append(1) or compiled(*args))
    args = ["--model_dir", str(trained_dir), "--max_new_tokens", "20", "--temperature", "0", PROMPT]
    text = generate(capsys, *args)[0]
    assert not calls, "a one-off run decodes eagerly by default: compiling would take longer than decoding"
    assert generate(capsys, *args, "--compile")[0] == text
    assert len(calls) == 19, "every step after the prompt is one call of the compiled step"


def test_a_character_split_across_tokens_is_printed_whole() -> None:
    text = TextStream(ByteTokenizer())
    first, second = "é".encode()
    assert text.push(ord("a")) == "a"
    assert text.push(first) == ""
    assert text.push(second) == "é"
    assert text.push(first) == ""
    assert text.finish() == "\ufffd"


def test_bad_requests_are_one_clear_error(trained_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mf(["generate", "--model_dir", str(trained_dir), "--device", "nowhere", "hi"])
    assert exit_info.value.code == 2
    assert "'nowhere' is not a torch device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mf(["generate", "--model_dir", str(trained_dir), "--max_new_tokens", "500", "hi"])
    assert "exceeds max_seq_len=128" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (None, "no prompt: standard input is closed"),
        ("closed", "no prompt: standard input is closed"),
        (b"caf\xe9 au lait", r"standard input is not UTF-8 text: byte 0xe9 at offset 3 \(invalid continuation byte\)"),
    ],
    ids=["none", "closed", "latin-1"],
)
def test_unreadable_standard_input_is_one_clear_error(trained_dir, capsys, monkeypatch, stdin, message) -> None:
    if stdin == "closed":
        stdin = io.StringIO("unused")
        stdin.close()
    elif isinstance(stdin, bytes):
        stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    with pytest.raises(SystemExit) as exit_info:
        mf(["generate", "--model_dir", str(trained_dir), "--max_new_tokens", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.match(f"mf: error: {message}", err), err
    assert len(err.splitlines()) == 2  # the error and the hint about the traceback


def test_utf8_standard_input_is_read_as_bytes_whatever_the_locale(trained_dir, capsys, monkeypatch) -> None:
    args = ["--model_dir", str(trained_dir), "--max_new_tokens", "20", "--temperature", "0"]
    expected, _ = generate(capsys, *args, PROMPT)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(PROMPT.encode()), encoding="ascii"))
    assert generate(capsys, *args)[0] == expected


def test_building_the_cpu_decoding_operator_is_not_in_the_speed(trained_dir, capsys, monkeypatch) -> None:
    def slow_build(**kwargs):
        time.sleep(3)  # a first run's build; decoding 5 tokens of the debug model takes milliseconds

    monkeypatch.setattr("torch.utils.cpp_extension.load", slow_build)
    fused_cpu.load_fused_cpu.cache_clear()
    try:
        _, err = generate(capsys, "--model_dir", str(trained_dir), "--max_new_tokens", "5", "--temperature", "0", "a")
    finally:
        monkeypatch.undo()
        fused_cpu.load_fused_cpu.cache_clear()
    seconds = float(re.search(r"tokens in ([\d.]+) s", err)[1])
    assert seconds < 3, err
