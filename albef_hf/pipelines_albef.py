"""transformers pipelines for ALBEF: image-text matching, retrieval, feature extraction, visual question
answering and visual grounding.

Each pipeline reads images as PIL images, numpy arrays, torch tensors, paths, `file://` URLs (these as the
processor reads them), http(s) URLs or base64 strings (transformers' `load_image`), and texts as strings; it takes
one item or a list, batches with `batch_size`, and runs on the `device` / `dtype` given to `pipeline()`. Inputs
are checked before any model call: an empty text, an empty image, a text where an image is expected and the
like raise a `ValueError` that names the item and the problem.

Importing albef_hf registers the tasks with transformers (see `albef_hf/__init__.py`); a saved model folder also
declares them in `config.custom_pipelines` and carries this module, so that `pipeline(task, model=repo,
trust_remote_code=True)` works where albef_hf is not installed. For that the module is flat and imports only
its neighbours in the package.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedConfig
from transformers.image_utils import load_image as transformers_load_image
from transformers.pipelines import FeatureExtractionPipeline, Pipeline
from transformers.utils import logging

from .grounding import gradcam_itc, gradcam_itm, score_boxes, upsample_heatmap
from .image_processing_albef import to_pil_rgb
from .processing_albef import AlbefProcessor
from .retrieval_index import AlbefRetrievalIndex, build_retrieval_index

__all__ = [
    "AlbefFeatureExtractionPipeline",
    "AlbefImageTextMatchingPipeline",
    "AlbefImageTextRetrievalPipeline",
    "AlbefPipeline",
    "AlbefVisualGroundingPipeline",
    "AlbefVisualQuestionAnsweringPipeline",
    "FeatureExtractionDispatch",
    "checkpoint_loader",
    "load_image",
    "overlay_heatmap",
]

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


# ----------------------------------------------------------------------------------------------
# Image-text matching
# ----------------------------------------------------------------------------------------------


class AlbefImageTextMatchingPipeline(AlbefPipeline):
    """Scores image-text pairs: the ITM probability that they match and their ITC cosine similarity.

    Example:
        >>> matcher = pipeline("image-text-matching", model="path/to/albef")
        >>> matcher(image, ["a red circle", "two blue squares"])
        [{'text': 'a red circle', 'itm_probability': 0.97, 'itc_similarity': 0.41}, ...]

    Call with `(image, text)`, an image and a list of texts (or the reverse), two lists of one length (pair i
    is image i with text i), or `{"image": ..., "text": ...}` dicts. One pair gives one dict, otherwise a list.
    """

    checkpoint_classes = ("AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = (*AlbefPipeline.required_methods, "itm_logits")

    def __call__(self, images: Any, text: str | list[str] | None = None, **kwargs):
        pairs, single = pair_inputs(images, text)
        results = super().__call__(pairs, **kwargs)
        return results[0] if single else results

    def preprocess(self, pair: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        image = load_image(pair["image"], timeout=timeout)
        inputs = self.processor(images=[image], text=[pair["text"]], pairs=True, return_tensors="pt")
        return {**inputs, "text": pair["text"]}

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        image_embeds, image_feat = self.encode_images(inputs["pixel_values"])
        text_embeds, text_feat = self.encode_texts(inputs["input_ids"], inputs["attention_mask"])
        return {
            "itm_logits": self.model.itm_logits(text_embeds, inputs["attention_mask"], image_embeds),
            "itc_similarity": (image_feat * text_feat).sum(dim=-1),
            "text": inputs["text"],
        }

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": outputs["text"],
            "itm_probability": outputs["itm_logits"].float().softmax(dim=-1)[0, 1].item(),
            "itc_similarity": outputs["itc_similarity"].float()[0].item(),
        }


# ----------------------------------------------------------------------------------------------
# Image-text retrieval
# ----------------------------------------------------------------------------------------------


class AlbefImageTextRetrievalPipeline(AlbefPipeline):
    """Retrieval as ALBEF evaluates it: an ITC shortlist of `k` gallery items, re-ranked by the ITM head.

    Build the index of a gallery once (`build_index`, batched), then query it with texts (an image gallery) or
    images (a text gallery). Each query returns its `top_k` items, best first, as dicts with the item's
    `index` in the gallery, its `id`, `score` (the ITM "match" logit, the original's ranking score),
    `itm_probability` and `itc_similarity` (and `text` for a text gallery).

    Example:
        >>> retriever = pipeline("image-text-retrieval", model="path/to/albef")
        >>> index = retriever.build_index(images=gallery_paths, batch_size=64)
        >>> retriever("a red circle above a blue square", top_k=5)
        >>> index.save("gallery-index")  # later: pipeline(..., index="gallery-index")
    """

    checkpoint_classes = ("AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = (*AlbefPipeline.required_methods, "itm_logits")

    def __init__(self, *args, **kwargs):
        self.index: AlbefRetrievalIndex | None = None
        super().__init__(*args, **kwargs)

    def _sanitize_parameters(
        self,
        index: AlbefRetrievalIndex | str | os.PathLike | None = None,
        top_k: int | None = None,
        k: int | None = None,
        itm_batch_size: int | None = None,
        timeout: float | None = None,
    ):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        if index is not None:
            self.index = _as_index(index)
        forward = {}
        if k is not None:
            forward["k"] = _positive(k, "k")
        if itm_batch_size is not None:
            forward["itm_batch_size"] = _positive(itm_batch_size, "itm_batch_size")
        postprocess = {} if top_k is None else {"top_k": _positive(top_k, "top_k")}
        return preprocess, forward, postprocess

    @torch.no_grad()
    def build_index(
        self,
        images: Sequence[Any] | None = None,
        texts: Sequence[str] | None = None,
        ids: Sequence[str | int] | None = None,
        batch_size: int | None = None,
        timeout: float | None = None,
        directory: str | os.PathLike | None = None,
        chunk_size: int = 4096,
        progress: bool = True,
        **index_options: Any,
    ) -> AlbefRetrievalIndex:
        """Encode a gallery of `images` or of `texts` in batches of `batch_size` (the pipeline's, else 32).

        The index also becomes this pipeline's default index. `ids` name the items (default: the path of an image
        given as a path, else its position). With a `directory` the build writes there in chunks of `chunk_size`
        items, continues after the finished chunks when run again, and under `torchrun` / `accelerate launch`
        (with a process group) shares the chunks between the processes (see `build_retrieval_index`).

        Args:
            **index_options: `index_type` ("flat", exact, the default; "hnsw", "ivf", "ivfpq"), `token_dtype`
                (default: torch.float32 in memory, torch.float16 in a `directory`), `store_tokens` (False: keep
                the image paths or texts and encode the shortlist again at query time), `nprobe`, `ef_search`.

        Raises:
            ValueError: for no gallery or both, an empty one, a bad item or `ids` of another length.
        """
        if (images is None) == (texts is None):
            raise ValueError("build_index needs a gallery of `images` or of `texts` (one of them)")
        modality = "image" if images is not None else "text"
        items = _as_list(images if images is not None else texts, f"{modality}s")
        for position, item in enumerate(items):
            checked = (check_image if modality == "image" else check_text)(item, position)
            if (
                modality == "image"
                and not index_options.get("store_tokens", True)
                and not isinstance(checked, str)
            ):
                raise ValueError(
                    f"image {position}: an index without tokens (store_tokens=False) keeps its images' paths or "
                    f"URLs to encode them again, got {type(item).__name__}"
                )
        ids = _gallery_ids(items, ids, modality)
        batch_size = _positive(batch_size or self._batch_size or 32, "batch_size")
        config = self.model.config
        self.index = build_retrieval_index(
            items,
            modality,
            functools.partial(self._encode_gallery, modality=modality, timeout=timeout),
            config.embed_dim,
            (config.vision_config if modality == "image" else config.text_config).hidden_size,
            ids=ids,
            directory=directory,
            batch_size=batch_size,
            chunk_size=_positive(chunk_size, "chunk_size"),
            progress=progress,
            model_name=getattr(self.model, "name_or_path", None) or None,
            **index_options,
        )
        return self.index

    def _encode_gallery(
        self, items: list[Any], start: int, modality: str | None = None, timeout: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Features, tokens and (texts) mask of gallery items, the first of which is item `start`."""
        modality = modality or self.index.modality
        if modality == "image":
            loaded = [load_image(item, start + i, timeout) for i, item in enumerate(items)]
            pixel_values = self.processor(images=loaded, return_tensors="pt")["pixel_values"]
            embeds, features = self.encode_images(pixel_values.to(self.device))
            return features, embeds, None
        tokens = self.processor(text=list(items), return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device)
        embeds, features = self.encode_texts(tokens["input_ids"].to(self.device), mask)
        return features, embeds, mask

    def load_index(self, directory: str | os.PathLike) -> AlbefRetrievalIndex:
        """Load a saved index and make it this pipeline's default."""
        self.index = AlbefRetrievalIndex.load(directory)
        return self.index

    def __call__(self, queries: Any, **kwargs):
        """Query the index with one query or a list; returns a list of results per query (a list of lists for a
        list of queries).

        Args:
            queries: texts for an image gallery, images for a text gallery.
            index: an `AlbefRetrievalIndex` or the folder of a saved one (default: the last built or loaded).
            top_k: results per query (default 10).
            k: gallery items shortlisted by ITC and re-ranked by ITM (default 128, at least `top_k`).
            itm_batch_size: query-item pairs per ITM forward (default 128).
        """
        if "index" in kwargs:
            self.index = _as_index(kwargs.pop("index"))
        if self.index is None:
            raise ValueError("no index to query: call build_index(...) or pass index=...")
        single = not _is_batch(queries)
        queries = _as_list(queries, "queries")
        check = check_text if self.index.query_modality == "text" else check_image
        for position, query in enumerate(queries):
            check(query, position)
        self._check_index(self.index)
        results = super().__call__(queries, **kwargs)
        return results[0] if single else results

    def _check_index(self, index: AlbefRetrievalIndex) -> None:
        config = self.model.config
        side = config.vision_config if index.modality == "image" else config.text_config
        if index.embed_dim != config.embed_dim or index.hidden_size != side.hidden_size:
            raise ValueError(
                f"the index holds features of size {index.embed_dim} and {index.modality} tokens of size "
                f"{index.hidden_size}; this model makes {config.embed_dim} and {side.hidden_size}: it was "
                "built with another model"
            )

    def preprocess(self, query: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        if self.index.query_modality == "text":
            return self.process_text(query)
        return self.process_image(query, timeout)

    def _forward(self, inputs: dict[str, torch.Tensor], k: int = 128, itm_batch_size: int = 128) -> dict:
        if self.index.query_modality == "image":
            query_embeds, query_feat = self.encode_images(inputs["pixel_values"])
            query_mask = None
        else:
            query_mask = inputs["attention_mask"]
            query_embeds, query_feat = self.encode_texts(inputs["input_ids"], query_mask)
        itc, candidates, itm = self.index.rerank(
            self.model, query_embeds, query_feat, query_mask, k, itm_batch_size, encode=self._encode_gallery
        )
        return {"candidates": candidates, "itc_similarity": itc, "itm_logits": itm}

    def postprocess(self, outputs: dict[str, torch.Tensor], top_k: int = 10) -> list[dict[str, Any]]:
        itm = outputs["itm_logits"][0].float()
        order = itm[:, 1].argsort(descending=True, stable=True)[:top_k]
        probabilities = itm.softmax(dim=-1)[:, 1]
        results = []
        for rank in order.tolist():
            item = int(outputs["candidates"][0, rank])
            result = {
                "index": item,
                "id": self.index.ids[item],
                "score": itm[rank, 1].item(),
                "itm_probability": probabilities[rank].item(),
                "itc_similarity": outputs["itc_similarity"][0, rank].float().item(),
            }
            if self.index.texts is not None:
                result["text"] = self.index.texts[item]
            results.append(result)
        return results


def _as_index(index: AlbefRetrievalIndex | str | os.PathLike) -> AlbefRetrievalIndex:
    if isinstance(index, AlbefRetrievalIndex):
        return index
    if isinstance(index, (str, os.PathLike)):
        return AlbefRetrievalIndex.load(index)
    raise ValueError(
        f"index must be an AlbefRetrievalIndex or the folder of a saved one, got {type(index).__name__}"
    )


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _gallery_ids(items: list[Any], ids: Sequence[str | int] | None, modality: str) -> list[str | int]:
    if ids is None:
        return [
            os.fspath(item) if modality == "image" and isinstance(item, (str, os.PathLike)) else position
            for position, item in enumerate(items)
        ]
    ids = list(ids)
    if len(ids) != len(items):
        raise ValueError(f"got {len(ids)} ids for {len(items)} gallery items")
    if not all(isinstance(item_id, (str, int)) and not isinstance(item_id, bool) for item_id in ids):
        raise ValueError("ids must be strings or integers (they are saved with the index)")
    return ids


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


class AlbefFeatureExtractionPipeline(AlbefPipeline):
    """ALBEF features of images, texts or image-text pairs, as LAVIS's `extract_features` offers them.

    - images (`extractor(image)`): `image_embeds` `(1 + num_patches, vision_hidden)` tokens and `image_features`
      `(embed_dim,)`, the projected, normalised [CLS] (`model.get_image_features`);
    - texts (`extractor(text="...")`): `text_embeds` `(num_tokens, text_hidden)` unimodal tokens (padding removed)
      and `text_features` `(embed_dim,)`;
    - pairs (`extractor(image, text="...")`): both of the above plus `multimodal_embeds` `(num_tokens,
      text_hidden)`, the fusion encoder's tokens, and `multimodal_features`, their [CLS]
      (`model.get_multimodal_features`).

    Values are numpy float32 arrays, or torch tensors with `return_tensors=True`. One input gives one dict,
    a list gives a list (pairs: as in image-text-matching).
    """

    checkpoint_classes = ("AlbefModel", "AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = (*AlbefPipeline.required_methods, "fuse")

    def __call__(self, images: Any = None, text: str | list[str] | None = None, **kwargs):
        if images is None and text is None:
            raise ValueError("feature extraction needs images, text=..., or both")
        if images is None:
            single = not _is_batch(text)
            items = [{"text": check_text(t, i)} for i, t in enumerate(_as_list(text, "texts"))]
        elif text is None and not _is_dicts(images):
            single = not _is_batch(images)
            items = _as_list(images, "images")
            for position, image in enumerate(items):
                check_image(image, position)
            items = [{"image": image} for image in items]
        else:
            items, single = pair_inputs(images, text)
        results = super().__call__(items, **kwargs)
        return results[0] if single else results

    def _sanitize_parameters(self, return_tensors: bool | None = None, timeout: float | None = None):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        return preprocess, {}, {} if return_tensors is None else {"return_tensors": bool(return_tensors)}

    def preprocess(self, item: dict[str, Any], timeout: float | None = None) -> dict[str, torch.Tensor]:
        inputs = {}
        if "image" in item:
            inputs.update(self.process_image(item["image"], timeout))
        if "text" in item:
            inputs.update(self.process_text(item["text"]))
        return inputs

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {}
        if "pixel_values" in inputs:
            outputs["image_embeds"], outputs["image_features"] = self.encode_images(inputs["pixel_values"])
        if "input_ids" in inputs:
            mask = inputs["attention_mask"]
            outputs["text_embeds"], outputs["text_features"] = self.encode_texts(inputs["input_ids"], mask)
            outputs["attention_mask"] = mask
        if "pixel_values" in inputs and "input_ids" in inputs:
            fused = self.model.fuse(outputs["text_embeds"], mask, outputs["image_embeds"]).last_hidden_state
            outputs["multimodal_embeds"], outputs["multimodal_features"] = fused, fused[:, 0]
        return outputs

    def postprocess(self, outputs: dict[str, torch.Tensor], return_tensors: bool = False) -> dict[str, Any]:
        length = int(outputs["attention_mask"][0].sum()) if "attention_mask" in outputs else None
        result = {}
        for name, value in outputs.items():
            if name == "attention_mask":
                continue
            value = value[0].float()
            if name in ("text_embeds", "multimodal_embeds"):
                value = value[:length]
            result[name] = value if return_tensors else value.numpy()
        return result


def _is_dicts(value: Any) -> bool:
    return isinstance(value, dict) or (_is_batch(value) and bool(value) and isinstance(value[0], dict))


# ----------------------------------------------------------------------------------------------
# Visual question answering
# ----------------------------------------------------------------------------------------------


class AlbefVisualQuestionAnsweringPipeline(AlbefPipeline):
    """Answers questions about images with `AlbefForQuestionAnswering`.

    - With `candidate_answers` (a closed answer list, as ALBEF is evaluated on VQA): the answers ranked as the
      original (first-token shortlist of `k`), `top_k` of them (5 by default) as `{"answer", "score"}` with
      `score` the probability renormalised over the shortlist.
    - Without: free generation (`generate_kwargs` go to `model.generate`; `max_new_tokens` 10 by default): one
      answer, or with `top_k > 1` that many from beam search. Results are `{"answer"}` dicts, best first.

    Questions are cleaned as the original cleans them (`pre_question`) unless the processor's normalisation is off.

    Example:
        >>> vqa = pipeline("visual-question-answering", model="path/to/albef-vqa")
        >>> vqa(image, "what colour is the circle?", candidate_answers=["red", "blue", "green"], top_k=2)
        [{'answer': 'red', 'score': 0.93}, {'answer': 'blue', 'score': 0.05}]

    Call with `(image, question)`, lists as in image-text-matching, or `{"image", "question"}` dicts; one question
    gives one list of answers, a list gives a list of lists.
    """

    checkpoint_classes = ("AlbefForQuestionAnswering",)
    required_methods = ("encode_question", "rank_answers", "generate")

    def __call__(self, images: Any, question: str | list[str] | None = None, **kwargs):
        pairs, single = pair_inputs(images, question, text_key="question")
        results = super().__call__(pairs, **kwargs)
        return results[0] if single else results

    def _sanitize_parameters(
        self,
        candidate_answers: Sequence[str] | None = None,
        top_k: int | None = None,
        k: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        max_new_tokens: int | None = None,
        timeout: float | None = None,
    ):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        forward, postprocess = {}, {}
        if candidate_answers is not None:
            answers = _as_list(candidate_answers, "candidate answers")
            for position, answer in enumerate(answers):
                check_text(answer, position)
            postprocess["answers"] = answers
            forward["answer_tokens"] = dict(self.processor.tokenize_answers(answers))
        if top_k is not None:
            forward["top_k"] = _positive(top_k, "top_k")
        if k is not None:
            forward["k"] = _positive(k, "k")
        if generate_kwargs is not None or max_new_tokens is not None:
            forward["generate_kwargs"] = {
                **(generate_kwargs or {}),
                **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}),
            }
        return preprocess, forward, postprocess

    def preprocess(self, pair: dict[str, Any], timeout: float | None = None) -> dict[str, torch.Tensor]:
        normalization = self.processor.question_normalization
        question = self.processor(text=[pair["text"]], text_normalization=normalization, return_tensors="pt")
        return {**self.process_image(pair["image"], timeout), **question}

    def _forward(
        self,
        inputs: dict[str, torch.Tensor],
        answer_tokens: dict[str, torch.Tensor] | None = None,
        top_k: int | None = None,
        k: int = 128,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        question = {key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask")}
        if answer_tokens is not None:
            top_k = top_k or 5
            # rank_answers keeps at most as many candidates as there are answers, and slicing stops there too
            ranking = self.model.rank_answers(
                answer_input_ids=answer_tokens["input_ids"].to(self.device),
                answer_attention_mask=answer_tokens["attention_mask"].to(self.device),
                k=max(k, top_k),
                **question,
            )
            return {"answer_ids": ranking.answer_ids[:, :top_k], "probs": ranking.probs[:, :top_k]}
        generate_kwargs = {"max_new_tokens": 10, **(generate_kwargs or {})}
        if top_k is not None and top_k > 1:
            generate_kwargs.setdefault("num_beams", top_k)
            generate_kwargs["num_return_sequences"] = top_k
        sequences = self.model.generate(**question, **generate_kwargs)
        return {"sequences": sequences.reshape(question["input_ids"].shape[0], -1, sequences.shape[-1])}

    def postprocess(self, outputs: dict[str, Any], answers: list[str] | None = None) -> list[dict[str, Any]]:
        if "sequences" in outputs:
            texts = self.processor.batch_decode(outputs["sequences"][0], skip_special_tokens=True)
            return [{"answer": text.strip()} for text in texts]
        return [
            {"answer": answers[int(index)], "score": float(prob)}
            for index, prob in zip(outputs["answer_ids"][0], outputs["probs"][0].float(), strict=True)
        ]


# ----------------------------------------------------------------------------------------------
# Visual grounding
# ----------------------------------------------------------------------------------------------


class AlbefVisualGroundingPipeline(AlbefPipeline):
    """Where in the image a referring expression is: ALBEF's weakly-supervised grounding by Grad-CAM.

    Each result has `heatmap`, a float32 `(height, width)` array over the input image's pixels (the Grad-CAM map
    of the ITM "match" logit on a fusion layer's cross-attention, upsampled bicubically), `overlay`, the image
    with the normalised heatmap blended over it (a PIL image), and `score`, the score the map explains (the ITM
    "match" logit; with `mode="itc"`, the ITC similarity over the temperature and a ViT block's map). Given
    candidate `boxes` (`[x, y, width, height]` in the image's pixels), it also has `box`, the chosen box,
    `box_index` and `box_scores` (heatmap mass in each box over the square root of its area, as the original).

    Example:
        >>> grounder = pipeline("visual-grounding", model="path/to/albef")
        >>> result = grounder(image, "the red circle", boxes=[[0, 0, 32, 32], [32, 0, 32, 32]])
        >>> result["box"], result["overlay"].save("where.png")

    Call with `(image, text)`, lists as in image-text-matching, or `{"image", "text", "boxes"}` dicts (boxes
    per image); `boxes=` applies to every image of the call.
    """

    checkpoint_classes = ("AlbefForPreTraining", "AlbefForImageTextRetrieval")
    required_methods = ("encode_image", "text_encoder", "itm_head")

    def __call__(self, images: Any, text: str | list[str] | None = None, **kwargs):
        pairs, single = pair_inputs(images, text)
        if text is None:
            for pair, item in zip(pairs, _as_list(images, "inputs"), strict=True):
                if "boxes" in item:
                    pair["boxes"] = _check_boxes(item["boxes"])
        results = super().__call__(pairs, **kwargs)
        return results[0] if single else results

    def _sanitize_parameters(
        self,
        boxes: Sequence[Sequence[float]] | None = None,
        mode: str | None = None,
        layer: int | None = None,
        alpha: float | None = None,
        timeout: float | None = None,
    ):
        preprocess, _, _ = super()._sanitize_parameters(timeout=timeout)
        if boxes is not None:
            preprocess["boxes"] = _check_boxes(boxes)
        forward = {} if layer is None else {"layer": layer}
        if mode is not None:
            if mode not in ("itm", "itc"):
                raise ValueError(f"mode must be 'itm' or 'itc', got {mode!r}")
            forward["mode"] = mode
        postprocess = {} if alpha is None else {"alpha": float(alpha)}
        return preprocess, forward, postprocess

    def preprocess(
        self, pair: dict[str, Any], boxes: list[list[float]] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        image = load_image(pair["image"], timeout=timeout)
        inputs = self.processor(images=[image], text=[pair["text"]], pairs=True, return_tensors="pt")
        return {**inputs, "image": image, "boxes": pair.get("boxes", boxes)}

    def _forward(self, inputs: dict[str, Any], mode: str = "itm", layer: int | None = None) -> dict[str, Any]:
        gradcam = gradcam_itm if mode == "itm" else gradcam_itc
        cam = gradcam(
            self.model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], layer=layer
        )
        return {
            "gradcam": cam.gradcam,
            "score": cam.scores,
            "image": inputs["image"],
            "boxes": inputs["boxes"],
        }

    def postprocess(self, outputs: dict[str, Any], alpha: float = 0.5) -> dict[str, Any]:
        image = outputs["image"]
        heatmap = upsample_heatmap(outputs["gradcam"].float(), (image.height, image.width))[0]
        result = {
            "heatmap": heatmap.numpy(),
            "overlay": overlay_heatmap(image, heatmap.numpy()),
            "score": outputs["score"].float()[0].item(),
        }
        if outputs["boxes"] is not None:
            scores = score_boxes(heatmap, outputs["boxes"], alpha)
            best = int(scores.argmax())
            result.update(box=list(outputs["boxes"][best]), box_index=best, box_scores=scores.tolist())
        return result


def _check_boxes(boxes: Any) -> list[list[float]]:
    if not _is_batch(boxes) or not boxes:
        raise ValueError(f"boxes must be a non-empty list of [x, y, width, height], got {boxes!r}")
    checked = []
    for position, box in enumerate(boxes):
        values = list(box) if _is_batch(box) or isinstance(box, (np.ndarray, torch.Tensor)) else None
        if values is None or len(values) != 4:
            raise ValueError(f"box {position}: expected [x, y, width, height], got {box!r}")
        values = [float(v) for v in values]
        if values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"box {position}: width and height must be positive, got {box!r}")
        checked.append(values)
    return checked


def overlay_heatmap(image: PIL.Image.Image, heatmap: np.ndarray, opacity: float = 0.5) -> PIL.Image.Image:
    """`image` with `heatmap` (same size, normalised to its maximum) blended over it in a blue-to-red colour map."""
    peak = float(heatmap.max())
    level = heatmap / peak if peak > 0 else np.zeros_like(heatmap)
    # a "jet"-like map: blue (low) -> cyan -> yellow -> red (high)
    colours = np.stack([np.clip(1.5 - np.abs(4 * level - offset), 0, 1) for offset in (3, 2, 1)], axis=-1)
    heat = PIL.Image.fromarray((colours * 255).astype(np.uint8))
    return PIL.Image.blend(image.convert("RGB"), heat, opacity)


# ----------------------------------------------------------------------------------------------
# Registration helpers (used by albef_hf/__init__.py; unused where this module serves as remote code)
# ----------------------------------------------------------------------------------------------


class FeatureExtractionDispatch(FeatureExtractionPipeline):
    """transformers' `feature-extraction` task, with ALBEF models served by `AlbefFeatureExtractionPipeline`.

    The built-in task name must keep working for every other model, so this class stands in its registry entry
    and builds the built-in pipeline for any model that is not ALBEF. It also asks `pipeline()` to load a
    processor when the repository has one (ALBEF needs its `AlbefProcessor`; for other models the attempt is
    dropped).
    """

    _load_processor = None

    def __new__(cls, model, *args, processor=None, **kwargs):
        if getattr(model.config, "model_type", None) == "albef":
            return AlbefFeatureExtractionPipeline(model, *args, processor=processor, **kwargs)
        return FeatureExtractionPipeline(model, *args, **kwargs)
