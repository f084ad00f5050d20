"""What TensorBoard shows first for a run folder: the loss, then the learning rate; every other group folded.

TensorBoard's Time Series tab (the tab it opens on) sorts every tag with its ``compareTagNames``, groups the
cards by the tag's first path part in that order and expands only the first two groups (read in the
``index.js`` TensorBoard 2.21 bundles; ``docs/tensorboard_time_series.png`` is that screen photographed).
``tensorboard_order`` is that comparison, so the test sees the screen a user gets for every run below the
folder: the training, ``mf validate``, ``mf test`` and ``mf eval`` (whose tags ``task_tag`` names).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from cli_support import run, tiny_run_args, write_corpus
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from mf_lightning.eval.report import task_tag
from mf_lightning.lit.module import LOSS, TEST, TRAIN, VAL, metric_tag
from mf_lightning.lit.run_logger import EPOCH


def number_end(text: str, start: int) -> int:
    """Where the number starting at ``text[start]`` ends (digits, then a fraction and an exponent)."""
    position, state = start, "natural"
    while position < len(text):
        char = text[position]
        if state in ("natural", "real") and char in "eE":
            state = "exponent_sign"
        elif state == "natural" and char == ".":
            state = "real"
        elif state == "exponent_sign" and (char.isdigit() or char in "+-"):
            state = "exponent"
        elif not char.isdigit():
            break
        position += 1
    return position


def compare_tag_names(a: str, b: str) -> int:
    """TensorBoard's ``compareTagNames``: numbers by value, ``/`` and digits before other characters, else code."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            end_a, end_b = number_end(a, i + 1), number_end(b, j + 1)
            x, y = float(a[i:end_a]), float(b[j:end_b])
            if x != y:
                return -1 if x < y else 1
            i, j = end_a, end_b
            continue
        breaks_a, breaks_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if breaks_a != breaks_b:
            return -1 if breaks_a else 1
        if a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def tensorboard_order(tags: set[str]) -> list[tuple[str, list[str]]]:
    """The Time Series tab's groups in screen order: (group, its cards' tags in order)."""
    groups: dict[str, list[str]] = {}
    for tag in sorted(tags, key=functools.cmp_to_key(compare_tag_names)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return list(groups.items())


def every_tag(log_root: Path) -> set[str]:
    """The tags of every plugin the Time Series tab shows (scalars, histograms, images), of every run below."""
    runs = EventMultiplexer().AddRunsFromDirectory(str(log_root))
    runs.Reload()
    return {
        tag for tags in runs.Runs().values() for plugin in ("scalars", "histograms", "images") for tag in tags[plugin]
    }


def test_the_comparison_is_tensorboards() -> None:
    assert compare_tag_names("loss/train", "loss/val") < 0
    assert compare_tag_names("layer10", "layer9") > 0  # numbers by value
    assert compare_tag_names("a/b", "a_b") < 0  # "/" before every other character
    assert compare_tag_names("Zeta", "alpha") < 0  # character codes: upper case first
    assert compare_tag_names("loss", "loss/val") < 0


@pytest.mark.slow
def test_a_run_folder_opens_on_the_loss_then_the_learning_rate(tmp_path) -> None:
    root = tmp_path / "run"
    args = tiny_run_args(root, write_corpus(tmp_path / "corpus"))
    run("fit", args)
    for subcommand in ("validate", "test"):
        run(subcommand, [*args, "--ckpt_path", "last"])
    tags = every_tag(root) | {task_tag("piqa", "acc"), task_tag("average", "acc")}

    groups = tensorboard_order(tags)
    (first, first_cards), (second, second_cards) = groups[:2]
    assert first_cards == [metric_tag(split, LOSS) for split in (TEST, TRAIN, VAL)]
    assert first == LOSS
    assert second.startswith("lr-") and len(second_cards) == 3  # one per parameter group of AdamW
    assert EPOCH not in tags
    assert {group for group, _ in groups[2:]} >= {"memory_usage", "memory_heatmap", "tasks", "train", "val"}
