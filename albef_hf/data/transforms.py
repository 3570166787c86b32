"""Training and evaluation image transforms of ALBEF, in PIL and numpy.

Every transform maps a PIL image to a PIL image. Conversion to tensors, rescaling and normalisation
are left to the image processor, so these transforms only decide *which pixels* the model sees.

Randomness
----------
Random transforms draw from a `numpy.random.Generator`. Each call takes an optional ``rng`` (a
Generator or an int seed): pass one for exact reproducibility, as the tests do. Without it, a
transform uses a generator that it creates lazily in each process from
``(torch.initial_seed(), seed, the class name)`` and re-creates when either the process or torch's
initial seed changes. Why torch's seed: a `torch.utils.data.DataLoader` gives every worker
``base_seed + worker_id``, with a fresh base seed drawn from the main process's torch generator for
every epoch (unless workers persist), so

- workers differ from one another and from one epoch to the next (a generator created once in the
  main process would be copied into every worker, which then all repeat the same augmentations);
- the whole pipeline is reproducible under ``torch.manual_seed`` / ``transformers.set_seed``: a run
  that seeds torch alike draws the same augmentations (seeding torch again with the *same* value
  inside one process does not restart a stream already in use; pass ``rng`` for that);
- ``seed`` separates two runs that share a torch seed.

A `Compose` hands its own generator to the transforms it holds, so a pipeline draws from one stream
and its crop, flip and augmentation decisions are independent of one another.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "DEFAULT_RANDAUGMENT_OPS",
    "RANDAUGMENT_MAX_LEVEL",
    "Compose",
    "RandAugment",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomTransform",
    "Resize",
    "apply_randaugment_op",
    "build_eval_transform",
    "build_train_transform",
    "swap_left_right",
    "to_rgb",
]

RngLike = np.random.Generator | int | None

#: The ten operations the original draws from in every ALBEF task.
DEFAULT_RANDAUGMENT_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
#: Magnitude at which every operation reaches its largest parameter.
RANDAUGMENT_MAX_LEVEL = 10.0
# Parameters at RANDAUGMENT_MAX_LEVEL, as in the original: enhancement factor 0.1 + 1.8; the
# geometric ones, which get a random sign: shear 0.3, translation 10 *pixels* (not a fraction of
# the image), rotation 30 degrees.
_ENHANCE_BASE, _ENHANCE_SPAN = 0.1, 1.8
_MAX_GEOMETRIC = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 10.0, "TranslateY": 10.0, "Rotate": 30.0}

_BICUBIC = Image.Resampling.BICUBIC


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (height, width)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` in RGB mode (a no-op when it already is)."""
    return image if image.mode == "RGB" else image.convert("RGB")


class RandomTransform:
    """Base class of the random transforms: resolves the generator a call draws from.

    Args:
        seed: optional int mixed into the per-process generator (see the module docstring).
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None

    def _process_rng(self) -> np.random.Generator:
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._rng_key != key:
            entropy = [key[1], zlib.crc32(type(self).__name__.encode())]
            if self.seed is not None:
                entropy.append(self.seed)
            self._rng = np.random.default_rng(entropy)
            self._rng_key = key
        return self._rng

    def resolve_rng(self, rng: RngLike = None) -> np.random.Generator:
        """The generator a call draws from: ``rng`` itself, a new one seeded by an int ``rng``, or
        this transform's per-process generator when ``rng`` is None."""
        if rng is None:
            return self._process_rng()
        if isinstance(rng, np.random.Generator):
            return rng
        return np.random.default_rng(rng)

    def __call__(self, image: Image.Image, rng: RngLike = None) -> Image.Image:
        return self.apply(image, self.resolve_rng(rng))

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        raise NotImplementedError


