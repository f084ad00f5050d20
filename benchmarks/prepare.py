"""Corpus preparation throughput against the tokenizer's own limit, peak memory, and BPE sample training time.

For each ``--mib`` size, makes a JSONL corpus of real text (the running Python's standard library source cut
into documents of about 3 KB, shuffled and repeated up to the size, one file), trains a ``--vocab`` BPE on a
``--sample-mib`` sample (``data.bpe_sample_bytes``), then measures on the same text:

- the limit: ``tokenizers.Tokenizer.encode_batch`` over every document, held in memory, in batches of
  ``ENCODE_BATCH_DOCUMENTS``, with the library's own threads on every core; and the same with
  ``encode_batch_fast`` (the same ids without character offsets), which our preparation calls;
- our preparation (``prepare_token_cache``: read, encode, write the part files, merge into the cache)
  with 1 worker (in process) and with every core's worker, each in a fresh process so that its peak
  memory (``ru_maxrss`` of the parent and of its largest worker) is its own;
- with ``--litdata``, LitData's ``optimize`` (what litgpt prepares pretraining corpora with) on the same
  parts of the file and the same tokenizer calls, writing its ``TokensLoader`` chunks, with every core's
  worker (install it with ``pip install litdata``; it is not a dependency of this package).

Prints a markdown table and writes it to ``benchmarks/results/prepare_cpu.md``.

    python benchmarks/prepare.py [--mib 64 256] [--vocab 32768] [--sample-mib 32] [--litdata]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cpu_description, write_result

DOCUMENT_CHARS = 3000
ENCODE_BATCH_DOCUMENTS = 256


def real_documents() -> list[str]:
    """The standard library's ``.py`` files cut into documents of about ``DOCUMENT_CHARS`` characters."""
    documents = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        documents += [text[start : start + DOCUMENT_CHARS] for start in range(0, len(text), DOCUMENT_CHARS)]
    return [document for document in documents if document.strip()]


def write_corpus(path: Path, mib: int) -> int:
    """A JSONL file of ``mib`` MiB of shuffled real documents; returns the number of documents."""
    pool, rng, size, count = real_documents(), random.Random(0), 0, 0
    with path.open("w", encoding="utf-8") as file:
        while size < mib << 20:
            rng.shuffle(pool)
            for document in pool:
                line = json.dumps({"text": document}) + "\n"
                file.write(line)
                size += len(line.encode("utf-8"))
                count += 1
                if size >= mib << 20:
                    break
    return count


def encode_limit(corpus: Path, tokenizer_file: Path) -> dict[str, float]:
    """Seconds of ``encode_batch`` and ``encode_batch_fast`` over every document of ``corpus`` (read beforehand),
    and its characters."""
    from tokenizers import Tokenizer

    model = Tokenizer.from_file(str(tokenizer_file))
    with corpus.open(encoding="utf-8") as lines:
        documents = [json.loads(line)["text"] for line in lines]
    limits = {"characters": sum(len(document) for document in documents)}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(model, name)
        started = time.perf_counter()
        for start in range(0, len(documents), ENCODE_BATCH_DOCUMENTS):
            encode(documents[start : start + ENCODE_BATCH_DOCUMENTS], add_special_tokens=False)
        limits[name] = time.perf_counter() - started
    return limits


