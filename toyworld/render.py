"""Drawing a scene: 64 px RGB, with the masks of what is where.

The object is first drawn as a *label image* (0 empty, 1 primary colour, 2 secondary colour,
3 light detail, 4 dark detail) in its own box, patterned, rotated and moved with nearest-neighbour
resampling (so labels stay exact), then coloured, shaded by the style, composited on the
background and lit. No anti-aliasing: every object pixel is a palette colour times the light.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from toyworld.scene import (
    BACKGROUND_COLOURS,
    LIGHTINGS,
    OBJECT_COLOURS,
    POSITIONS,
    ROTATIONS,
    SCALES,
    SIZE,
    Instance,
    Scene,
)

EMPTY, PRIMARY, SECONDARY, LIGHT_DETAIL, DARK_DETAIL = range(5)
LIGHT_DETAIL_COLOUR = (245, 245, 240)
DARK_DETAIL_COLOUR = (45, 40, 40)
OUTLINE_COLOUR = (20, 20, 20)
SHADOW = 0.72
"""The photo style's drop shadow darkens the background by this factor."""
TEXTURE_TONE = 0.88
"""A textured background's second tone: the base colour times this."""


@dataclass
class Render:
    image: Image.Image
    labels: dict[str, str]
    object_mask: np.ndarray
    """bool [64, 64]: the object's pixels (outline included)."""
    part_masks: dict[str, np.ndarray]
    """bool [64, 64] each: `primary`, `secondary` (accent part and pattern), `detail`."""


Box = tuple[float, float, float, float]


def _toy(draw: ImageDraw.ImageDraw, box: Box, variant: str) -> None:
    x0, y0, x1, _ = box
    s = x1 - x0

    def px(u: float, v: float) -> tuple[float, float]:
        return x0 + u * s, y0 + v * s

    draw.line([px(0.5, 0.02), px(0.5, 0.14)], fill=DARK_DETAIL, width=max(1, round(s / 18)))
    head = [px(0.28, 0.1), px(0.72, 0.42)]
    if variant == "boxy":
        draw.rectangle(head, fill=SECONDARY)
    else:
        draw.ellipse(head, fill=SECONDARY)
    draw.rectangle([px(0.36, 0.2), px(0.44, 0.28)], fill=LIGHT_DETAIL)
    draw.rectangle([px(0.56, 0.2), px(0.64, 0.28)], fill=LIGHT_DETAIL)
    draw.rectangle([px(0.22, 0.44), px(0.78, 0.8)], fill=PRIMARY)  # body
    draw.rectangle([px(0.08, 0.48), px(0.2, 0.72)], fill=SECONDARY)  # arms
    draw.rectangle([px(0.8, 0.48), px(0.92, 0.72)], fill=SECONDARY)
    draw.rectangle([px(0.3, 0.8), px(0.42, 0.98)], fill=DARK_DETAIL)  # legs
    draw.rectangle([px(0.58, 0.8), px(0.7, 0.98)], fill=DARK_DETAIL)


def _cup(draw: ImageDraw.ImageDraw, box: Box, variant: str) -> None:
    x0, y0, x1, _ = box
    s = x1 - x0

    def px(u: float, v: float) -> tuple[float, float]:
        return x0 + u * s, y0 + v * s

    left, right, top = (0.22, 0.68, 0.05) if variant == "tall" else (0.06, 0.76, 0.35)
    handle_width = max(2, round(s / 9))
    draw.ellipse(
        [px(right - 0.12, top + 0.15), px(right + 0.22, 0.8)], outline=SECONDARY, width=handle_width
    )
    draw.rectangle([px(left, top), px(right, 0.95)], fill=PRIMARY)
    draw.rectangle([px(left, top), px(right, top + 0.07)], fill=DARK_DETAIL)  # the rim


def _house(draw: ImageDraw.ImageDraw, box: Box, variant: str) -> None:
    x0, y0, x1, _ = box
    s = x1 - x0

    def px(u: float, v: float) -> tuple[float, float]:
        return x0 + u * s, y0 + v * s

    draw.rectangle([px(0.14, 0.45), px(0.86, 0.96)], fill=PRIMARY)  # walls
    if variant == "pointed":
        draw.polygon([px(0.04, 0.47), px(0.5, 0.04), px(0.96, 0.47)], fill=SECONDARY)
    else:
        draw.rectangle([px(0.06, 0.3), px(0.94, 0.46)], fill=SECONDARY)
    draw.rectangle([px(0.42, 0.68), px(0.58, 0.96)], fill=DARK_DETAIL)  # door
    draw.rectangle([px(0.22, 0.56), px(0.34, 0.68)], fill=LIGHT_DETAIL)  # windows
    draw.rectangle([px(0.66, 0.56), px(0.78, 0.68)], fill=LIGHT_DETAIL)


