"""Image helpers shared by ingestion, feature extraction, training batches and prediction.

``decode_rgb`` turns an image file's bytes into 8-bit RGB (with the pixel-limit guard against
decompression bombs) and ``ingest_resize`` brings it to the cache's common size: ingestion and
``allfuse predict`` both call them, so a deployed model sees exactly the pixels training saw.
Cells in a smear have no orientation, so the 8 symmetries of the square (flips and 90-degree
rotations) are label-preserving views; ``resize_batch`` brings cached uint8 images to a
backbone's input size. Pure NumPy and Pillow: no Keras.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from allfuse.errors import DataError

if TYPE_CHECKING:  # PIL is imported where images are decoded, keeping this module cheap to import
    from PIL.Image import Image as PILImage

N_VIEWS = 8

#: 8-bit pixel formats that convert to RGB without losing or inventing information.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


class ImageError(DataError):
    """One image file is unusable (corrupt, truncated, over the pixel limit, not 8-bit, not an
    image); the message names the file and what to do."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make PIL's own decompression-bomb guard fire at ``max_pixels`` and raise, not warn.

    PIL warns above ``MAX_IMAGE_PIXELS`` and raises above twice that, at open time, from the
    header; ``decode_rgb`` turns both into an ImageError.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_rgb(name: str, data: bytes, max_pixels: int, formats: tuple[str, ...] = ("JPEG", "TIFF")) -> PILImage:
    """The image file ``data`` (called ``name`` in messages) decoded and converted to 8-bit RGB.

    Raises ImageError when it is over ``max_pixels`` (checked from the header, before decoding),
    not 8-bit, not one of ``formats`` (PIL format names), or corrupt or truncated. The decoded
    image's own format is ``.format`` of the result's ``info["source_format"]``.
    """
    from PIL import Image, UnidentifiedImageError

    over_limit = (
        f"{name}: image exceeds the pixel limit of {max_pixels} (config key data.max_pixels) and was not decoded "
        "(decompression-bomb guard); replace the file, or raise the limit only if you trust it"
    )
    try:
        with pixel_limit(max_pixels), Image.open(io.BytesIO(data), formats=formats) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{over_limit} [{width}x{height} = {width * height} pixels]")
            img.load()
            if img.mode not in EIGHT_BIT_MODES:
                raise ImageError(f"{name}: pixel format {img.mode!r} is not 8-bit; convert the image to 8-bit RGB")
            # PIL names JPEGs with a multi-picture extension (common in camera files) MPO.
            source_format = "JPEG" if img.format == "MPO" else str(img.format)
            rgb = img.convert("RGB")
            rgb.info["source_format"] = source_format
            return rgb
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{over_limit} [{exc}]") from None
    except UnidentifiedImageError:
        kinds = " or ".join(formats)
        raise ImageError(f"{name}: is not a readable {kinds} image; replace it with an intact copy") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad file
        raise ImageError(
            f"{name}: image is corrupt or truncated ({type(exc).__name__}: {exc}); replace it with an intact copy"
        ) from None


def ingest_resize(rgb_image: PILImage, size: int) -> np.ndarray:
    """The decoded RGB image as the image cache holds it: uint8 (size, size, 3).

    Lanczos with ``reducing_gap``: box-reduce by an integer factor first, then Lanczos;
    indistinguishable from a plain Lanczos resize at a fraction of the cost for 2592x1944 smears.
    """
    from PIL import Image

    resample = Image.Resampling.LANCZOS
    return np.asarray(rgb_image.resize((size, size), resample, reducing_gap=3.0), dtype=np.uint8)


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
