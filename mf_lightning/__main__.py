"""``python -m mf_lightning`` is the ``mf`` command."""

from mf_lightning.cli import main

main()
