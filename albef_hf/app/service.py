"""What the interactive page serves, without the page: a checkpoint loaded once, the pipelines built on it, the
galleries it searches, and one method per request that returns plain values (the page formats them).

Every request goes through the albef_hf pipelines; bad input raises `ValueError` with a message for the user.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from transformers import AutoProcessor, PreTrainedConfig, pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.utils import logging

from .. import (
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefModel,
)
from ..modelcard import served_pipelines
from ..pipelines import load_image
from ..retrieval_index import AlbefRetrievalIndex

__all__ = ["GRADCAM_MODES", "TABS", "AlbefAppService", "Gallery", "load_checkpoint"]

# The page's tabs, in order.
TABS = ("match", "search", "zero-shot", "vqa")

# Grad-CAM variants of the Match tab: ITC on an early ViT block localises in small models (see the README's
# grounding results); the paper's ITM Grad-CAM on a fusion layer is the other choice.
GRADCAM_MODES = {
    "ITC, early ViT block (localises in small models)": "itc",
    "ITM, fusion layer (the paper's)": "itm",
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# The optional answer list of a VQA checkpoint (the original's file name), next to its weights.
ANSWER_LIST_FILE = "answer_list.json"

ProgressCallback = Callable[[float, str], None]


# The classes a checkpoint can be saved from, by name.
MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        AlbefModel,
        AlbefForPreTraining,
        AlbefForImageTextRetrieval,
        AlbefForQuestionAnswering,
        AlbefForVisualReasoning,
        AlbefForTextAssignment,
        AlbefForVisualEntailment,
    )
}


def load_checkpoint(
    model: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None
) -> tuple[Any, Any]:
    """An ALBEF checkpoint (a saved, trained or converted folder, or a Hub id) as `(model, processor)`, the model
    in the class it was saved from.

    A class albef_hf does not have loads from the checkpoint's own code, with `trust_remote_code=True`.

    Raises:
        ValueError: for a checkpoint that is not ALBEF, or whose class needs its own code without
            `trust_remote_code`.
    """
    model = os.fspath(model)
    hub = {} if revision is None else {"revision": revision}
    config, _ = PreTrainedConfig.get_config_dict(model, **hub)
    if config.get("model_type") != "albef":
        raise ValueError(f"{model} is not an ALBEF checkpoint (model_type {config.get('model_type')!r})")
    saved_as = (config.get("architectures") or ["AlbefModel"])[0]
    model_class = MODEL_CLASSES.get(saved_as)
    if model_class is None:
        reference = next(
            (ref for ref in (config.get("auto_map") or {}).values() if ref.endswith(f".{saved_as}")), None
        )
        if reference is None or not trust_remote_code:
            raise ValueError(
                f"{model} was saved from {saved_as}, which albef_hf does not have"
                + ("" if reference is None else ": it loads with its own code, pass --trust-remote-code")
            )
        model_class = get_class_from_dynamic_module(reference, model, **hub)
    loaded = model_class.from_pretrained(model, trust_remote_code=trust_remote_code, **hub).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code, **hub)
    return loaded, processor


def albef_class_name(model_class: type) -> str:
    """The name of the ALBEF class `model_class` is or derives from (a class of a checkpoint's own code is served
    as its ALBEF base), else its own name."""
    return next(
        (cls.__name__ for cls in model_class.__mro__ if cls.__name__ in MODEL_CLASSES), model_class.__name__
    )


@dataclass
class Gallery:
    """What the Search tab searches: images (queried by text) and captions (queried by image).

    Args:
        images: the gallery images (PIL) and their names.
        captions: the caption gallery, or None (then image queries are not served).
        source: where they come from, for the page.
    """

    images: list[PIL.Image.Image]
    names: list[str]
    captions: list[str] | None
    source: str

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, captions_file: str | os.PathLike | None = None
    ) -> Gallery:
        """The images of `folder` (by name; unreadable files are skipped, with a warning) and, when given, the
        captions of `captions_file` (one a line).

        Raises:
            ValueError: for a folder without readable images, or an empty captions file.
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"the gallery {folder!r} is not a folder")
        images, names = [], []
        for name in sorted(os.listdir(folder)):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            try:
                images.append(load_image(os.path.join(folder, name)))
            except ValueError as error:
                logging.get_logger(__name__).warning("gallery: skipping %s (%s)", name, error)
                continue
            names.append(name)
        if not images:
            raise ValueError(f"the gallery {folder!r} holds no readable image ({', '.join(IMAGE_SUFFIXES)})")
        captions = None
        if captions_file is not None:
            with open(captions_file, encoding="utf-8") as handle:
                captions = [line.strip() for line in handle if line.strip()]
            if not captions:
                raise ValueError(f"the captions file {os.fspath(captions_file)!r} holds no caption")
        return cls(images, names, captions, f"{len(images)} images of {folder}")

    @classmethod
    def synthetic(cls, num_images: int, image_size: int, seed: int = 0) -> Gallery:
        """`num_images` held-out scenes of the synthetic world (never seen in training) at `image_size` px, and
        their captions (5 each)."""
        from ..data.synthetic import SyntheticWorldConfig, build_retrieval_eval

        scenes = build_retrieval_eval(
            num_images, seed=seed, config=SyntheticWorldConfig(image_size=image_size)
        )
        names = [f"test scene {index}" for index in range(num_images)]
        source = f"{num_images} held-out scenes of the synthetic world (seed {seed})"
        return cls(list(scenes.images), names, list(scenes.texts), source)


