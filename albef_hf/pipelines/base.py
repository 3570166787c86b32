"""What the ALBEF pipelines share: input checks and image loading, the checkpoint loader that `pipeline()` uses,
and `AlbefPipeline`, the base class (the `AlbefProcessor`, the model check and image/text encoding)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedConfig
from transformers.image_utils import load_image as transformers_load_image
from transformers.pipelines import Pipeline
from transformers.utils import logging

from ..image_processing_albef import to_pil_rgb
from ..processing_albef import AlbefProcessor

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _where(position: int | None, what: str = "image") -> str:
    return f"{what} {position}: " if position is not None else ""


def check_image(image: Any, position: int | None = None) -> Any:
    """Cheap checks of one image before anything runs: its type, an empty string, a missing file, a zero size.

    Returns the image with a path-like or a `file://` URL as a path string (anything else as it was given).

    Raises:
        ValueError: naming `position` and the problem.
    """
    where = _where(position)
    if isinstance(image, (list, tuple, dict)):
        raise ValueError(f"{where}expected one image, got a {type(image).__name__}")
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        if not image.strip():
            raise ValueError(f"{where}got an empty string where an image (a path or a URL) is expected")
        if image.startswith("file://"):
            image = _file_url_path(image)
        elif image.startswith(_URL_PREFIXES):
            return image
        if not os.path.isfile(image):
            raise ValueError(
                f"{where}{image[:80]!r} is neither an existing image file nor a URL "
                "(a text where an image is expected?)"
            )
        return image
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where}got an empty image of size {image.width}x{image.height}")
        return image
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim not in (2, 3) or 0 in image.shape:
            raise ValueError(f"{where}got an image array of shape {tuple(image.shape)}")
        return image
    raise ValueError(
        f"{where}expected a PIL image, a numpy array, a torch tensor, a path or a URL, got {type(image).__name__}"
    )


# Image strings read by transformers' `load_image`; paths are read by `to_pil_rgb`, as the processor reads them.
_URL_PREFIXES = ("http://", "https://", "data:image/")


def load_image(image: Any, position: int | None = None, timeout: float | None = None) -> PIL.Image.Image:
    """One image as an 8-bit RGB PIL image.

    http(s) URLs and base64 `data:image/` strings go through transformers' `load_image`; paths (and `file://`
    URLs), PIL images, numpy arrays and torch tensors through `to_pil_rgb`, as the processor and the training
    readers read them (so a file gives the same pixels as the PIL image opened from it: no EXIF transpose).

    Raises:
        ValueError: naming `position` and the problem, for anything that is not a readable, non-empty image.
    """
    image = check_image(image, position)
    try:
        if isinstance(image, str) and image.startswith(_URL_PREFIXES):
            try:
                image = transformers_load_image(image, timeout=timeout)
            except (OSError, PIL.UnidentifiedImageError) as error:
                raise ValueError(f"could not read an image from {image[:80]!r}: {error}") from error
        return to_pil_rgb(image)
    except ValueError as error:
        raise ValueError(f"{_where(position)}{error}") from error


def _file_url_path(url: str) -> str:
    return unquote(urlparse(url).path)


def check_text(text: Any, position: int | None = None) -> str:
    """One text: a non-blank string.

    Raises:
        ValueError: naming `position` and the problem.
    """
    where = _where(position, "text")
    if not isinstance(text, str):
        raise ValueError(f"{where}expected a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}got an empty text")
    return text


def _is_batch(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _as_list(value: Any, name: str) -> list[Any]:
    items = list(value) if _is_batch(value) else [value]
    if not items:
        raise ValueError(f"got an empty list of {name}")
    return items


def pair_inputs(images: Any, texts: Any, text_key: str = "text") -> tuple[list[dict[str, Any]], bool]:
    """Normalise `(images, texts)` into a list of `{"image", "text"}` pairs, and whether one pair was given.

    Accepted: one image and one text; one image and a list of texts (the image with each text) or the reverse;
    two lists of one length (image i with text i); or, with `texts=None`, a `{"image", text_key}` dict or a list
    of them.

    Raises:
        ValueError: on missing texts, lists of different lengths, empty lists, or a bad image or text.
    """
    if texts is None:
        single = isinstance(images, dict)
        items = _as_list(images, "inputs")
        if not all(isinstance(item, dict) and {"image", text_key} <= item.keys() for item in items):
            raise ValueError(
                f"give images with `{text_key}=...`, or {{'image': ..., '{text_key}': ...}} dicts: "
                f"got no {text_key} for the images"
            )
        pairs = [{"image": item["image"], "text": item[text_key]} for item in items]
    else:
        single = not _is_batch(images) and not _is_batch(texts)
        image_list, text_list = _as_list(images, "images"), _as_list(texts, "texts")
        if len(image_list) != len(text_list) and 1 not in (len(image_list), len(text_list)):
            raise ValueError(
                f"image i pairs with text i, but got {len(image_list)} images and {len(text_list)} texts"
            )
        count = max(len(image_list), len(text_list))
        image_list = image_list * count if len(image_list) == 1 else image_list
        text_list = text_list * count if len(text_list) == 1 else text_list
        pairs = [{"image": image, "text": text} for image, text in zip(image_list, text_list, strict=True)]
    for position, pair in enumerate(pairs):
        check_image(pair["image"], position)
        check_text(pair["text"], position)
    return pairs, single


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------


class _CheckpointLoader:
    """`from_pretrained` that loads a folder with the ALBEF class it was saved from, when that class serves the
    task (`classes`), and refuses any other checkpoint: loading it as another class would leave the task's head
    randomly initialised."""

    task = ""
    classes: tuple[type, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        hub_keys = ("revision", "token", "cache_dir", "local_files_only", "subfolder")
        config_dict, _ = PreTrainedConfig.get_config_dict(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in hub_keys if key in kwargs}
        )
        saved_as = (config_dict.get("architectures") or [None])[0]
        by_name = {model_class.__name__: model_class for model_class in cls.classes}
        if config_dict.get("model_type") != "albef" or saved_as not in by_name:
            raise ValueError(
                f"the {cls.task} pipeline serves ALBEF checkpoints saved from {sorted(by_name)}; "
                f"{pretrained_model_name_or_path} was saved from {saved_as or 'an unknown class'}"
            )
        return by_name[saved_as].from_pretrained(pretrained_model_name_or_path, **kwargs)


def checkpoint_loader(task: str, classes: Sequence[type]) -> type:
    """A model "class" for `PIPELINE_REGISTRY.register_pipeline(pt_model=...)` that loads the checkpoint's own
    ALBEF class when it is one of `classes`."""
    return type(
        f"AlbefCheckpointLoader[{task}]", (_CheckpointLoader,), {"task": task, "classes": tuple(classes)}
    )


# ----------------------------------------------------------------------------------------------
# Base pipeline
# ----------------------------------------------------------------------------------------------


class AlbefPipeline(Pipeline):
    """What the ALBEF pipelines share: the `AlbefProcessor`, the model check and image/text encoding.

    Subclasses name the model classes whose checkpoints hold what their task needs (`checkpoint_classes`) and
    the model methods they call (`required_methods`).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    checkpoint_classes: tuple[str, ...] = ()
    required_methods: tuple[str, ...] = ("encode_image", "encode_text", "project_image", "project_text")

    def __init__(self, model, *args, processor=None, tokenizer=None, image_processor=None, **kwargs):
        if processor is None and tokenizer is not None and image_processor is not None:
            processor = AlbefProcessor(image_processor, tokenizer)
        if processor is None or not hasattr(processor, "tokenize"):
            raise ValueError(
                f"the {type(self).__name__} needs an AlbefProcessor (pass `processor=`), got {type(processor).__name__}"
            )
        super().__init__(model, *args, processor=processor, **kwargs)
        missing = [name for name in self.required_methods if not hasattr(self.model, name)]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs a model with {', '.join(missing)} "
                f"({' or '.join(self.checkpoint_classes)}), got {type(self.model).__name__}"
            )
        saved_as = (getattr(self.model.config, "architectures", None) or [None])[0]
        if saved_as not in (None, type(self.model).__name__, *self.checkpoint_classes):
            logger.warning(
                "%s: the weights were saved from %s, which lacks parts this task uses: unless the model was "
                "trained since, they are randomly initialised",
                type(self).__name__,
                saved_as,
            )
        self.model.eval()

    def _sanitize_parameters(self, timeout: float | None = None):
        preprocess = {} if timeout is None else {"timeout": timeout}
        return preprocess, {}, {}

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens and projected features of processed images."""
        embeds = self.model.encode_image(pixel_values).last_hidden_state
        return embeds, self.model.project_image(embeds)

    def encode_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unimodal text tokens and projected features of tokenised texts."""
        embeds = self.model.encode_text(input_ids, attention_mask).last_hidden_state
        return embeds, self.model.project_text(embeds)

    def process_image(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        return dict(self.processor(images=[load_image(image, timeout=timeout)], return_tensors="pt"))

    def process_text(self, text: str) -> dict[str, torch.Tensor]:
        return dict(self.processor(text=[text], return_tensors="pt"))
