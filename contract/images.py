"""Reading subject and reference images: one decoder for training, evaluation and the spec check.

PIL only (no torch), so `dreamsweep validate` can check every image before anything runs. An image
is used upright (EXIF orientation applied) and as 8-bit RGB: 16-bit samples are scaled (PIL's own
conversion would clip them to white), and transparency is composited onto white.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 32
"""Shorter images carry too little of the subject to learn from; they are refused."""
MAX_PIXELS = 150_000_000
"""Larger images are refused before decoding (a 12000×12000 photo, 144 Mpx, is accepted)."""
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit PNG grayscale decodes to these


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":  # a palette may carry transparency
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, RGB


def load_rgb(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as 8-bit RGB."""
    with warnings.catch_warnings():
        # MAX_PIXELS is this project's limit; Pillow's lower warning threshold is not.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return _to_rgb(ImageOps.exif_transpose(image))


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be a training or reference image, or None when it can (fully decoded,
    so a truncated file is found here and not in the middle of a sweep)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (allowed: {', '.join(IMAGE_SUFFIXES)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                frames = getattr(image, "n_frames", 1)
                if width * height > MAX_PIXELS:
                    return (
                        f"too large ({width}×{height} px, over {MAX_PIXELS:,} pixels); "
                        "downscale it first"
                    )
                if frames > 1:
                    return f"animated ({frames} frames); use a still image"
                if min(width, height) < MIN_SIDE:
                    return f"too small ({width}×{height} px; the shorter side must be ≥ {MIN_SIDE})"
                image.load()
    except Image.DecompressionBombError as err:  # Pillow refuses to open it at all
        return f"too large ({err}); downscale it first"
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return f"unreadable image ({err.__class__.__name__}: {err})"
    return None
