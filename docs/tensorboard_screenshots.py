"""Screenshots of TensorBoard showing a quickstart run, for the docs: its first screen, the Overview and the usage pictures.

Trains ``configs/quickstart.yaml`` into ``--run-dir`` (unless ``--reuse`` points at a finished run),
serves it with ``tensorboard`` and photographs two pages with headless Chromium
(``apt-get install chromium``):

- ``docs/tensorboard_time_series.png``: the page ``http://localhost:6006`` opens on (Time Series), as a new
  browser profile sees it: the loss first, then the learning rate (its charts drawn as SVG, TensorBoard's
  ``forceSVG`` flag, as headless Chromium draws no WebGL);
- ``docs/tensorboard_overview.png``: the Custom Scalars tab, whose Overview opens first;
- ``docs/tensorboard_bucket_usage.png``: the Images tab filtered to the Q/K/V layers (their heatmaps and
  rank-frequency plot).

Then it shrinks both to at most 256 colours so each stays well under 300 KB::

    python docs/tensorboard_screenshots.py                  # the full quickstart (1000 steps)
    python docs/tensorboard_screenshots.py --steps 200      # a shorter run with denser logging
    python docs/tensorboard_screenshots.py --reuse runs/quickstart
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAGES = {
    "tensorboard_time_series.png": ("?forceSVG=true", (1400, 900)),
    "tensorboard_overview.png": ("#custom_scalars", (1400, 1000)),
    "tensorboard_bucket_usage.png": ("#images&tagFilter=qkv", (1540, 700)),
}
"""File name -> (TensorBoard page, browser window size)."""


def train(run_dir: Path, steps: int | None) -> None:
    """``mf fit`` of the quickstart config into ``run_dir``; a shorter run logs usage every 10 steps, pictures every 50."""
    command = [sys.executable, "-m", "mf_lightning", "fit", "--config", str(REPO / "configs" / "quickstart.yaml")]
    command += ["--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false"]
    if steps is not None:
        command += ["--trainer.max_steps", str(steps), "--validation.every_n_steps", str(max(1, steps // 4))]
        command += ["--trainer.limit_val_batches", "5", "--bucket_usage.log_every_n_steps", "10"]
        command += ["--bucket_usage.image_every_n_steps", "50", "--gradient_coverage.log_every_n_steps", "10"]
    subprocess.run(command, check=True, cwd=REPO)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def serve(log_dir: Path, port: int) -> subprocess.Popen:
    """``tensorboard --logdir log_dir`` on ``port``, once it answers."""
    server = subprocess.Popen(
        [shutil.which("tensorboard") or "tensorboard", "--logdir", str(log_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://localhost:{port}/data/plugins_listing", timeout=5)
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit(f"tensorboard did not answer on port {port} within 120 s")


def photograph(browser: str, url: str, size: tuple[int, int], path: Path) -> None:
    """A headless Chromium screenshot of ``url`` after its charts loaded, reduced to 256 colours.

    Each page gets a new, empty browser profile: nothing a previous visit pinned or folded is remembered.
    """
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=20000",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
        )
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path.relative_to(REPO)}: {path.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart_screenshots")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of the config's")
    parser.add_argument("--reuse", type=Path, default=None, help="photograph this finished run instead of training")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: install it (apt-get install chromium) to take the screenshots")
    run_dir = args.reuse or args.run_dir
    if args.reuse is None:
        train(run_dir, args.steps)
    port = free_port()
    server = serve(run_dir, port)
    try:
        for name, (page, size) in PAGES.items():
            photograph(browser, f"http://localhost:{port}/{page}", size, args.out / name)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
