"""Gathered vs sharded FSDP checkpoints: save and load time and peak host memory, on 2 CPU ranks (gloo).

Two gloo processes shard a MemoryFormer of the ``small`` preset (its width, heads, tables; ``--n_layer``
blocks, default 2 of its 12, so weights and Adam state fit a small shared machine) with FSDP2 exactly as
``FSDP2Strategy`` does, give AdamW its state (moments of every parameter), and then, in a fresh pair of
processes per kind:

- ``gathered``: ``FSDP2Strategy(save_distributed_checkpoint=False)``'s path: the full weights and optimizer
  state are all-gathered into rank 0's host memory and written as one file (``atomic_save``); the load
  memory-maps that file on every rank and copies each rank's shards from it;
- ``sharded``: the default: every rank writes its own shards into a checkpoint folder (``save_sharded``,
  staged and moved into place) and a load reads just its own shards (``load_sharded_model`` /
  ``load_sharded_optimizer``).

Peak host memory is each rank's resident set (``/proc/self/statm``, sampled every 2 ms) above what it
held just before the operation (its own shards); the node figure is the sum over both ranks. Times are
wall-clock from a barrier before to a barrier after. The markdown table is printed and written to
``benchmarks/results/sharded_checkpoint_cpu.md``.

    python benchmarks/sharded_checkpoint.py                 # small preset, 2 of its 12 blocks
    python benchmarks/sharded_checkpoint.py --n_layer 12    # the whole small preset (needs ~60 GiB of RAM)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import environment, write_result

WORLD_SIZE = 2
VOCAB_SIZE = 32768
GIB = 2**30
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set every ``interval`` seconds while active; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self.running = False
        self.thread = threading.Thread(target=self.sample, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * PAGE_SIZE

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self.running = True
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def measure(operation: Callable[[], None]) -> tuple[float, int]:
    """Seconds (barrier to barrier) and peak resident bytes above the start of ``operation`` on this rank."""
    dist.barrier()
    before = PeakRSS.rss()
    start = time.perf_counter()
    with PeakRSS() as peak:
        operation()
        dist.barrier()
    return time.perf_counter() - start, peak.peak - before


def build(n_layer: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The sharded network (as ``LanguageModel.configure_model`` builds it under FSDP2) and AdamW with state."""
    from torch.distributed.device_mesh import init_device_mesh

    from mf_lightning.config import ModelConfig
    from mf_lightning.lit.sharding import build_on_meta, materialize, shard_network
    from mf_lightning.models import build_model

    config = ModelConfig.from_preset("small", vocab_size=VOCAB_SIZE, n_layer=n_layer)
    torch.manual_seed(0)  # every rank replays the same initialisation and keeps its own shards
    rng_state = torch.get_rng_state()
    network, calls = build_on_meta(lambda: build_model(config))
    shard_network(network, init_device_mesh("cpu", (WORLD_SIZE,)), "32-true")
    materialize(network, calls, rng_state, torch.device("cpu"))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    for parameter in network.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return network, optimizer


