"""Draw the quickstart's subjects: `python configs/subjects/draw_subjects.py`.

Each subject is a small procedurally drawn object, visibly distinct from the other, shown in a few
poses and on a few backgrounds, like a user's photos of one thing. Deterministic: the committed
PNGs are exactly what this script writes.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
BACKGROUNDS = [(214, 226, 240), (236, 225, 200), (200, 230, 205), (235, 210, 215)]


def _robot(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x, y = rng.randint(14, 22), rng.randint(8, 14)
    draw.rectangle([x + 6, y, x + 22, y + 12], fill=(190, 40, 40))  # head
    draw.ellipse([x + 9, y + 3, x + 13, y + 7], fill=(255, 240, 80))  # eyes
    draw.ellipse([x + 15, y + 3, x + 19, y + 7], fill=(255, 240, 80))
    draw.line([x + 14, y, x + 14, y - 5], fill=(60, 60, 60), width=2)  # antenna
    draw.rectangle([x + 2, y + 14, x + 26, y + 34], fill=(150, 150, 165))  # body
    draw.rectangle([x + 8, y + 18, x + 20, y + 26], fill=(40, 90, 190))  # panel
    draw.rectangle([x + 5, y + 35, x + 11, y + 46], fill=(70, 70, 80))  # legs
    draw.rectangle([x + 17, y + 35, x + 23, y + 46], fill=(70, 70, 80))


def _mug(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    x, y = rng.randint(10, 20), rng.randint(14, 22)
    draw.ellipse([x + 24, y + 8, x + 38, y + 26], outline=(20, 120, 110), width=4)  # handle
    draw.rectangle([x, y + 4, x + 28, y + 34], fill=(30, 150, 135))  # body
    draw.ellipse([x, y, x + 28, y + 8], fill=(90, 60, 40))  # coffee
    draw.polygon([(x + 8, y + 14), (x + 14, y + 24), (x + 20, y + 14)], fill=(250, 250, 250))


SUBJECTS = {"robot": _robot, "mug": _mug}


def main(count: int = 4) -> None:
    root = Path(__file__).parent
    for name, paint in SUBJECTS.items():
        rng = random.Random(name)
        folder = root / name
        folder.mkdir(exist_ok=True)
        for index in range(count):
            image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[index % len(BACKGROUNDS)])
            paint(ImageDraw.Draw(image), rng)
            image.save(folder / f"{index:02d}.png", optimize=True)


if __name__ == "__main__":
    main()