class Compose(RandomTransform):
    """Apply transforms in order, all drawing from one generator.

    Args:
        transforms: `RandomTransform`s, which receive the shared generator, or plain callables
            ``PIL.Image -> PIL.Image``, which are called with the image only.
        seed: see `RandomTransform`.
    """

    def __init__(self, transforms: Sequence[Callable[..., Image.Image]], seed: int | None = None):
        super().__init__(seed)
        self.transforms = list(transforms)

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for transform in self.transforms:
            image = transform(image, rng) if isinstance(transform, RandomTransform) else transform(image)
        return image

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([{inner}])"


class Resize:
    """Resize to exactly ``size`` = (height, width) (or a square side), bicubic by default: the
    original's evaluation (and grounding training) resize, which ignores the aspect ratio."""

    def __init__(self, size: int | Sequence[int], interpolation: Image.Resampling = _BICUBIC):
        self.size = _pair(size)
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        return image.resize((width, height), self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class RandomResizedCrop(RandomTransform):
    """Crop a random region of random area and aspect ratio, then resize it to ``size``.

    The region covers a fraction of the image area drawn uniformly from ``scale`` and has a
    width/height ratio drawn log-uniformly from ``ratio``; up to 10 draws are tried, after which
    the largest centred region whose ratio is clamped into ``ratio`` is taken. This is the
    torchvision algorithm the original used, and with a PIL input torchvision also cropped and
    resized with PIL, so the same crop box gives the same pixels.

    Args:
        size: output (height, width), or one int for a square.
        scale: (min, max) fraction of the image area the crop covers.
        ratio: (min, max) width/height of the crop.
        interpolation: PIL resampling filter of the final resize.
        seed: see `RandomTransform`.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Image.Resampling = _BICUBIC,
        seed: int | None = None,
    ):
        super().__init__(seed)
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}"
            )
        self.size = _pair(size)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Draw a crop box for an image of ``width`` x ``height``: (top, left, crop_height, crop_width)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        # Every draw fell outside the image (only likely for extreme aspect ratios): centre crop.
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif image_ratio > self.ratio[1]:
            crop_w, crop_h = round(height * self.ratio[1]), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, crop_h, crop_w = self.get_params(image.width, image.height, rng)
        out_h, out_w = self.size
        # crop then resize (not resize(box=...)): the filter then sees only the crop, as in torchvision
        return image.crop((left, top, left + crop_w, top + crop_h)).resize((out_w, out_h), self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip(RandomTransform):
    """Mirror the image left-right with probability ``p``.

    A flip turns "the dog left of the car" into a false caption. Turn flips off for data whose text
    talks about left and right, or flip the text with `swap_left_right` when `get_params` says the
    image was flipped.
    """

    def __init__(self, p: float = 0.5, seed: int | None = None):
        super().__init__(seed)
        self.p = p

    def get_params(self, rng: np.random.Generator) -> bool:
        """Whether to flip."""
        return bool(rng.random() < self.p)

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return ImageOps.mirror(image) if self.get_params(rng) else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


_LEFT_RIGHT = re.compile(r"\b(left|right)", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap "left" and "right" (also as word starts: "leftmost", "right-hand"), keeping the case
    pattern, so that a caption stays true for a mirrored image."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)


def _warp_affine(image: Image.Image, forward: np.ndarray, fill: tuple[int, ...]) -> Image.Image:
    """Warp with the 2x3 ``forward`` matrix given in OpenCV's pixel convention, bilinearly.

    The original maps output pixel p to input ``inverse(forward) @ p`` with pixel i at coordinate
    i; PIL applies its coefficients to pixel centres (i + 0.5) and reads input pixel i at i + 0.5.
    Shifting the translation by half a pixel both ways makes the two mappings identical, so the
    geometry matches the original exactly (shear and rotation included); what remains different is
    interpolation detail: OpenCV's fixed-point bilinear weights and its blending of edge pixels with
    the fill colour, where PIL fills every output pixel whose source lies outside the image.
    """
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    linear, shift = inverse[:, :2], inverse[:, 2]
    shift = shift + 0.5 - 0.5 * linear.sum(axis=1)
    coeffs = (linear[0, 0], linear[0, 1], shift[0], linear[1, 0], linear[1, 1], shift[1])
    return image.transform(
        image.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=fill
    )


def _rotation_matrix(width: int, height: int, degrees: float) -> np.ndarray:
    """Counter-clockwise rotation by ``degrees`` about (width / 2, height / 2) in OpenCV's pixel
    convention, i.e. the matrix ``cv2.getRotationMatrix2D`` gives the original (which puts the
    centre half a pixel right of and below the true image centre)."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = width / 2, height / 2
    return np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])


