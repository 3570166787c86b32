"""Rows of every task as plain dicts with PIL images: a lazy index-addressable dataset, in-memory
Hugging Face ``datasets.Dataset`` builders, the COCO-shaped retrieval test set, and a render benchmark.

Columns (one style for every task; ``*_id`` columns hold the item index within its split):

=========== ==============================================================================
task        columns
=========== ==============================================================================
caption     ``image`` (PIL RGB), ``captions`` (list[str]), ``noisy`` (list[bool]), ``image_id``;
            with ``one_row_per_caption``: ``image``, ``text`` (str), ``noisy`` (bool), ``image_id``
vqa         ``image``, ``question`` (str), ``answers`` (list[str], from the answer list),
            ``weights`` (list[float], sum 1), ``question_type`` (str), ``question_id``
nlvr2       ``image0`` (left), ``image1`` (right), ``sentence`` (str), ``label`` (1 true, 0 false),
            ``pair_id``
ve          ``image``, ``hypothesis`` (str), ``label`` (0 contradiction, 1 neutral, 2 entailment),
            ``image_id``
grounding   ``image``, ``text`` (str), ``box`` ([x0, y0, x1, y1] pixels, x1/y1 exclusive),
            ``candidate_boxes`` (every object's box, list[list[int]]), ``target_index`` (position of
            ``box`` in ``candidate_boxes``), ``image_id``
=========== ==============================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from .config import SyntheticWorldConfig
from .scene import TASKS, item_rng, render_scene, sample_scene
from .tasks import caption_sample, grounding_sample, nlvr_sample, ve_sample, vqa_sample

if TYPE_CHECKING:
    import datasets

__all__ = [
    "RetrievalEval",
    "SyntheticDataset",
    "benchmark_render",
    "build_caption_dataset",
    "build_grounding_dataset",
    "build_nlvr2_dataset",
    "build_retrieval_eval",
    "build_ve_dataset",
    "build_vqa_dataset",
]

Row = dict[str, Any]


def _caption_row(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> Row:
    sample = caption_sample(config, seed, split, index)
    return {
        "image": render_scene(sample.scene),
        "captions": list(sample.captions),
        "noisy": list(sample.noisy),
        "image_id": index,
    }


def _vqa_row(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> Row:
    sample = vqa_sample(config, seed, split, index)
    return {
        "image": render_scene(sample.scene),
        "question": sample.question,
        "answers": list(sample.answers),
        "weights": list(sample.weights),
        "question_type": sample.question_type,
        "question_id": index,
    }


def _nlvr2_row(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> Row:
    sample = nlvr_sample(config, seed, split, index)
    left, right = sample.scenes
    return {
        "image0": render_scene(left),
        "image1": render_scene(right),
        "sentence": sample.sentence,
        "label": sample.label,
        "pair_id": index,
    }


def _ve_row(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> Row:
    sample = ve_sample(config, seed, split, index)
    return {
        "image": render_scene(sample.scene),
        "hypothesis": sample.hypothesis,
        "label": sample.label,
        "image_id": index,
    }


def _grounding_row(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> Row:
    sample = grounding_sample(config, seed, split, index)
    boxes = [list(obj.box) for obj in sample.scene.objects]
    return {
        "image": render_scene(sample.scene),
        "text": sample.text,
        "box": boxes[sample.target],
        "candidate_boxes": boxes,
        "target_index": sample.target,
        "image_id": index,
    }


_ROWS: dict[str, Callable[[SyntheticWorldConfig, int, str, int], Row]] = {
    "caption": _caption_row,
    "vqa": _vqa_row,
    "nlvr2": _nlvr2_row,
    "ve": _ve_row,
    "grounding": _grounding_row,
}


def _features(task: str, one_row_per_caption: bool = False) -> datasets.Features:
    from datasets import Features, Image, List, Value

    text, int64 = Value("string"), Value("int64")
    columns = {
        "caption": {
            "image": Image(),
            "captions": List(text),
            "noisy": List(Value("bool")),
            "image_id": int64,
        },
        "vqa": {
            "image": Image(),
            "question": text,
            "answers": List(text),
            "weights": List(Value("float32")),
            "question_type": text,
            "question_id": int64,
        },
        "nlvr2": {"image0": Image(), "image1": Image(), "sentence": text, "label": int64, "pair_id": int64},
        "ve": {"image": Image(), "hypothesis": text, "label": int64, "image_id": int64},
        "grounding": {
            "image": Image(),
            "text": text,
            "box": List(int64, length=4),
            "candidate_boxes": List(List(int64, length=4)),
            "target_index": int64,
            "image_id": int64,
        },
    }[task]
    if one_row_per_caption:
        columns = {"image": Image(), "text": text, "noisy": Value("bool"), "image_id": int64}
    return Features(columns)


def _resolve_config(config: SyntheticWorldConfig | None, image_size: int | None) -> SyntheticWorldConfig:
    config = config or SyntheticWorldConfig()
    return config if image_size is None else replace(config, image_size=image_size)


class SyntheticDataset:
    """``num_items`` rows of one task, generated on access (no ``datasets``, no torch needed; works as
    a ``torch.utils.data.Dataset`` and in DataLoader workers). Row ``i`` is the same whenever and
    wherever it is generated. Columns: see the module docstring.

    Args:
        task: "caption", "vqa", "nlvr2", "ve" or "grounding".
        split: "train" or "test" (test layouts never occur in train; caption noise only in train).
        num_items: number of rows.
        seed: world seed.
        config: world configuration (defaults to ``SyntheticWorldConfig()``).
        image_size: overrides ``config.image_size`` when given.
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        num_items: int = 10_000,
        seed: int = 0,
        config: SyntheticWorldConfig | None = None,
        image_size: int | None = None,
    ) -> None:
        if task not in _ROWS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(_ROWS)}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if num_items < 0 or seed < 0:
            raise ValueError("num_items and seed must be non-negative")
        self.task, self.split, self.num_items, self.seed = task, split, num_items, seed
        self.config = _resolve_config(config, image_size)

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> Row:
        if not -self.num_items <= index < self.num_items:
            raise IndexError(f"index {index} out of range for {self.num_items} items")
        return _ROWS[self.task](self.config, self.seed, self.split, index % self.num_items)

    def to_hf_dataset(self, one_row_per_caption: bool = False) -> datasets.Dataset:
        """All rows as an in-memory ``datasets.Dataset`` (images stored as PNG via ``datasets.Image``)."""
        from datasets import Dataset

        if one_row_per_caption and self.task != "caption":
            raise ValueError("one_row_per_caption applies to the caption task only")
        rows = [self[i] for i in range(self.num_items)]
        if one_row_per_caption:
            rows = [
                {"image": row["image"], "text": text, "noisy": noisy, "image_id": row["image_id"]}
                for row in rows
                for text, noisy in zip(row["captions"], row["noisy"], strict=True)
            ]
        features = _features(self.task, one_row_per_caption)
        return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def build_caption_dataset(
    split: str = "train",
    num_images: int = 10_000,
    seed: int = 0,
    image_size: int | None = None,
    config: SyntheticWorldConfig | None = None,
    one_row_per_caption: bool = False,
) -> datasets.Dataset:
    """Image-caption data for pretraining (train, with noisy captions) or retrieval (test, clean).

    Columns: ``image``, ``captions`` (``config.captions_per_image`` strings), ``noisy`` (one flag per
    caption), ``image_id``; with ``one_row_per_caption=True`` one row per (image, caption) pair with
    ``text`` and a scalar ``noisy`` instead.
    """
    dataset = SyntheticDataset("caption", split, num_images, seed, config, image_size)
    return dataset.to_hf_dataset(one_row_per_caption)


