"""Scenes: sampling from a seed, the held-out rule between splits, and rendering to PIL images."""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .config import SIZES, SyntheticWorldConfig

__all__ = [
    "BACKGROUND_KINDS",
    "SPLITS",
    "TASKS",
    "Background",
    "Scene",
    "SceneObject",
    "item_rng",
    "render_scene",
    "sample_scene",
    "signature_split",
]

Rgb = tuple[int, int, int]
Signature = tuple[tuple[str, str, str, int, int], ...]

SPLITS: dict[str, int] = {"train": 0, "test": 1}
TASKS: dict[str, int] = {"caption": 0, "vqa": 1, "nlvr2": 2, "ve": 3, "grounding": 4}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "striped", "checkered", "gradient")

# Masks are drawn this many times larger and box-filtered down: anti-aliased edges keep small shapes
# recognisable at 64 px.
_SUPERSAMPLE = 4
_T = 1.0 / 3.0
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "cross": (
        (_T, 0.0), (1 - _T, 0.0), (1 - _T, _T), (1.0, _T), (1.0, 1 - _T), (1 - _T, 1 - _T),
        (1 - _T, 1.0), (_T, 1.0), (_T, 1 - _T), (0.0, 1 - _T), (0.0, _T), (_T, _T),
    ),
}  # fmt: skip