def _tree(draw: ImageDraw.ImageDraw, box: Box, variant: str) -> None:
    x0, y0, x1, _ = box
    s = x1 - x0

    def px(u: float, v: float) -> tuple[float, float]:
        return x0 + u * s, y0 + v * s

    draw.rectangle([px(0.4, 0.6), px(0.6, 0.98)], fill=SECONDARY)  # trunk
    if variant == "round":
        draw.ellipse([px(0.1, 0.02), px(0.9, 0.72)], fill=PRIMARY)
    else:
        draw.polygon([px(0.5, 0.0), px(0.92, 0.74), px(0.08, 0.74)], fill=PRIMARY)


PAINTERS = {"toy": _toy, "cup": _cup, "house": _house, "tree": _tree}


def _pattern(labels: np.ndarray, pattern: str, side: int) -> None:
    """Paint the pattern (in the secondary colour) over the primary region, in place."""
    if pattern == "plain":
        return
    period = max(4, round(side / 5))
    rows, cols = np.indices(labels.shape)
    if pattern == "striped":
        marks = (rows % period) < period // 2
    else:  # dotted: a grid of small squares, every other row shifted
        shift = (rows // period % 2) * (period // 2)
        marks = ((rows % period) < period // 2) & (((cols + shift) % period) < period // 2)
    labels[(labels == PRIMARY) & marks] = SECONDARY


def label_image(instance: Instance, scale: str, rotation: str, position: str) -> np.ndarray:
    """uint8 [64, 64] of part labels, the object placed as the context says."""
    side = SCALES[scale] * SIZE
    canvas = Image.new("L", (SIZE, SIZE), EMPTY)
    origin = (SIZE - side) / 2
    PAINTERS[instance.object_class](
        ImageDraw.Draw(canvas), (origin, origin, origin + side, origin + side), instance.variant
    )
    labels = np.array(canvas)
    _pattern(labels, instance.pattern, round(side))
    cx, cy = POSITIONS[position]
    moved = Image.fromarray(labels).rotate(
        ROTATIONS[rotation],
        resample=Image.Resampling.NEAREST,
        center=(SIZE / 2, SIZE / 2),
        translate=(round((cx - 0.5) * SIZE), round((cy - 0.5) * SIZE)),
        fillcolor=EMPTY,
    )
    return np.array(moved)


def background(colour: str, texture: str) -> np.ndarray:
    """float [64, 64, 3] in 0–255."""
    base = np.array(BACKGROUND_COLOURS[colour], dtype=np.float32)
    image = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    rows, cols = np.indices((SIZE, SIZE))
    if texture == "checkered":
        second = ((rows // 8 + cols // 8) % 2) == 1
    elif texture == "dotted":
        second = ((rows % 8) < 3) & ((cols % 8) < 3)
    else:
        second = np.zeros((SIZE, SIZE), dtype=bool)
    image[second] *= TEXTURE_TONE
    return image


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def render(scene: Scene) -> Render:
    """The scene's image, labels and masks."""
    instance, context = scene.instance, scene.context
    labels = label_image(instance, context.scale, context.rotation, context.position)
    body = labels != EMPTY
    image = background(context.background, context.texture)
    colours = np.zeros((5, 3), dtype=np.float32)
    colours[PRIMARY] = OBJECT_COLOURS[instance.primary]
    colours[SECONDARY] = OBJECT_COLOURS[instance.secondary]
    colours[LIGHT_DETAIL] = LIGHT_DETAIL_COLOUR
    colours[DARK_DETAIL] = DARK_DETAIL_COLOUR
    painted = colours[labels]
    object_mask = body.copy()
    if context.style == "a photo":
        # A drop shadow down-right, and light from above: the object darkens towards its foot.
        shadow = _shift(body, 2, 2) & ~body
        image[shadow] *= SHADOW
        rows = np.nonzero(body.any(axis=1))[0]
        if rows.size:
            ramp = np.clip(
                1.08 - 0.22 * (np.arange(SIZE) - rows[0]) / max(1, np.ptp(rows)), 0.86, 1.08
            )
            painted *= ramp[:, None, None]
        image[body] = painted[body]
    else:  # a cartoon: flat fills inside a dark outline
        image[body] = painted[body]
        grown = body.copy()
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            grown |= _shift(body, dy, dx)
        outline = grown & ~body
        image[outline] = OUTLINE_COLOUR
        object_mask = grown
    image *= np.array(LIGHTINGS[context.lighting], dtype=np.float32)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Render(
        image=Image.fromarray(pixels, "RGB"),
        labels=scene.labels(),
        object_mask=object_mask,
        part_masks={
            "primary": labels == PRIMARY,
            "secondary": labels == SECONDARY,
            "detail": (labels == LIGHT_DETAIL) | (labels == DARK_DETAIL),
        },
    )
