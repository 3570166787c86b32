"""The `image-text-retrieval` pipeline: a gallery indexed once, queried by texts or images (ITC shortlist, ITM
re-ranking)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..retrieval_index import AlbefRetrievalIndex, build_retrieval_index
from .base import (
    AlbefPipeline,
    _as_list,
    _is_batch,
    _positive,
    check_image,
    check_text,
    load_image,
)


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