def apply_randaugment_op(
    image: Image.Image, name: str, arg: float | None = None, fill: tuple[int, int, int] = (128, 128, 128)
) -> Image.Image:
    """Apply one RandAugment operation with its parameter already decided.

    Args:
        image: RGB image.
        name: one of `DEFAULT_RANDAUGMENT_OPS`.
        arg: the operation's signed parameter (None for Identity, AutoContrast, Equalize):
            an enhancement factor (Brightness, Sharpness: 1 keeps the image), a shear factor
            (ShearX: x' = x + arg * y; ShearY: y' = y + arg * x), a translation in pixels
            (TranslateX/Y: the content moves by -arg, as in the original), or an angle in degrees
            (Rotate: counter-clockwise).
        fill: colour of the pixels a geometric operation uncovers.
    """
    if name == "Identity":
        return image
    if name == "AutoContrast":
        # per-channel min/max stretch without cut-off, the original's own re-implementation of PIL
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Brightness":
        return ImageEnhance.Brightness(image).enhance(arg)
    if name == "Sharpness":
        # PIL blends with the 3x3 "smooth" kernel (1s around a centre 5, / 13) and leaves the border
        # pixels alone, like the original, but clips where the original's uint8 cast wraps around.
        return ImageEnhance.Sharpness(image).enhance(arg)
    width, height = image.size
    if name == "ShearX":
        forward = np.array([[1.0, arg, 0.0], [0.0, 1.0, 0.0]])
    elif name == "ShearY":
        forward = np.array([[1.0, 0.0, 0.0], [arg, 1.0, 0.0]])
    elif name == "TranslateX":
        forward = np.array([[1.0, 0.0, -arg], [0.0, 1.0, 0.0]])
    elif name == "TranslateY":
        forward = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -arg]])
    elif name == "Rotate":
        forward = _rotation_matrix(width, height, arg)
    else:
        raise ValueError(
            f"unknown RandAugment operation {name!r}; known: {', '.join(DEFAULT_RANDAUGMENT_OPS)}"
        )
    return _warp_affine(image, forward, fill)


