"""What a toy-world image shows: the vocabulary, a scene's labels, drawing scenes from a seed, and
the caption grammar (both ways: a scene → a caption, a prompt → the context it asks for).

The vocabulary is chosen so the truth can be read back from pixels: a few saturated object
colours and a few pale background colours, far apart in RGB; silhouettes that differ by class.

An *instance* is what an object is (class, variant, primary and secondary colour, pattern); a
*context* is how it is shown (background, position, scale, rotation, lighting, style). Subjects
are instances whose (class, primary, secondary) triple is held out: no pretraining draw has it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

SIZE = 64
WORLD_VERSION = "toyworld-v1"
"""Bump when rendering or the grammar changes: what was built on the old world is stale."""

CLASSES = ("toy", "cup", "house", "tree")
VARIANTS = {
    "toy": ("boxy", "round"),  # square head | round head
    "cup": ("tall", "wide"),
    "house": ("pointed", "flat"),  # the roof
    "tree": ("round", "pointed"),  # the crown: a ball | a pine
}
ACCENT_PART = {"toy": "head", "cup": "handle", "house": "roof", "tree": "trunk"}
"""The part painted in the secondary colour, named in captions."""

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (245, 225, 40),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
    "black": (30, 30, 30),
    "brown": (125, 75, 35),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (170, 205, 245),
    "pink": (245, 185, 205),
    "green": (185, 235, 180),
    "cream": (245, 235, 190),
    "grey": (170, 170, 170),
}
PATTERNS = ("plain", "striped", "dotted")
PATTERN_WORDS = {"striped": "stripes", "dotted": "dots"}
BACKGROUND_TEXTURES = ("plain", "checkered", "dotted")
POSITIONS = {  # caption phrase → the object's centre, as a fraction of the image
    "in the centre": (0.5, 0.5),
    "on the left": (0.32, 0.5),
    "on the right": (0.68, 0.5),
    "at the top": (0.5, 0.34),
    "at the bottom": (0.5, 0.66),
}
SCALES = {"small": 0.45, "large": 0.66}
"""Scale word → the object's box side as a fraction of the image."""
ROTATIONS = {"upright": 0.0, "tilted left": 18.0, "tilted right": -18.0}
LIGHTINGS = {  # caption phrase → a multiplier per RGB channel over the whole image
    "in daylight": (1.0, 1.0, 1.0),
    "in dim light": (0.78, 0.78, 0.78),
    "in warm light": (1.06, 0.96, 0.84),
}
STYLES = ("a photo", "a cartoon")


@dataclass(frozen=True)
class Instance:
    """An object: class and its variable parts."""

    object_class: str
    variant: str
    primary: str
    secondary: str
    pattern: str


@dataclass(frozen=True)
class Context:
    """How an object is shown."""

    background: str
    texture: str
    position: str
    scale: str
    rotation: str
    lighting: str
    style: str


@dataclass(frozen=True)
class Scene:
    instance: Instance
    context: Context

    def labels(self) -> dict[str, str]:
        """Every ground-truth label, flat: the instance's and the context's fields."""
        return {**asdict(self.instance), **asdict(self.context)}


SUBJECTS: dict[str, Instance] = {
    # The quickstart's subjects (class tokens toy, cup) and two more for the bench.
    "robot": Instance("toy", "boxy", "blue", "red", "striped"),
    "mug": Instance("cup", "tall", "green", "brown", "dotted"),
    "cabin": Instance("house", "pointed", "yellow", "red", "striped"),
    "pine": Instance("tree", "pointed", "orange", "purple", "dotted"),
}
HELD_OUT = frozenset((s.object_class, s.primary, s.secondary) for s in SUBJECTS.values())
"""(class, primary, secondary) triples that no pretraining draw shows."""


def is_held_out(instance: Instance) -> bool:
    return (instance.object_class, instance.primary, instance.secondary) in HELD_OUT


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def draw_instance(rng: np.random.Generator, *, allow_held_out: bool = False) -> Instance:
    """A random instance; held-out (subject) triples are redrawn unless `allow_held_out`."""
    while True:
        object_class = _pick(rng, CLASSES)
        primary = _pick(rng, list(OBJECT_COLOURS))
        secondary = _pick(rng, [c for c in OBJECT_COLOURS if c != primary])
        instance = Instance(
            object_class,
            _pick(rng, VARIANTS[object_class]),
            primary,
            secondary,
            _pick(rng, PATTERNS),
        )
        if allow_held_out or not is_held_out(instance):
            return instance


def draw_context(rng: np.random.Generator, *, style: str | None = None) -> Context:
    return Context(
        background=_pick(rng, list(BACKGROUND_COLOURS)),
        texture=_pick(rng, BACKGROUND_TEXTURES),
        position=_pick(rng, list(POSITIONS)),
        scale=_pick(rng, list(SCALES)),
        rotation=_pick(rng, list(ROTATIONS)),
        lighting=_pick(rng, list(LIGHTINGS)),
        style=style or _pick(rng, STYLES),
    )