@dataclass
class _Indexes:
    images: AlbefRetrievalIndex | None = None
    captions: AlbefRetrievalIndex | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class AlbefAppService:
    """One ALBEF checkpoint and the pipelines the page calls.

    Args:
        model, processor: as `load_checkpoint` returns them.
        zero_shot: transformers' `zero-shot-image-classification` pipeline on the same checkpoint (it loads it as
            `AlbefModel`), or None.
        gallery: what Search searches (indexed on first use, once); None: Search is not served.
        answer_list: candidate answers of a VQA checkpoint (ranked); None: answers are generated.
        gradcam_block: the ViT block of the ITC Grad-CAM.
        name: the checkpoint's name, for the page.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        zero_shot: Any = None,
        gallery: Gallery | None = None,
        answer_list: Sequence[str] | None = None,
        gradcam_block: int = 1,
        name: str = "",
    ) -> None:
        self.model, self.processor, self.zero_shot_pipeline = model, processor, zero_shot
        self.gallery, self.name, self.gradcam_block = gallery, name, gradcam_block
        self.answer_list = list(answer_list) if answer_list else None
        self.saved_as = type(model).__name__
        self.served = served_pipelines(albef_class_name(type(model)))
        # the pipelines share the loaded model; one request runs at a time (the retrieval pipeline keeps the
        # queried index as state, and CPU requests gain nothing from running together)
        self._lock = threading.Lock()
        self._indexes = _Indexes()
        self.pipelines = {
            task: pipeline(task, model=model, processor=processor)
            for task in (
                "image-text-matching",
                "image-text-retrieval",
                "visual-grounding",
                "visual-question-answering",
            )
            if task in self.served
        }

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        gallery: Gallery | None = None,
        answer_list: Sequence[str] | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        gradcam_block: int = 1,
    ) -> AlbefAppService:
        """Load a checkpoint (see `load_checkpoint`) and its zero-shot pipeline when it serves one; a VQA
        checkpoint's `answer_list.json` is its answer list unless `answer_list` is given."""
        model = os.fspath(model)
        loaded, processor = load_checkpoint(model, trust_remote_code, revision)
        served = served_pipelines(albef_class_name(type(loaded)))
        zero_shot = None
        if "zero-shot-image-classification" in served:
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()  # AlbefModel from a pretraining folder reports the heads it leaves
            try:
                zero_shot = pipeline(
                    "zero-shot-image-classification",
                    model=model,
                    revision=revision,
                    trust_remote_code=trust_remote_code,
                )
            finally:
                logging.set_verbosity(verbosity)
        if answer_list is None and "visual-question-answering" in served:
            answer_list = _saved_answer_list(model, revision)
        return cls(loaded, processor, zero_shot, gallery, answer_list, gradcam_block, name=model)

    def available(self) -> dict[str, str | None]:
        """Each tab: None when this checkpoint serves it, else why not (shown on the page)."""
        no_itm = (
            f"{self.saved_as} has no ITM head: matching and search need a checkpoint saved from AlbefForPreTraining "
            "or AlbefForImageTextRetrieval"
        )
        reasons = {
            "match": None if "image-text-matching" in self.pipelines else no_itm,
            "search": None if "image-text-retrieval" in self.pipelines else no_itm,
            "zero-shot": None
            if self.zero_shot_pipeline is not None
            else f"{self.saved_as} has no ITC projections (zero-shot classification compares image and label "
            "features)",
            "vqa": None
            if "visual-question-answering" in self.pipelines
            else f"{self.saved_as} does not answer questions (an AlbefForQuestionAnswering checkpoint does)",
        }
        if reasons["search"] is None and self.gallery is None:
            reasons["search"] = "no gallery was given"
        return reasons

    # ------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------

    def match(self, image: Any, text: str, mode: str = "itc") -> dict[str, Any]:
        """ITM probability, ITC similarity and the Grad-CAM overlay (`mode` "itc" on the configured ViT block, or
        "itm" on the default fusion layer) of one image and one text."""
        image, text = _image(image), _text(text)
        if mode not in ("itc", "itm"):
            raise ValueError(f"unknown Grad-CAM mode {mode!r}")
        layer = self.gradcam_block if mode == "itc" else None
        with self._lock:
            scores = self.pipelines["image-text-matching"](image, text)
            grounding = self.pipelines["visual-grounding"](image, text, mode=mode, layer=layer)
        return {
            "itm_probability": scores["itm_probability"],
            "itc_similarity": scores["itc_similarity"],
            "overlay": grounding["overlay"],
        }

    def index(
        self, progress: ProgressCallback | None = None
    ) -> tuple[AlbefRetrievalIndex, AlbefRetrievalIndex | None]:
        """The gallery's image and caption indexes, built on the first call (`progress(fraction, what)` reports
        how far) and kept."""
        if self.gallery is None:
            raise ValueError("no gallery to search: start the app with --gallery")
        indexes = self._indexes
        with indexes.lock:
            if indexes.images is None:
                indexes.images, indexes.captions = self._build_indexes(
                    progress or (lambda fraction, what: None)
                )
        return indexes.images, indexes.captions

    def _build_indexes(
        self, progress: ProgressCallback
    ) -> tuple[AlbefRetrievalIndex, AlbefRetrievalIndex | None]:
        retriever, gallery = self.pipelines["image-text-retrieval"], self.gallery
        images, count, chunk = gallery.images, len(gallery.images), 64
        config = retriever.model.config
        image_index = AlbefRetrievalIndex(
            "image", config.embed_dim, config.vision_config.hidden_size, model_name=self.name or None
        )
        # the image index is built in chunks so that the page can show progress; each chunk's features depend on
        # its images only, so adding the chunks one after the other gives the index of the whole gallery
        for start in range(0, count, chunk):
            progress(start / count, f"indexing images {start}/{count}")
            with self._lock:
                part = retriever.build_index(
                    images=images[start : start + chunk], batch_size=chunk, progress=False
                )
            image_index.add(
                part.features,
                part.item_tokens(torch.arange(len(part)))[0],
                ids=list(gallery.names[start : start + chunk]),
            )
        caption_index = None
        if gallery.captions:
            progress(1.0, f"indexing {len(gallery.captions)} captions")
            with self._lock:
                caption_index = retriever.build_index(texts=gallery.captions, progress=False)
        return image_index, caption_index

    def search_images(self, text: str, top_k: int = 5) -> list[dict[str, Any]]:
        """The gallery images best matching `text`, best first: `{"image", "name", "score", "itm_probability",
        "itc_similarity"}`."""
        text = _text(text)
        images, _ = self.index()
        with self._lock:
            results = self.pipelines["image-text-retrieval"](text, index=images, top_k=top_k)
        return [
            {**result, "image": self.gallery.images[result["index"]], "name": result["id"]}
            for result in results
        ]

    def search_captions(self, image: Any, top_k: int = 5) -> list[dict[str, Any]]:
        """The gallery captions best matching `image`, best first: `{"text", "score", "itm_probability",
        "itc_similarity"}`."""
        image = _image(image)
        _, captions = self.index()
        if captions is None:
            raise ValueError("this gallery has no captions to search (start the app with --captions FILE)")
        with self._lock:
            return self.pipelines["image-text-retrieval"](image, index=captions, top_k=top_k)

    def zero_shot(self, image: Any, labels: str, template: str = "a picture of a {}") -> dict[str, float]:
        """Probabilities of comma-separated `labels` for `image` (transformers' zero-shot pipeline, ITC)."""
        image = _image(image)
        names = list(dict.fromkeys(label.strip() for label in (labels or "").split(",") if label.strip()))
        if not names:
            raise ValueError("give labels, separated by commas")
        if "{}" not in (template or ""):
            raise ValueError("the label template needs a {} where the label goes")
        with self._lock:
            results = self.zero_shot_pipeline(image, candidate_labels=names, hypothesis_template=template)
        return {result["label"]: result["score"] for result in results}

    def vqa(self, image: Any, question: str, top_k: int = 5) -> list[dict[str, Any]]:
        """Answers to `question` about `image`, best first: ranked over the answer list (`{"answer", "score"}`) when
        the checkpoint has one, else generated (`{"answer"}`, beam search)."""
        image, question = _image(image), _text(question, "question")
        answering = self.pipelines["visual-question-answering"]
        with self._lock:
            if self.answer_list:
                return answering(image, question, candidate_answers=self.answer_list, top_k=top_k)
            return answering(image, question, top_k=min(top_k, 3))


def _saved_answer_list(model: str, revision: str | None) -> list[str] | None:
    path = os.path.join(model, ANSWER_LIST_FILE)
    if not os.path.isdir(model):
        try:
            path = hf_hub_download(model, ANSWER_LIST_FILE, revision=revision)
        except (EntryNotFoundError, HfHubHTTPError, OSError):  # no answer list in the repository, or offline
            return None
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        answers = json.load(handle)
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise ValueError(f"{path} must hold a json list of answer strings")
    return answers


def _image(image: Any) -> PIL.Image.Image:
    if image is None:
        raise ValueError("upload an image first")
    return load_image(image)


def _text(text: Any, what: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"type a {what} first")
    return text.strip()
