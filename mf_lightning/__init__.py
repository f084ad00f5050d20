"""mf_lightning: train, inspect and run MemoryFormer language models.

Importing the package is cheap: it never imports triton or Lightning. Import the pieces you need,
e.g. ``from mf_lightning.nn import MemoryLayer``.
"""

__version__ = "0.2.0"