def gathered(network: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: pathlib.Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from mf_lightning.lit.checkpoints import atomic_save, read_checkpoint

    path = folder / "gathered.ckpt"
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save() -> None:
        checkpoint = {
            "state_dict": get_model_state_dict(network, options=full),
            "optimizer_states": [get_optimizer_state_dict(network, optimizer, options=full)],
        }
        if dist.get_rank() == 0:
            atomic_save(checkpoint, path)

    def load() -> None:
        checkpoint = read_checkpoint(path, "cpu", mmap=True)
        set_model_state_dict(network, checkpoint["state_dict"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(
            network, optimizer, checkpoint["optimizer_states"][0], options=StateDictOptions(full_state_dict=True)
        )

    return timed(save, load, lambda: path.stat().st_size)


def sharded(network: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: pathlib.Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from mf_lightning.fs.atomic import partial_path
    from mf_lightning.fs.folders import install
    from mf_lightning.lit.distributed_checkpoint import (
        load_sharded_model,
        load_sharded_optimizer,
        read_metadata,
        save_sharded,
    )

    path = folder / "sharded.ckpt"

    def save() -> None:
        stage = [str(partial_path(path))]
        dist.broadcast_object_list(stage)
        checkpoint = {
            "state_dict": get_model_state_dict(network),
            "optimizer_states": [get_optimizer_state_dict(network, optimizer)],
        }
        save_sharded(checkpoint, pathlib.Path(stage[0]), dist.get_rank() == 0, dist.barrier)
        if dist.get_rank() == 0:
            install(pathlib.Path(stage[0]), path)

    def load() -> None:
        load_sharded_model(path, network)
        load_sharded_optimizer(path, network, optimizer, 0, read_metadata(path)["mf_optimizer_rest"][0])

    return timed(save, load, lambda: sum(file.stat().st_size for file in path.iterdir()))


def timed(save: Callable[[], None], load: Callable[[], None], size: Callable[[], int]) -> dict[str, Any]:
    save_seconds, save_bytes = measure(save)
    load_seconds, load_bytes = measure(load)
    return {
        "save_s": save_seconds,
        "save_rss": save_bytes,
        "load_s": load_seconds,
        "load_rss": load_bytes,
        "size": size(),
    }


def worker(rank: int, kind: str, n_layer: int, folder: str, init_file: str, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        network, optimizer = build(n_layer)
        state_bytes = (
            sum(p.to_local().numel() * p.element_size() for p in network.parameters()) * 3
        )  # weights + 2 moments
        outcome = {"gathered": gathered, "sharded": sharded}[kind](network, optimizer, pathlib.Path(folder))
        outcome["shard_bytes"] = state_bytes
        outcome["parameters"] = sum(p.numel() for p in network.parameters())
        results.put((rank, outcome))
    finally:
        dist.destroy_process_group()


def run_kind(kind: str, n_layer: int, folder: pathlib.Path) -> list[dict[str, Any]]:
    """Both ranks' figures for one kind of checkpoint, measured in a fresh pair of processes."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    init_file = folder / f"init-{kind}"
    mp.start_processes(
        worker, args=(kind, n_layer, str(folder), str(init_file), results), nprocs=WORLD_SIZE, start_method="spawn"
    )
    outcomes = dict(results.get() for _ in range(WORLD_SIZE))
    return [outcomes[rank] for rank in range(WORLD_SIZE)]


def table(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| checkpoint | files | size | save (s) | save: peak host memory above the shards, rank 0 / rank 1 / node "
        "| load (s) | load: peak host memory above the shards, rank 0 / rank 1 / node |",
        "|---|---|---|---|---|---|---|",
    ]
    files = {
        "gathered": "one `.ckpt` written by rank 0",
        "sharded": "a folder: one `.distcp` per rank + index + `meta.pt`",
    }
    for kind, ranks in rows.items():
        save = " / ".join(f"{rank['save_rss'] / GIB:.2f}" for rank in ranks)
        load = " / ".join(f"{rank['load_rss'] / GIB:.2f}" for rank in ranks)
        lines.append(
            f"| {kind} | {files[kind]} | {ranks[0]['size'] / GIB:.2f} GiB | {ranks[0]['save_s']:.1f} "
            f"| {save} / {sum(r['save_rss'] for r in ranks) / GIB:.2f} GiB | {ranks[0]['load_s']:.1f} "
            f"| {load} / {sum(r['load_rss'] for r in ranks) / GIB:.2f} GiB |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_layer", type=int, default=2, help="blocks of the small preset (default 2 of its 12)")
    parser.add_argument(
        "--folder", default=None, help="where the checkpoints are written (default: a temporary folder)"
    )
    parser.add_argument("--note", default="", help="a remark on the machine, printed under the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        rows = {kind: run_kind(kind, args.n_layer, pathlib.Path(folder)) for kind in ("gathered", "sharded")}
    first = rows["gathered"][0]
    state = sum(rank["shard_bytes"] for rank in rows["gathered"])
    lines = [
        "# Gathered vs sharded FSDP checkpoints (2 CPU ranks, gloo)",
        "",
        f"`python benchmarks/sharded_checkpoint.py --n_layer {args.n_layer}`; {environment()}.",
        "",
        f"Model: MemoryFormer `small` preset with {args.n_layer} of its 12 blocks, vocabulary {VOCAB_SIZE}: "
        f"{first['parameters'] / 1e6:,.1f} M parameters; checkpointed state (fp32 weights + AdamW's two moments) "
        f"{state / GIB:.2f} GiB, {state / WORLD_SIZE / GIB:.2f} GiB per rank. Peak host memory is the resident set "
        "above what the rank held before (its own shards), sampled every 2 ms.",
        "",
        *table(rows),
    ]
    if args.note:
        lines += ["", args.note]
    write_result("sharded_checkpoint_cpu.md", "\n".join(lines))


if __name__ == "__main__":
    main()