def scene_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of draw `index` of `seed`: random access, so any batch is reproducible
    from (seed, index) alone, whatever was drawn before it."""
    return np.random.default_rng([seed, stream, index])


def pretraining_scene(seed: int, index: int) -> Scene:
    """Draw `index` of the pretraining world of `seed` (never a held-out instance)."""
    rng = scene_rng(seed, index)
    return Scene(draw_instance(rng), draw_context(rng))


def subject_scene(subject: str, seed: int, index: int) -> Scene:
    """The subject in a varied context (a photo, like a user's pictures of one thing)."""
    if subject not in SUBJECTS:
        raise ValueError(f"unknown toy-world subject {subject!r}; known: {sorted(SUBJECTS)}")
    rng = scene_rng(seed, index, stream=1 + sorted(SUBJECTS).index(subject))
    return Scene(SUBJECTS[subject], draw_context(rng, style="a photo"))


# ---- captions ----------------------------------------------------------------------------


def describe_instance(instance: Instance, rng: np.random.Generator, mention: float) -> str:
    """`[size] [primary] [variant] class [with a <secondary> <accent> [and <pattern>]]`, each
    optional part said with probability `mention` (the class always)."""
    words = [w for w in (instance.primary, instance.variant) if rng.random() < mention]
    phrase = " ".join([*words, instance.object_class])
    if rng.random() < mention:
        article = "an" if instance.secondary[0] in "aeiou" else "a"
        phrase += f" with {article} {instance.secondary} {ACCENT_PART[instance.object_class]}"
        if instance.pattern != "plain" and rng.random() < mention:
            phrase += f" and {PATTERN_WORDS[instance.pattern]}"
    return phrase


def caption(scene: Scene, rng: np.random.Generator, *, mention: float = 0.75) -> str:
    """A caption of the scene from the grammar; every phrase it has is true of the labels.

    `{style} of a {size} {instance} on a {texture} {background} background, {position},
    {rotation}, {lighting}`: the style and class always, the rest each with probability
    `mention`, so the model also learns short prompts like `a photo of a toy`.
    """
    context = scene.context
    size = f"{context.scale} " if rng.random() < mention else ""
    text = f"{context.style} of a {size}{describe_instance(scene.instance, rng, mention)}"
    if rng.random() < mention:
        texture = "" if context.texture == "plain" else f"{context.texture} "
        text += f" on a {texture}{context.background} background"
    tail = [
        phrase
        for phrase in (context.position, context.rotation, context.lighting)
        if rng.random() < mention
    ]
    return ", ".join([text, *tail])


_BACKGROUND = re.compile(
    r"on an? (?:("
    + "|".join(BACKGROUND_TEXTURES)
    + r") )?("
    + "|".join(BACKGROUND_COLOURS)
    + r") background"
)


def parse_context(prompt: str) -> dict[str, str]:
    """The context a prompt asks for, by label name (only what it names): background, texture,
    position, rotation, lighting, style. Used by the oracle to judge prompt following."""
    asked: dict[str, str] = {}
    text = prompt.lower()
    match = _BACKGROUND.search(text)
    if match:
        asked["background"] = match.group(2)
        asked["texture"] = match.group(1) or "plain"
    for label, phrases in (
        ("position", POSITIONS),
        ("rotation", ROTATIONS),
        ("lighting", LIGHTINGS),
    ):
        for phrase in phrases:
            if re.search(rf"(^|, ){phrase}(,|$)", text):
                asked[label] = phrase
    for style in STYLES:
        if text.startswith(style + " of"):
            asked["style"] = style
    return asked


def parse_caption(text: str) -> dict[str, str]:
    """Every label a caption of `caption()` states, read back (the test that captions match
    their labels)."""
    found = parse_context(text)
    head = _BACKGROUND.split(text.lower())[0].split(",")[0]
    for scale in SCALES:
        if f" a {scale} " in f"{head} ":
            found["scale"] = scale
    words = head.split()
    for object_class in CLASSES:
        if object_class in words:
            found["object_class"] = object_class
            before = words[: words.index(object_class)]
            if before and before[-1] in VARIANTS[object_class]:
                found["variant"] = before[-1]
            for word in before[-2:]:
                if word in OBJECT_COLOURS:
                    found["primary"] = word
            accent = re.search(
                rf"with an? (\w+) {ACCENT_PART[object_class]}(?: and (stripes|dots))?", head
            )
            if accent:
                found["secondary"] = accent.group(1)
                inverse = {w: p for p, w in PATTERN_WORDS.items()}
                if accent.group(2):
                    found["pattern"] = inverse[accent.group(2)]
    return found


def with_context(scene: Scene, **changes: str) -> Scene:
    """The scene with some context fields replaced (e.g. a prompt's background)."""
    return replace(scene, context=replace(scene.context, **changes))


def prompt_template() -> dict[str, object]:
    """An `eval.prompt_template` for the toy world (the layout of `configs/prompts/*.yaml`):
    every phrase is one the grammar has, so the oracle can judge what each prompt asks."""
    return {
        "template": "{style} of {token} {class} on a {background} background, {position}, "
        "{lighting}",
        "slots": {
            "style": list(STYLES),
            "background": list(BACKGROUND_COLOURS),
            "position": list(POSITIONS),
            "lighting": list(LIGHTINGS),
        },
    }
