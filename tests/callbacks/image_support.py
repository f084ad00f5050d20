"""Helpers for tests that look at the pictures the monitors draw."""

from io import BytesIO

import numpy as np
from PIL import Image


def decode(png: bytes) -> np.ndarray:
    """An encoded image (a TensorBoard image summary's bytes) as RGB uint8 ``[height, width, 3]``."""
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"))


def find_block(image: np.ndarray, block: np.ndarray) -> tuple[int, int] | None:
    """Top-left (y, x) where ``block`` appears in ``image`` pixel for pixel, or None."""
    first_row = block[0].tobytes()
    for y in range(image.shape[0] - block.shape[0] + 1):
        row = image[y].tobytes()
        start = row.find(first_row)
        while start != -1:
            x = start // 3
            if start % 3 == 0 and np.array_equal(image[y : y + block.shape[0], x : x + block.shape[1]], block):
                return y, x
            start = row.find(first_row, start + 1)
    return None
