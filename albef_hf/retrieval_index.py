"""A retrieval index of ALBEF: a gallery of images or texts encoded once, queried many times.

It keeps what ALBEF's two retrieval stages need: the projected, normalised features of every gallery item for
the ITC shortlist, and the unimodal token embeddings (with the padding mask of texts) for the ITM re-ranking of
the shortlist. `save` writes a folder (tensors in safetensors, the rest in json) that `load` reads back.

The module is flat and imports only its neighbours so that it travels with a saved model folder (remote code).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["AlbefRetrievalIndex"]

INDEX_TENSORS = "index.safetensors"
INDEX_METADATA = "index.json"
_FORMAT_VERSION = 1


@dataclass
class AlbefRetrievalIndex:
    """An encoded gallery.

    Args:
        modality: `"image"` (queried with texts) or `"text"` (queried with images).
        features: `(num_items, embed_dim)` projected, L2-normalised [CLS] features (the ITC side).
        embeds: `(num_items, seq_len, hidden)` unimodal token embeddings (the ITM side).
        attention_mask: `(num_items, seq_len)` padding mask of a text gallery; `None` for images.
        ids: one identifier per item (the path of an image given as a path, else its position, unless the caller
            named the items).
        texts: the gallery texts (text galleries only), returned with the results.
        model_name: the model that built the index (informative).
    """

    modality: str
    features: torch.Tensor
    embeds: torch.Tensor
    attention_mask: torch.Tensor | None = None
    ids: list[Any] = field(default_factory=list)
    texts: list[str] | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {self.modality!r}")
        size = self.features.shape[0]
        if self.embeds.shape[0] != size or len(self.ids) != size:
            raise ValueError(
                f"index parts disagree: {size} features, {self.embeds.shape[0]} embeddings, {len(self.ids)} ids"
            )
        if (self.modality == "text") != (self.attention_mask is not None):
            raise ValueError("a text index needs an attention mask, an image index has none")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def query_modality(self) -> str:
        """What queries this index: texts for an image gallery, images for a text gallery."""
        return "text" if self.modality == "image" else "image"

    def to(self, device: torch.device | str) -> AlbefRetrievalIndex:
        """The index with its tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.features.device == device:
            return self
        return AlbefRetrievalIndex(
            modality=self.modality,
            features=self.features.to(device),
            embeds=self.embeds.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            ids=self.ids,
            texts=self.texts,
            model_name=self.model_name,
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index to `directory` (created when missing)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {"features": self.features, "embeds": self.embeds}
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask
        save_file(
            {name: t.detach().cpu().contiguous() for name, t in tensors.items()}, _path(directory, True)
        )
        metadata = {
            "format_version": _FORMAT_VERSION,
            "modality": self.modality,
            "ids": self.ids,
            "texts": self.texts,
            "model_name": self.model_name,
        }
        with open(_path(directory, False), "w", encoding="utf-8") as file:
            json.dump(metadata, file)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AlbefRetrievalIndex:
        """Read an index written by `save`.

        Raises:
            ValueError: when `directory` holds no index, or one of an unknown format.
        """
        if not (os.path.isfile(_path(directory, True)) and os.path.isfile(_path(directory, False))):
            raise ValueError(
                f"{str(directory)!r} holds no retrieval index ({INDEX_TENSORS} and {INDEX_METADATA})"
            )
        with open(_path(directory, False), encoding="utf-8") as file:
            metadata = json.load(file)
        if metadata.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"unknown retrieval index format {metadata.get('format_version')!r} in {directory}"
            )
        tensors = load_file(_path(directory, True))
        return cls(
            modality=metadata["modality"],
            features=tensors["features"],
            embeds=tensors["embeds"],
            attention_mask=tensors.get("attention_mask"),
            ids=metadata["ids"],
            texts=metadata["texts"],
            model_name=metadata["model_name"],
        )


def _path(directory: str | os.PathLike, tensors: bool) -> str:
    return os.path.join(directory, INDEX_TENSORS if tensors else INDEX_METADATA)
