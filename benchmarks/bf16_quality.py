"""What bfloat16 inference weights cost in quality: float32 against bfloat16 logits of trained models.

    python benchmarks/bf16_quality.py [--steps 150] [--seed 0]

Trains a ``debug`` MemoryFormer and Transformer (byte tokenizer) for ``--steps`` steps on this
package's own source code, saves each with ``save_pretrained``, loads it back with
``load_pretrained(dtype=torch.bfloat16)`` and compares both on held-out windows: validation loss,
largest and mean absolute logit difference, and how often the next-token argmax agrees. Prints
markdown and writes it to ``benchmarks/results/bf16_quality.md``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from harness import environment, markdown_table, write_result

from mf_lightning.config import ModelConfig
from mf_lightning.data.tokenizers import ByteTokenizer
from mf_lightning.models import DecoderLM, build_model, load_pretrained

HEADER = ("arch", "val loss fp32", "val loss bf16", "max abs logit diff", "mean abs logit diff", "argmax agreement")
PACKAGE = Path(__file__).resolve().parents[1] / "mf_lightning"
WINDOW, BATCH = 64, 16
LEARNING_RATES = {"memoryformer": 3e-3, "transformer": 1e-3}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of the package's source, split 90/10 into training and validation."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py")))
    data = torch.tensor(ByteTokenizer().encode(text))
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def windows(data: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return torch.stack([data[start : start + WINDOW + 1] for start in starts.tolist()])


def train(arch: str, data: torch.Tensor, steps: int) -> DecoderLM:
    model = build_model(ModelConfig.from_preset("debug", arch=arch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATES[arch])
    for _ in range(steps):
        batch = windows(data, torch.randint(0, len(data) - WINDOW - 1, (BATCH,)))
        loss = model(batch[:, :-1], batch[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def compare(full: DecoderLM, half: DecoderLM, validation: torch.Tensor) -> list[float]:
    """Validation loss in float32 and bfloat16, max and mean |logit difference|, argmax agreement."""
    batch = windows(validation, torch.arange(0, len(validation) - WINDOW - 1, WINDOW)[:64])
    expected, loss = full(batch[:, :-1], batch[:, 1:])
    logits, half_loss = half(batch[:, :-1], batch[:, 1:])
    difference = (logits.float() - expected).abs()
    agreement = (logits.float().argmax(-1) == expected.argmax(-1)).float().mean()
    return [loss.item(), half_loss.item(), difference.max().item(), difference.mean().item(), agreement.item()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per model (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    training, validation = corpus()
    rows = []
    for arch in LEARNING_RATES:
        model = train(arch, training, args.steps)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            half = load_pretrained(folder, dtype=torch.bfloat16).eval()
        loss, half_loss, largest, mean, agreement = compare(model, half, validation)
        rows.append(
            [arch, f"{loss:.4f}", f"{half_loss:.4f}", f"{largest:.3f}", f"{mean:.4f}", f"{100 * agreement:.1f}%"]
        )
    report = "\n".join(
        [
            f"# bfloat16 against float32 weights, debug preset trained {args.steps} steps (seed {args.seed})",
            "",
            f"{environment()}; command: `python benchmarks/bf16_quality.py --steps {args.steps} --seed {args.seed}`",
            "",
            *markdown_table(HEADER, rows),
            "",
        ]
    )
    write_result("bf16_quality.md", report)


if __name__ == "__main__":
    main()