def build_vqa_dataset(
    split: str = "train",
    num_questions: int = 10_000,
    seed: int = 0,
    image_size: int | None = None,
    config: SyntheticWorldConfig | None = None,
) -> datasets.Dataset:
    """One question per image. Columns: ``image``, ``question``, ``answers``, ``weights``,
    ``question_type``, ``question_id``; answers come from ``vqa_answer_list(config)``."""
    return SyntheticDataset("vqa", split, num_questions, seed, config, image_size).to_hf_dataset()


def build_nlvr2_dataset(
    split: str = "train",
    num_pairs: int = 10_000,
    seed: int = 0,
    image_size: int | None = None,
    config: SyntheticWorldConfig | None = None,
) -> datasets.Dataset:
    """Balanced true/false statements about image pairs. Columns: ``image0``, ``image1``,
    ``sentence``, ``label`` (1 true), ``pair_id``."""
    return SyntheticDataset("nlvr2", split, num_pairs, seed, config, image_size).to_hf_dataset()


def build_ve_dataset(
    split: str = "train",
    num_hypotheses: int = 10_000,
    seed: int = 0,
    image_size: int | None = None,
    config: SyntheticWorldConfig | None = None,
) -> datasets.Dataset:
    """Balanced visual entailment. Columns: ``image``, ``hypothesis``, ``label`` (0 contradiction,
    1 neutral, 2 entailment), ``image_id``."""
    return SyntheticDataset("ve", split, num_hypotheses, seed, config, image_size).to_hf_dataset()


