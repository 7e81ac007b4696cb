"""Image helpers shared by feature extraction, training batches and prediction.

Cells in a smear have no orientation, so the 8 symmetries of the square (flips and 90-degree
rotations) are label-preserving views; ``resize_batch`` brings cached uint8 images to a
backbone's input size. Pure NumPy and Pillow: no Keras.
"""

from __future__ import annotations

import numpy as np

N_VIEWS = 8


def dihedral(images: np.ndarray, view: int) -> np.ndarray:
    """One of the 8 symmetries of the square applied to images (N, H, W, C); same dtype.

    view 0 = identity; 1, 2, 3 = rotation by 90, 180, 270 degrees (counter-clockwise);
    4 = left-right mirror; 5, 6, 7 = mirror then rotation by 90, 180, 270 degrees.
    Views 1..7 are the 7 non-identity elements, in this fixed order. For non-square images,
    odd rotations swap H and W.
    """
    if not 0 <= int(view) < N_VIEWS:
        raise ValueError(f"view must be in 0..7, got {view}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    out = images[:, :, ::-1] if view >= 4 else images
    out = np.rot90(out, k=int(view) % 4, axes=(1, 2))
    return np.ascontiguousarray(out)


def resize_batch(images_uint8: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 RGB images (N, H, W, 3) to float32 (N, size, size, 3) in 0-255.

    Bilinear with antialiasing (Pillow), so downscaling averages rather than skips pixels; the
    same function serves feature extraction, fine-tuning batches and prediction. Images already
    at ``size`` are only cast.
    """
    from PIL import Image

    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images_uint8.shape}")
    if images_uint8.dtype != np.uint8:
        raise ValueError(f"images must be uint8 0-255, got {images_uint8.dtype}")
    n, height, width, _ = images_uint8.shape
    if (height, width) == (size, size):
        return images_uint8.astype(np.float32)
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        img = Image.fromarray(images_uint8[i])
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return out
