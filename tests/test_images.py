"""Subject images in every format users bring: used correctly, or refused by name before training.

Each case is a real file written with Pillow; "used correctly" is checked on the pixels the
trainer receives (8-bit RGB, upright, short side resized and centre-cropped).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import small_spec, write_spec
from PIL import Image

from contract.images import image_problem, load_rgb
from contract.spec import SpecError, load_spec
from trainers.data import load_subject_pixels, to_training_tensor

RED, GREEN, BLUE = (220, 20, 30), (10, 200, 40), (20, 30, 210)


def pixel(tensor, y: int, x: int) -> tuple[int, int, int]:
    """A training tensor's pixel back in 0..255."""
    return tuple(round((float(v) + 1) * 127.5) for v in tensor[:, y, x])


def close(got: tuple[int, ...], want: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(got, want, strict=True))


def three_bands(width: int = 192, height: int = 64) -> Image.Image:
    """Red | green | blue vertical bands: a centre crop keeps only green."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(GREEN, (width // 3, 0, 2 * width // 3, height))
    image.paste(BLUE, (2 * width // 3, 0, width, height))
    return image


def test_common_formats_are_used_centre_cropped(tmp_path: Path) -> None:
    for suffix, options in ((".png", {}), (".jpg", {"quality": 95}), (".webp", {"quality": 95})):
        path = tmp_path / f"bands{suffix}"
        three_bands().save(path, **options)
        assert image_problem(path) is None
        tensor = to_training_tensor(load_rgb(path), 64)
        assert tensor.shape == (3, 64, 64)
        # the 192×64 image is cropped to its middle third: green edge to edge
        for x in (1, 32, 62):
            assert close(pixel(tensor, 32, x), GREEN), (suffix, x, pixel(tensor, 32, x))


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    samples = np.full((64, 64), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow decodes it as 16-bit integers
    assert image_problem(path) is None
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((10, 10)) == (128, 128, 128)  # PIL's own convert gives (255, 255, 255)


def test_grayscale_cmyk_and_transparent_images_become_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (64, 64), 90).save(gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("RGB", (64, 64), RED).convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    clear = tmp_path / "clear.png"
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    transparent.paste((*BLUE, 255), (0, 0, 32, 64))
    transparent.save(clear)
    for path in (gray, cmyk, clear):
        assert image_problem(path) is None, path
    assert load_rgb(gray).getpixel((5, 5)) == (90, 90, 90)
    assert close(load_rgb(cmyk).getpixel((5, 5)), RED)
    # transparency is composited onto white, not onto the black of the hidden colour
    assert load_rgb(clear).getpixel((50, 5)) == (255, 255, 255)
    assert load_rgb(clear).getpixel((5, 5)) == BLUE


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A camera's portrait photo: stored landscape, with orientation 6 (rotate 90° clockwise)."""
    stored = Image.new("RGB", (96, 48), GREEN)
    stored.paste(RED, (0, 0, 16, 16))  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = load_rgb(path)
    assert upright.size == (48, 96)
    # rotating 90° clockwise moves the stored top-left corner to the top-right
    assert close(upright.getpixel((40, 8)), RED)
    assert close(upright.getpixel((8, 8)), GREEN)


def test_a_12000_pixel_photo_is_accepted_and_resized(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("RGB", (12000, 12000), RED).save(path, compress_level=1)
    assert image_problem(path) is None
    tensor = to_training_tensor(load_rgb(path), 64)
    assert tensor.shape == (3, 64, 64)
    assert close(pixel(tensor, 32, 32), RED, tolerance=1)


def test_an_image_over_the_pixel_limit_is_refused_without_decoding(tmp_path: Path) -> None:
    """A PNG header claiming 20000×20000 (a decompression bomb) is refused by its size alone."""
    path = tmp_path / "bomb.png"
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG", compress_level=1)
    path.write_bytes(buffer.getvalue())
    problem = image_problem(path)
    assert problem is not None and problem.startswith("too large")


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), "unreadable image"),
        ("dot.png", lambda p: Image.new("RGB", (1, 1), RED).save(p), "too small (1×1 px"),
        (
            "moving.gif",
            lambda p: Image.new("RGB", (64, 64)).save(
                p, save_all=True, append_images=[Image.new("RGB", (64, 64), RED)]
            ),
            "not an image file (allowed: .png, .jpg, .jpeg, .webp, .bmp)",
        ),
        (
            "moving.webp",
            lambda p: Image.new("RGB", (64, 64)).save(
                p, save_all=True, append_images=[Image.new("RGB", (64, 64), RED)]
            ),
            "animated (2 frames)",
        ),
    ],
)
def test_unusable_files_are_refused_by_name(tmp_path: Path, name: str, write, reason: str) -> None:
    path = tmp_path / name
    write(path)
    problem = image_problem(path)
    assert problem is not None and problem.startswith(reason), problem


def test_a_mixed_folder_is_checked_whole_before_training(tmp_path: Path) -> None:
    """The spec check names every unusable file at once; the usable ones all train."""
    spec = small_spec(tmp_path)
    folder = tmp_path / "subjects" / "robot"
    Image.new("L", (64, 64), 90).save(folder / "04-gray.png")
    Image.new("RGB", (80, 64), RED).convert("CMYK").save(folder / "05-cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(folder / "06-deep.png")
    three_bands().save(folder / "07-bands.webp")
    path = write_spec(tmp_path, spec)
    usable = load_spec(path).subjects[0].images
    pixels = load_subject_pixels(sorted(usable.iterdir()), 64)
    assert pixels.shape == (8, 3, 64, 64)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0

    (folder / "08-empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(folder / "09-dot.png")
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    problems = raised.value.problems
    assert len(problems) == 2
    assert str(folder / "08-empty.png") in problems[0] and "unreadable image" in problems[0]
    assert str(folder / "09-dot.png") in problems[1] and "too small" in problems[1]
