"""The package's one set of rules for reading photos (`to_rgb_array`, `load_rgb_image`): shared by
`SAKImageProcessor`, `predict`, the dataset converters and row decoding.

A checkpoint carries this file (the image processor imports it); it needs only numpy and PIL, so the data package may
import it too (docs/layout.md).
"""

from __future__ import annotations

import os

import numpy as np


try:
    from PIL import Image as PILImage
except ImportError:  # pragma: no cover - PIL is a transformers vision dependency
    PILImage = None


# PIL modes and how they become the (height, width, 3) uint8 RGB a SAK model reads (see `to_rgb_array`).
PHOTO_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBA", "RGBa")
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")


def value_range(values: np.ndarray) -> str:
    """`low..high` of an array, for error messages."""
    if values.size == 0:
        return "none"
    low, high = np.nanmin(values), np.nanmax(values)
    return f"{low:g}..{high:g}" if np.issubdtype(values.dtype, np.floating) else f"{int(low)}..{int(high)}"


def to_rgb_array(image: PILImage.Image, source: str = "image") -> np.ndarray:
    """A PIL image as the `(height, width, 3)` uint8 RGB array a SAK model reads; `ValueError` naming `source`, the
    mode and what is expected for anything that is not an 8-bit photo.

    The rules (shared by `SAKImageProcessor`, `predict` and the dataset converters):
    - `RGB`; `L` and `1` (grayscale, replicated to 3 channels; `1` is 0 or 255); `P` (palette looked up); `RGBX`,
      `CMYK`, `YCbCr`, `LAB`, `HSV` (PIL's conversion, no colour management): converted to RGB.
    - Transparency (`RGBA`, `RGBa`, `LA`, `PA`, or a `transparency` key such as a palette PNG's): composited onto a
      white background, as `transformers.image_transforms.convert_to_rgb` does:
      `round(c * a / 255 + 255 * (1 - a / 255))` per channel.
    - `I;16*`, `I` and `F` (16-bit, 32-bit integer or float single-channel: depth and disparity maps) and any other
      mode are rejected: their values have no 8-bit photo meaning.
    """
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        bits = "32-bit float" if mode == "F" else "16-bit" if mode.startswith("I;16") else "32-bit integer"
        raise ValueError(
            f"{source}: mode {mode} ({bits} single channel, values {value_range(np.asarray(image))}) is not a "
            "photo; SAK expects an 8-bit RGB or grayscale photo, and this looks like a depth or disparity map. A "
            "high-bit-depth grayscale photo must be scaled to 8 bits first"
        )
    if mode not in PHOTO_MODES:
        raise ValueError(
            f"{source}: mode {mode} is not supported; SAK expects an 8-bit photo in one of the modes "
            f"{', '.join(PHOTO_MODES)}"
        )
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def load_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as `(height, width, 3)` uint8 RGB by the rules of `to_rgb_array`; `ValueError` naming the file
    when it cannot be read or is not an 8-bit photo."""
    try:
        image = PILImage.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as error:
        raise ValueError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from error
    with image:
        return to_rgb_array(image, str(path))