class TreeMemory:
    """The largest resident memory (VmRSS) of this process and all its descendants together, sampled every 0.1 s
    from ``/proc`` (``ru_maxrss`` would not do: across ``exec`` it keeps the peak of the process that started us)."""

    def __init__(self) -> None:
        import threading

        self.peak_kib = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stop.wait(0.1):
            self.peak_kib = max(self.peak_kib, sum(rss_kib(pid) for pid in descendants(os.getpid())))

    def finish(self) -> float:
        """Stops sampling; returns the peak in MiB."""
        self.stop.set()
        self.thread.join()
        return self.peak_kib / 1024


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def rss_kib(pid: int) -> int:
    """The resident memory of ``pid`` in KiB (0 if it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)


def run_one(corpus: str, tokenizer_file: str, workers: int, cache_root: str) -> None:
    """In a fresh process: prepare the cache, print seconds and peak memory as JSON."""
    from mf_lightning.data.cache import prepare_token_cache
    from mf_lightning.data.sources import open_source
    from mf_lightning.data.tokenizers import HFTokenizer

    tokenizer = HFTokenizer.from_path(tokenizer_file)
    memory = TreeMemory()
    started = time.perf_counter()
    cache = prepare_token_cache(open_source(corpus), tokenizer, cache_root, 0.05, 0.05, workers=workers)
    seconds = time.perf_counter() - started
    tokens = sum(cache.num_tokens(split) for split in ("train", "val", "test"))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tokens": tokens,
                "tree_mib": memory.finish(),
                "parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def tokenize_part_for_litdata(job: tuple[str, str, int, int]) -> Any:
    """LitData's ``fn``: the token ids (EOS after each document) of the JSONL lines starting in ``[start, end)``."""
    import numpy as np
    import torch

    from mf_lightning.data.sources import open_source
    from mf_lightning.data.tokenizers import HFTokenizer

    corpus, tokenizer_file, index, part_bytes = job
    tokenizer = HFTokenizer.from_path(tokenizer_file)
    source = open_source(corpus)
    documents = list(source.part_documents(source.parts(part_bytes)[index]))
    for start in range(0, len(documents), ENCODE_BATCH_DOCUMENTS):
        flat: list[int] = []
        for ids in tokenizer.encode_batch(documents[start : start + ENCODE_BATCH_DOCUMENTS]):
            flat += [*ids, tokenizer.eos_id]
        yield torch.from_numpy(np.asarray(flat, dtype=np.int32))