def build_grounding_dataset(
    split: str = "train",
    num_expressions: int = 10_000,
    seed: int = 0,
    image_size: int | None = None,
    config: SyntheticWorldConfig | None = None,
) -> datasets.Dataset:
    """Referring expressions, one per image of 2+ objects. Columns: ``image``, ``text``, ``box``,
    ``candidate_boxes``, ``target_index``, ``image_id``; boxes in pixels of ``image_size``."""
    return SyntheticDataset("grounding", split, num_expressions, seed, config, image_size).to_hf_dataset()


@dataclass
class RetrievalEval:
    """Zero-shot retrieval test set in the shape of ALBEF's COCO/Flickr evaluation.

    Attributes:
        images: ``N`` PIL images.
        texts: ``N * captions_per_image`` captions, image by image.
        txt2img: ``txt2img[t]`` is the index of the image of text ``t``.
        img2txt: ``img2txt[i]`` lists the indices of the texts of image ``i``.
    """

    images: list[Image.Image]
    texts: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]


def build_retrieval_eval(
    num_images: int = 500,
    seed: int = 0,
    image_size: int | None = None,
    config: SyntheticWorldConfig | None = None,
) -> RetrievalEval:
    """The first ``num_images`` test images with their ``config.captions_per_image`` (default 5)
    clean captions; the same images and captions as ``build_caption_dataset("test", ...)``."""
    dataset = SyntheticDataset("caption", "test", num_images, seed, config, image_size)
    images, texts, txt2img, img2txt = [], [], [], []
    for i in range(num_images):
        row = dataset[i]
        images.append(row["image"])
        img2txt.append(list(range(len(texts), len(texts) + len(row["captions"]))))
        texts.extend(row["captions"])
        txt2img.extend([i] * len(row["captions"]))
    return RetrievalEval(images, texts, txt2img, img2txt)


def benchmark_render(num_images: int = 2000, image_size: int = 64, seed: int = 0) -> float:
    """Images per second of scene sampling plus rendering on this machine (text excluded)."""
    config = SyntheticWorldConfig(image_size=image_size)
    start = time.perf_counter()
    for i in range(num_images):
        render_scene(sample_scene(item_rng(seed, "train", "caption", i), config, seed, "train"))
    return num_images / (time.perf_counter() - start)


def _benchmark_rows(task: str, num_items: int, image_size: int) -> float:
    dataset = SyntheticDataset(task, "train", num_items, image_size=image_size)
    start = time.perf_counter()
    for i in range(num_items):
        dataset[i]
    return num_items / (time.perf_counter() - start)


def main() -> None:
    for size in (64, 96):
        print(f"{size} px: render {benchmark_render(image_size=size):7.0f} images/s", end="")
        for task in TASKS:
            print(f" | {task} {_benchmark_rows(task, 500, size):6.0f} rows/s", end="")
        print()