class RandAugment(RandomTransform):
    """ALBEF's RandAugment: ``num_ops`` operations drawn with replacement, each applied with
    probability ``prob`` at a fixed ``magnitude``.

    Per call, as in the original: draw ``num_ops`` names uniformly from ``ops`` (repeats allowed);
    then for each, skip it with probability 1 - ``prob``; if kept, map the magnitude to its
    parameter (see `get_params`), giving the geometric ones a random sign, and apply it.

    Args:
        num_ops: operations drawn per image (the original: 2).
        magnitude: strength in [0, `RANDAUGMENT_MAX_LEVEL`] (the original: 7).
        ops: names to draw from, a subset of `DEFAULT_RANDAUGMENT_OPS`.
        prob: probability that a drawn operation is applied.
        fill: RGB colour uncovered by shear, translation and rotation.
        seed: see `RandomTransform`.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 7,
        ops: Sequence[str] = DEFAULT_RANDAUGMENT_OPS,
        prob: float = 0.5,
        fill: tuple[int, int, int] = (128, 128, 128),
        seed: int | None = None,
    ):
        super().__init__(seed)
        unknown = [op for op in ops if op not in DEFAULT_RANDAUGMENT_OPS]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {DEFAULT_RANDAUGMENT_OPS}, got {list(ops)}")
        if not 0 <= magnitude <= RANDAUGMENT_MAX_LEVEL:
            raise ValueError(f"magnitude must lie in [0, {RANDAUGMENT_MAX_LEVEL}], got {magnitude}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = tuple(ops)
        self.prob = prob
        self.fill = tuple(fill)

    def _parameter(self, name: str, rng: np.random.Generator) -> float | None:
        level = self.magnitude / RANDAUGMENT_MAX_LEVEL
        if name in ("Brightness", "Sharpness"):
            # no sign: at the original's magnitude 7 the factor is 1.36, so these only brighten/sharpen
            return _ENHANCE_BASE + _ENHANCE_SPAN * level
        if name not in _MAX_GEOMETRIC:
            return None
        return _MAX_GEOMETRIC[name] * level * (-1.0 if rng.random() < 0.5 else 1.0)

    def get_params(self, rng: np.random.Generator) -> list[tuple[str, float | None]]:
        """Draw the operations to apply: a list of (name, parameter), in order, skipped ones left
        out. Parameters at magnitude m: Brightness/Sharpness factor 0.1 + 1.8 m/10; ShearX/Y
        ±0.3 m/10; TranslateX/Y ±10 m/10 pixels; Rotate ±30 m/10 degrees."""
        names = rng.choice(len(self.ops), size=self.num_ops, replace=True)
        plan = []
        for index in names:
            # drawn in the original's order: the keep/skip draw first, the sign only for a kept op
            if rng.random() > self.prob:
                continue
            name = self.ops[index]
            plan.append((name, self._parameter(name, rng)))
        return plan

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        image = to_rgb(image)
        for name, arg in self.get_params(rng):
            image = apply_randaugment_op(image, name, arg, self.fill)
        return image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, ops={self.ops}, "
            f"prob={self.prob}, fill={self.fill})"
        )


_CROP_SCALES = {"pretrain": (0.2, 1.0), "finetune": (0.5, 1.0)}
_TASKS = (*_CROP_SCALES, "grounding")


def build_train_transform(
    image_size: int,
    task: str = "pretrain",
    horizontal_flip: bool = True,
    randaugment: bool = True,
    seed: int | None = None,
) -> Compose:
    """The original's training augmentation for ``task``, ending in an RGB image of
    ``image_size`` x ``image_size``.

    - "pretrain": RandomResizedCrop(scale (0.2, 1.0), bicubic) -> flip -> RandAugment(2, 7).
    - "finetune" (retrieval, VQA, NLVR2, SNLI-VE): the same with crop scale (0.5, 1.0).
    - "grounding": no crop, since cropping could cut the referred object out: a bicubic resize to
      the square size -> flip -> RandAugment(2, 7).

    Args:
        image_size: output side in pixels.
        task: "pretrain", "finetune" or "grounding".
        horizontal_flip: whether to flip with probability 0.5 (the original always did; see
            `RandomHorizontalFlip` for why one may not want to).
        randaugment: whether to apply `RandAugment` with the original's settings.
        seed: see `RandomTransform`.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {_TASKS}")
    if task == "grounding":
        geometry: Callable[..., Image.Image] = Resize(image_size)
    else:
        geometry = RandomResizedCrop(image_size, scale=_CROP_SCALES[task])
    transforms: list[Callable[..., Image.Image]] = [to_rgb, geometry]
    if horizontal_flip:
        transforms.append(RandomHorizontalFlip())
    if randaugment:
        transforms.append(RandAugment())
    return Compose(transforms, seed=seed)


def build_eval_transform(image_size: int) -> Compose:
    """The original's test transform: a bicubic resize to ``image_size`` x ``image_size``, in RGB."""
    return Compose([to_rgb, Resize(image_size)])
