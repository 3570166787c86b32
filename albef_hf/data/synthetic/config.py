"""Every knob of the synthetic world, and the fixed vocabulary that turns scenes into words."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "NUMBER_WORDS",
    "POSITION_NAMES",
    "RELATION_PHRASES",
    "RENDERABLE_SHAPES",
    "SIZES",
    "SIZE_WORDS",
    "SyntheticWorldConfig",
    "plural",
]

Rgb = tuple[int, int, int]

SIZES: tuple[str, str] = ("small", "large")
# Synonyms vary the wording without changing what a caption claims.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# Index = number; "no" reads naturally in "no circles".
NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Grid cell (row, col) -> name. Every cell has its own name so that a position phrase pins one cell.
POSITION_NAMES: dict[int, tuple[tuple[str, ...], ...]] = {
    2: (("top left", "top right"), ("bottom left", "bottom right")),
    3: (
        ("top left", "top middle", "top right"),
        ("middle left", "center", "middle right"),
        ("bottom left", "bottom middle", "bottom right"),
    ),
}
# Relation of object a to object b, decided from grid cells only (CLEVR-style: "left of" ignores rows).
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}

DEFAULT_COLOURS: tuple[tuple[str, Rgb], ...] = (
    ("red", (220, 40, 40)),
    ("orange", (245, 140, 30)),
    ("yellow", (240, 220, 40)),
    ("green", (40, 170, 60)),
    ("cyan", (40, 200, 210)),
    ("blue", (40, 70, 220)),
    ("purple", (140, 60, 200)),
    ("pink", (240, 110, 190)),
)
RENDERABLE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
DEFAULT_SHAPES: tuple[str, ...] = RENDERABLE_SHAPES


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


@dataclass(frozen=True)
class SyntheticWorldConfig:
    """All parameters of the synthetic world; nothing else in the package tunes it.

    Scene layout:
        image_size: side of the square images in pixels; boxes are in this pixel space.
        grid_size: the image is a ``grid_size x grid_size`` grid (2 or 3); one object per cell at most,
            so boxes never overlap.
        min_objects, max_objects: objects per scene.
        object_count_weights: relative frequency of each count ``min_objects..max_objects``;
            ``None`` weighs a count by itself, because scenes with one object have so few distinct
            layouts that a large test split would otherwise repeat them.
        shapes: shape names, a subset of ``RENDERABLE_SHAPES``.
        colours: ``(name, (r, g, b))`` pairs; saturated, see ``__post_init__``.
        size_scales: side of a small and of a large object as a fraction of the cell side.
        size_jitter: relative random change of an object's side.
        position_jitter: fraction of the free room in its cell over which an object moves at random.
    Appearance:
        colour_jitter: per-channel random shift of an object's colour (uniform, +-).
        texture_prob: probability of a striped, checkered or gradient background instead of a plain one.
        background_grey: range of the grey level of backgrounds.
        background_tint: per-channel tint (+-) added to that grey; small, so backgrounds stay muted.
        texture_contrast: grey-level difference between the two tones of a textured background.
        texture_period: range of the stripe / checker period as a fraction of the image side.
        noise_level: per-pixel uniform noise amplitude (+-) in 0..255 units; 0 disables noise.
    Text:
        captions_per_image: captions per image in both splits (5 gives the COCO retrieval shape).
        noisy_caption_fraction: share of train captions replaced by a wrong one (web-like noise).
        unrelated_noise_fraction: share of those noisy captions that describe another scene; the rest
            describe this scene with one attribute of one object swapped.
        background_mention_prob: probability that a caption names the background pattern.
        over_specify_prob: probability that a referring expression uses more attributes than needed.
    Splits:
        test_fraction: share of scene signatures reserved for the test split (see the package
            docstring for the held-out rule).
    """

    image_size: int = 64
    grid_size: int = 3
    min_objects: int = 1
    max_objects: int = 4
    object_count_weights: tuple[float, ...] | None = None
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[tuple[str, Rgb], ...] = DEFAULT_COLOURS
    size_scales: tuple[float, float] = (0.45, 0.85)
    size_jitter: float = 0.05
    position_jitter: float = 1.0
    colour_jitter: int = 10
    texture_prob: float = 0.5
    background_grey: tuple[int, int] = (70, 190)
    background_tint: int = 12
    texture_contrast: tuple[int, int] = (20, 45)
    texture_period: tuple[float, float] = (0.08, 0.25)
    noise_level: int = 10
    captions_per_image: int = 5
    noisy_caption_fraction: float = 0.2
    unrelated_noise_fraction: float = 0.5
    background_mention_prob: float = 0.3
    over_specify_prob: float = 0.3
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.grid_size not in POSITION_NAMES:
            raise ValueError(f"grid_size must be one of {sorted(POSITION_NAMES)}, got {self.grid_size}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid_size**2:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {self.grid_size**2}, "
                f"got {self.min_objects}, {self.max_objects}"
            )
        if self.max_objects >= len(NUMBER_WORDS) // 2:
            raise ValueError(f"max_objects must be below {len(NUMBER_WORDS) // 2} (two images are counted)")
        n_counts = self.max_objects - self.min_objects + 1
        if self.object_count_weights is not None and len(self.object_count_weights) != n_counts:
            raise ValueError(f"object_count_weights needs {n_counts} entries, one per object count")
        if self.image_size < 8 * self.grid_size:
            raise ValueError(f"image_size must be at least {8 * self.grid_size} for a {self.grid_size}-grid")
        if len(self.shapes) < 2 or len(set(self.shapes)) != len(self.shapes):
            raise ValueError("shapes must hold at least two distinct names")
        if not set(self.shapes) <= set(RENDERABLE_SHAPES):
            raise ValueError(f"shapes must come from {RENDERABLE_SHAPES}, got {self.shapes}")
        names = [name for name, _ in self.colours]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError("colours must hold at least two distinct names")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must lie in (0, 1)")
        if self.captions_per_image < 1:
            raise ValueError("captions_per_image must be at least 1")
        self._check_colour_margins()

    def _check_colour_margins(self) -> None:
        # A background pixel has channels within 2 * background_tint of each other, an object colour
        # has a channel spread s, so their max-channel distance is at least (s - 2 * tint) / 2. Noise and
        # jitter move a pixel by at most `tolerance` from its nominal colour; when the distance exceeds
        # twice that, no background pixel can pass for an object and no object for another.
        tolerance = self.colour_tolerance
        for name, rgb in self.colours:
            if (max(rgb) - min(rgb) - 2 * self.background_tint) / 2 <= 2 * tolerance:
                raise ValueError(f"colour {name} {rgb} is too grey to stand out from muted backgrounds")
        for i, (name_a, rgb_a) in enumerate(self.colours):
            for name_b, rgb_b in self.colours[i + 1 :]:
                if max(abs(a - b) for a, b in zip(rgb_a, rgb_b, strict=True)) <= 2 * tolerance:
                    raise ValueError(f"colours {name_a} and {name_b} are too close to tell apart")

    @property
    def colour_tolerance(self) -> int:
        """Largest per-channel distance of a drawn object pixel from its colour's nominal RGB."""
        return self.noise_level + self.colour_jitter

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    @property
    def position_names(self) -> tuple[tuple[str, ...], ...]:
        return POSITION_NAMES[self.grid_size]