def run_litdata(corpus: str, tokenizer_file: str, workers: int, output: str) -> None:
    """In a fresh process: LitData's ``optimize`` over our parts of ``corpus``; prints seconds and peak memory."""
    from litdata import TokensLoader, optimize

    from mf_lightning.data.cache import PART_BYTES
    from mf_lightning.data.sources import open_source

    jobs = [(corpus, tokenizer_file, part.index, PART_BYTES) for part in open_source(corpus).parts(PART_BYTES)]
    started = time.perf_counter()
    optimize(
        fn=tokenize_part_for_litdata,
        inputs=jobs,
        output_dir=output,
        chunk_bytes="64MB",
        item_loader=TokensLoader(),
        num_workers=workers,
    )
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def prepare_in_subprocess(
    corpus: Path, tokenizer_file: Path, workers: int, cache_root: Path, mode: str = "--run-one"
) -> dict[str, float]:
    """``run_one`` (or ``run_litdata`` with ``mode="--run-litdata"``) in a fresh process."""
    command = [sys.executable, __file__, mode, str(corpus), str(tokenizer_file), str(workers), str(cache_root)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def train_sample_bpe(corpus: Path, vocab: int, sample_mib: int, folder: Path) -> tuple[Path, float]:
    """Trains the BPE on the corpus's sample as ``mf`` does; returns its ``tokenizer.json`` and the seconds taken."""
    from mf_lightning.data.sources import open_source
    from mf_lightning.data.tokenizers import load_bpe

    started = time.perf_counter()
    load_bpe(vocab, open_source(str(corpus)), folder, sample_bytes=sample_mib << 20)
    seconds = time.perf_counter() - started
    (tokenizer_file,) = (folder / "tokenizers").glob("bpe-*/tokenizer.json")
    return tokenizer_file, seconds


def corpus_and_bpe(root: Path, mib: int, args: argparse.Namespace) -> tuple[Path, int, Path, float]:
    """A ``mib`` MiB JSONL corpus under ``root``, its document count, and a BPE trained on its sample (and seconds)."""
    corpus = root / "corpus.jsonl"
    documents = write_corpus(corpus, mib)
    tokenizer_file, seconds = train_sample_bpe(corpus, args.vocab, args.sample_mib, root / "bpe")
    return corpus, documents, tokenizer_file, seconds


def measure_memory(args: argparse.Namespace) -> None:
    """Peak memory of the whole preparation (process and workers together) for each corpus size."""
    rows = []
    for mib in args.mib:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            corpus, documents, tokenizer_file, _ = corpus_and_bpe(root, mib, args)
            many = prepare_in_subprocess(corpus, tokenizer_file, args.workers, root / "many")
        rows.append(f"| {mib} MiB, {documents} docs | {many['seconds']:.0f} | {many['tree_mib']:.0f} |")
        print(rows[-1], flush=True)
    table = [
        f"# Corpus preparation: peak memory ({cpu_description()}, bpe:{args.vocab}, {args.workers} workers)",
        "",
        f"`python benchmarks/prepare.py --memory-only --mib {' '.join(map(str, args.mib))} --vocab {args.vocab} "
        f"--sample-mib {args.sample_mib} --workers {args.workers}`; the largest sum of resident memory (VmRSS) of "
        "the preparing process and all its workers, sampled every 0.1 s. The machine was shared with other "
        f"processes (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| corpus | seconds | peak MiB, process + workers |",
        "|---|---:|---:|",
        *rows,
    ]
    text = "\n".join(table) + "\n"
    write_result("prepare_memory_cpu.md", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--sample-mib", type=int, default=32)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--litdata", action="store_true", help="also measure LitData's optimize (needs litdata)")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only our preparation with every worker: peak memory of the whole process tree (prepare_memory_cpu.md)",
    )
    args = parser.parse_args()
    if args.memory_only:
        measure_memory(args)
        return
    rows = []
    for mib in args.mib:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            corpus, documents, tokenizer_file, bpe_seconds = corpus_and_bpe(root, mib, args)
            limit = encode_limit(corpus, tokenizer_file)
            one = prepare_in_subprocess(corpus, tokenizer_file, 1, root / "one")
            many = prepare_in_subprocess(corpus, tokenizer_file, args.workers, root / "many")
            litdata = None
            if args.litdata:
                litdata = prepare_in_subprocess(corpus, tokenizer_file, args.workers, root / "litdata", "--run-litdata")
        rate = lambda seconds: limit["characters"] / seconds / 1e6  # noqa: B023, E731
        share = lambda seconds: f"{rate(seconds):.2f} ({100 * limit['encode_batch'] / seconds:.0f} %)"  # noqa: B023, E731
        rows.append(
            f"| {mib} MiB, {documents} docs | {bpe_seconds:.0f} | {rate(limit['encode_batch']):.2f} | "
            f"{share(limit['encode_batch_fast'])} | {share(one['seconds'])} | {share(many['seconds'])} | "
            f"{one['parent_mib']:.0f} | {many['parent_mib']:.0f} + {args.workers} x {many['worker_mib']:.0f} |"
            + (
                f" {share(litdata['seconds'])} | {litdata['parent_mib']:.0f} + {args.workers} x {litdata['worker_mib']:.0f} |"
                if litdata
                else ""
            )
        )
        print(rows[-1], flush=True)
    table = [
        f"# Corpus preparation ({cpu_description()}, bpe:{args.vocab} trained on a {args.sample_mib} MiB sample)",
        "",
        f"`python benchmarks/prepare.py --mib {' '.join(map(str, args.mib))} --vocab {args.vocab} "
        f"--sample-mib {args.sample_mib} --workers {args.workers}`; one JSONL file of the Python standard library's "
        "source in ~3 KB documents; speeds in M characters/s (percent of the encode_batch limit); peak memory is "
        f"ru_maxrss (MiB) of the preparing process and of its largest worker. The machine was shared with other "
        f"processes (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| corpus | BPE sample training (s) | encode_batch (limit) | encode_batch_fast | ours, 1 worker | ours, "
        f"{args.workers} workers | peak MiB, 1 worker | peak MiB, {args.workers} workers |"
        + (f" LitData optimize, {args.workers} workers | its peak MiB |" if args.litdata else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.litdata else ""),
        *rows,
    ]
    text = "\n".join(table) + "\n"
    write_result("prepare_cpu.md", text)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--run-one":
        run_one(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) == 6 and sys.argv[1] == "--run-litdata":
        run_litdata(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
