"""Rendered images on disk and in logs: PNG files that carry their prompt, and grids for TensorBoard."""
import os

import numpy as np
from PIL import Image, PngImagePlugin


def save_png(path: str, image: np.ndarray, metadata: dict[str, object]) -> str:
    """image [H, W, 3] uint8 -> a PNG at `path` whose text chunks hold `metadata` (e.g. prompt, seed, model), as
    most image tools show them (`Image.open(path).text`). Returns path."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt survives
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(f"{path}.tmp", format="PNG", pnginfo=info)
    os.replace(f"{path}.tmp", path)  # a kill leaves no half image (resumed runs trust what they find)
    return path


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """[N, H, W, 3] -> one [rows * H, columns * W, 3] image, row-major, blank (black) cells at the end."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - n, h, w, c), images.dtype)])
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)