def _star_polygon() -> tuple[tuple[float, float], ...]:
    points = [
        ((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
         (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
        for k in range(10)
    ]  # fmt: skip
    xs, ys = zip(*points, strict=True)
    # Stretched to fill its square, so that a star's box is as tight as any other shape's.
    return tuple(
        ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points
    )


_POLYGONS["star"] = _star_polygon()


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape, colour, size: attribute names (size is "small" or "large").
        cell: ``(row, col)`` grid cell, row 0 at the top, col 0 at the left.
        box: ``(x0, y0, x1, y1)`` tight pixel box at the scene's image size, ``x1``/``y1`` exclusive:
            every pixel the object touches lies in ``[x0, x1) x [y0, y1)`` and each box edge is touched.
        rgb: the drawn colour (the colour's nominal RGB plus jitter).
        patch: ``(x, y, side)`` square the shape is drawn into.
    """

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    box: tuple[int, int, int, int]
    rgb: Rgb
    patch: tuple[int, int, int]

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Background:
    """Background pattern: ``kind`` in BACKGROUND_KINDS, two muted tones, and the pattern geometry
    (``orientation`` 0 horizontal, 1 vertical, 2 diagonal; ``period`` and ``phase`` in image fractions)."""

    kind: str
    tones: tuple[Rgb, Rgb]
    orientation: int
    period: float
    phase: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image and to say true or false things about it.

    ``objects`` are in no particular order; captions and questions are generated from this
    description, never from pixels. ``noise_seed`` and ``noise_level`` fix the pixel noise, so
    ``render_scene`` is a pure function of the scene.
    """

    objects: tuple[SceneObject, ...]
    background: Background
    image_size: int
    grid_size: int
    noise_level: int
    noise_seed: int

    @property
    def signature(self) -> Signature:
        """Sorted ``(size, colour, shape, row, col)`` of all objects: the layout, up to jitter."""
        return _signature((o.size, o.colour, o.shape, o.cell) for o in self.objects)

    def attribute_multiset(self) -> list[tuple[str, str, str]]:
        """Sorted ``(size, colour, shape)`` of all objects: what position-free captions pin down."""
        return sorted(obj.attributes for obj in self.objects)


def _signature(layout: Iterable[tuple[str, str, str, tuple[int, int]]]) -> Signature:
    return tuple(sorted((size, colour, shape, row, col) for size, colour, shape, (row, col) in layout))


def item_rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
    """The random stream of one item: a function of (seed, split, task, index) only, so items can be
    generated in any order, in any worker, and come out the same."""
    return np.random.default_rng([seed, SPLITS[split], TASKS[task], index])


def signature_split(signature: Signature, seed: int, test_fraction: float) -> str:
    """The split a layout belongs to: a seeded hash of the signature, below ``test_fraction`` -> test."""
    digest = hashlib.blake2b(repr((seed, signature)).encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2.0**64 < test_fraction else "train"


def _cell_bounds(index: int, grid_size: int, image_size: int) -> tuple[int, int]:
    return round(index * image_size / grid_size), round((index + 1) * image_size / grid_size)


def _place(
    config: SyntheticWorldConfig, shape: str, size: str, cell: tuple[int, int], jitter: list[float]
) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
    """Pixel square (x, y, side) of an object and its tight box; ``jitter`` holds 3 uniforms in [0, 1)."""
    (y_lo, y_hi), (x_lo, x_hi) = (_cell_bounds(i, config.grid_size, config.image_size) for i in cell)
    cell_side = min(x_hi - x_lo, y_hi - y_lo)
    scale = config.size_scales[SIZES.index(size)] * (1.0 + config.size_jitter * (2.0 * jitter[0] - 1.0))
    side = int(min(cell_side, max(3, round(scale * cell_side))))
    x, y = (
        lo + round((hi - lo - side) * (0.5 + config.position_jitter * (u - 0.5)))
        for (lo, hi), u in (((x_lo, x_hi), jitter[1]), ((y_lo, y_hi), jitter[2]))
    )
    bx0, by0, bx1, by1 = _shape_mask(shape, side)[1]
    return (x, y, side), (x + bx0, y + by0, x + bx1, y + by1)


@lru_cache(maxsize=32)
def _count_cdf(config: SyntheticWorldConfig, min_objects: int) -> tuple[int, tuple[float, ...]]:
    """First allowed object count and the cumulative probabilities of the counts from there on."""
    counts = range(max(min_objects, config.min_objects), config.max_objects + 1)
    offset = counts[0] - config.min_objects
    weights = config.object_count_weights[offset:] if config.object_count_weights else counts
    cdf = np.cumsum(weights) / sum(weights)
    return counts[0], tuple(cdf.tolist())


def _sample_layout(
    rng: np.random.Generator, config: SyntheticWorldConfig, min_objects: int
) -> list[tuple[str, str, str, tuple[int, int]]]:
    first, cdf = _count_cdf(config, min_objects)
    n = first + min(bisect.bisect_right(cdf, rng.random()), len(cdf) - 1)
    cells = rng.permutation(config.grid_size**2)[:n]
    attrs = rng.integers(0, [len(SIZES), len(config.colours), len(config.shapes)], size=(n, 3))
    return [
        (SIZES[s], config.colours[c][0], config.shapes[h], divmod(int(cell), config.grid_size))
        for (s, c, h), cell in zip(attrs.tolist(), cells.tolist(), strict=True)
    ]


def _muted_tone(rng: np.random.Generator, config: SyntheticWorldConfig, grey: float) -> Rgb:
    tint = rng.integers(-config.background_tint, config.background_tint + 1, size=3).tolist()
    return tuple(min(255, max(0, round(grey) + t)) for t in tint)


def _sample_background(rng: np.random.Generator, config: SyntheticWorldConfig) -> Background:
    lo, hi = config.background_grey
    grey = rng.uniform(lo, hi)
    if rng.random() >= config.texture_prob:
        tone = _muted_tone(rng, config, grey)
        return Background("plain", (tone, tone), 0, 1.0, 0.0)
    kind = BACKGROUND_KINDS[1 + int(rng.integers(len(BACKGROUND_KINDS) - 1))]
    contrast = rng.uniform(*config.texture_contrast)
    # The second tone moves towards the middle of the range so both tones stay inside it.
    other = grey + contrast if grey < (lo + hi) / 2 else grey - contrast
    return Background(
        kind,
        (_muted_tone(rng, config, grey), _muted_tone(rng, config, other)),
        orientation=int(rng.integers(3)),
        period=float(rng.uniform(*config.texture_period)),
        phase=float(rng.random()),
    )


def _build_objects(
    rng: np.random.Generator,
    config: SyntheticWorldConfig,
    layout: list[tuple[str, str, str, tuple[int, int]]],
) -> tuple[SceneObject, ...]:
    palette = dict(config.colours)
    jitter = rng.random((len(layout), 3)).tolist()
    rgb_jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=(len(layout), 3)).tolist()
    objects = []
    for (size, colour, shape, cell), u, dc in zip(layout, jitter, rgb_jitter, strict=True):
        patch, box = _place(config, shape, size, cell, u)
        rgb = tuple(min(255, max(0, v + d)) for v, d in zip(palette[colour], dc, strict=True))
        objects.append(SceneObject(shape, colour, size, cell, box, rgb, patch))
    return tuple(objects)


def sample_scene(
    rng: np.random.Generator, config: SyntheticWorldConfig, seed: int, split: str, min_objects: int = 1
) -> Scene:
    """Draw a scene of ``split``: layouts are redrawn until their signature hashes into that split."""
    while True:
        layout = _sample_layout(rng, config, min_objects)
        if signature_split(_signature(layout), seed, config.test_fraction) == split:
            break
    return Scene(
        objects=_build_objects(rng, config, layout),
        background=_sample_background(rng, config),
        image_size=config.image_size,
        grid_size=config.grid_size,
        noise_level=config.noise_level,
        noise_seed=int(rng.integers(2**63)),
    )


def replace_attribute(scene: Scene, index: int, attribute: str, value: str) -> Scene:
    """The scene with one object's size, colour or shape changed (geometry kept; for wrong captions)."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **{attribute: value})
    return replace(scene, objects=tuple(objects))


@lru_cache(maxsize=512)
def _shape_mask(shape: str, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Anti-aliased ``side x side`` coverage mask of a shape (mode "L") and its tight bounding box."""
    big = side * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, big - 1, big - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, big - 1, big - 1), fill=255)
    else:
        draw.polygon([(x * (big - 1), y * (big - 1)) for x, y in _POLYGONS[shape]], fill=255)
    mask = mask.reduce(_SUPERSAMPLE)
    return mask, mask.getbbox()


@lru_cache(maxsize=8)
def _unit_coordinates(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    return centres[None, :], centres[:, None]


def _background_image(background: Background, image_size: int) -> Image.Image:
    if background.kind == "plain":
        return Image.new("RGB", (image_size, image_size), background.tones[0])
    x, y = _unit_coordinates(image_size)
    # Broadcasting keeps horizontal and vertical patterns one-dimensional until the final select.
    along = (y, x, (x + y) / 2)[background.orientation]
    if background.kind == "gradient":
        tone_a, tone_b = (np.asarray(t, dtype=np.float32) for t in background.tones)
        pixels = tone_a * (1.0 - along[..., None]) + tone_b * along[..., None]
    elif background.kind == "striped":
        first = (along / background.period + background.phase) % 1.0 < 0.5
        pixels = np.where(first[..., None], *(np.asarray(t, dtype=np.uint8) for t in background.tones))
    else:
        first = (
            np.floor(x / background.period) + np.floor(y / background.period + background.phase)
        ) % 2 == 0
        pixels = np.where(first[..., None], *(np.asarray(t, dtype=np.uint8) for t in background.tones))
    pixels = np.broadcast_to(pixels, (image_size, image_size, 3))
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))


def render_scene(scene: Scene) -> Image.Image:
    """RGB image of ``scene.image_size`` pixels square."""
    image = _background_image(scene.background, scene.image_size)
    for obj in scene.objects:
        x, y, side = obj.patch
        image.paste(obj.rgb, (x, y, x + side, y + side), _shape_mask(obj.shape, side)[0])
    if scene.noise_level == 0:
        return image
    pixels = np.asarray(image, dtype=np.int16)
    noise = np.random.default_rng(scene.noise_seed).integers(
        -scene.noise_level, scene.noise_level + 1, size=pixels.shape, dtype=np.int16
    )
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
